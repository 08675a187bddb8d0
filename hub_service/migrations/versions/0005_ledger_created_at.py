"""Retention forgets the idempotency ledger's oldest message ids first, a bounded batch
at a time: an index on when each was received finds them without a scan.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_received_message_created_at", "received_message", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_received_message_created_at", table_name="received_message")
