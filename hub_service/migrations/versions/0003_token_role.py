"""Tokens carry a role (agent, observer, admin, validator); every token issued before is an
agent's, which is all a token could be.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "token",
        sa.Column("role", sa.String(length=16), nullable=False, server_default="agent"),
    )


def downgrade() -> None:
    with op.batch_alter_table("token") as batch:
        batch.drop_column("role")
