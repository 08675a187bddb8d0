"""Replicas share presence and hold leases (issue 14): each agent row names the replica that
carries its stream and a presence revision the replicas follow; a table of replica leases
(with each replica's prunable seq, for retention), and the one leader lease.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.add_column(
        "agent",
        sa.Column("replica_id", sa.String(length=64), nullable=False, server_default=""),
    )
    op.add_column(
        "agent", sa.Column("presence_rev", sa.BigInteger(), nullable=False, server_default="0")
    )
    op.create_index("ix_agent_replica_id", "agent", ["replica_id"], unique=False)
    op.create_index("ix_agent_presence_rev", "agent", ["presence_rev"], unique=False)
    op.create_table(
        "replica",
        sa.Column("replica_id", sa.String(length=64), nullable=False),
        sa.Column("expires_at", TIME, nullable=False),
        sa.Column("prunable_seq", sa.BigInteger(), nullable=False),
        sa.Column("started_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("replica_id"),
    )
    op.create_table(
        "leader",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("replica_id", sa.String(length=64), nullable=False),
        sa.Column("expires_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("leader")
    op.drop_table("replica")
    op.drop_index("ix_agent_presence_rev", table_name="agent")
    op.drop_index("ix_agent_replica_id", table_name="agent")
    with op.batch_alter_table("agent") as batch:
        batch.drop_column("presence_rev")
        batch.drop_column("replica_id")
