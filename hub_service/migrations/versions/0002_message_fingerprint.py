"""The idempotency ledger remembers a fingerprint of each message's body, so a
message_id reused for a different message is refused instead of answered with
the old receipt. Rows from before have none (NULL): their reuse stays a duplicate.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("received_message", sa.Column("fingerprint", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("received_message") as batch:
        batch.drop_column("fingerprint")
