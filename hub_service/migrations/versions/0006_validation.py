"""Validated knowledge (issue 15): a persistent queue of components awaiting validation, with
leases, and each artifact's validation state beside it for ListArtifacts to filter on.
Artifacts stored before stay UNSPECIFIED (0) and are not queued.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "artifact",
        sa.Column("validation_state", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_index(
        "ix_artifact_validation_state_seq", "artifact", ["validation_state", "seq"], unique=False
    )
    op.create_table(
        "validation_job",
        sa.Column("artifact_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("done", sa.Boolean(), nullable=False),
        sa.Column("available_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("lease_id", sa.String(length=64), nullable=False),
        sa.Column("validator_id", sa.String(length=128), nullable=False),
        sa.Column("verdict_seq", sa.BigInteger(), nullable=False),
        sa.Column("audience", sa.String(length=260), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("artifact_id"),
    )
    op.create_index(
        "ix_validation_job_done_available",
        "validation_job",
        ["done", "available_at", "seq"],
        unique=False,
    )
    op.create_index(
        "ix_validation_job_validator_done",
        "validation_job",
        ["validator_id", "done"],
        unique=False,
    )


def downgrade() -> None:
    op.drop_index("ix_validation_job_validator_done", table_name="validation_job")
    op.drop_index("ix_validation_job_done_available", table_name="validation_job")
    op.drop_table("validation_job")
    op.drop_index("ix_artifact_validation_state_seq", table_name="artifact")
    with op.batch_alter_table("artifact") as batch:
        batch.drop_column("validation_state")
