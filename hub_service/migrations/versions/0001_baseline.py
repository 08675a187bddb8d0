"""The schema of kernelhub 0.1.0, which created its tables with `create_all`.

A database made by that release has these tables and no alembic_version table:
`schema.upgrade` stamps it with this revision instead of running it.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)  # what SQLModel's UTCDateTime creates


def upgrade() -> None:
    op.create_table(
        "agent",
        sa.Column("agent_id", sa.String(length=128), nullable=False),
        sa.Column("specialization", sa.Integer(), nullable=False),
        sa.Column("capabilities", sa.String(), nullable=False),
        sa.Column("version", sa.String(), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("last_seen_at", TIME, nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("agent_id"),
    )
    op.create_table(
        "artifact",
        sa.Column("artifact_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.Integer(), nullable=False),
        sa.Column("contributor_id", sa.String(length=128), nullable=False),
        sa.Column("specialization", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("artifact_id"),
        sa.UniqueConstraint("seq"),
    )
    op.create_index("ix_artifact_contributor_seq", "artifact", ["contributor_id", "seq"])
    op.create_index("ix_artifact_kind_seq", "artifact", ["kind", "seq"])
    op.create_index("ix_artifact_specialization_seq", "artifact", ["specialization", "seq"])
    op.create_table(
        "collaboration",
        sa.Column("session_id", sa.String(length=64), nullable=False),
        sa.Column("initiator_id", sa.String(length=128), nullable=False),
        sa.Column("target_id", sa.String(length=128), nullable=False),
        sa.Column("type", sa.Integer(), nullable=False),
        sa.Column("description", sa.String(), nullable=False),
        sa.Column("state", sa.Integer(), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("last_note", sa.String(), nullable=False),
        sa.Column("end_reason", sa.String(), nullable=False),
        sa.Column("result_artifact_id", sa.String(), nullable=False),
        sa.Column("initiator_specialization", sa.Integer(), nullable=False),
        sa.Column("target_specialization", sa.Integer(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("updated_at", TIME, nullable=False),
        sa.Column("expires_at", TIME, nullable=True),
        sa.PrimaryKeyConstraint("session_id"),
    )
    op.create_index("ix_collaboration_initiator", "collaboration", ["initiator_id"])
    op.create_index("ix_collaboration_state_expires", "collaboration", ["state", "expires_at"])
    op.create_index("ix_collaboration_target", "collaboration", ["target_id"])
    op.create_table(
        "event",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("sender_id", sa.String(length=128), nullable=False),
        sa.Column("broadcast", sa.Boolean(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_table(
        "event_recipient",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("agent_id", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("seq", "agent_id"),
    )
    op.create_index("ix_event_recipient_agent_seq", "event_recipient", ["agent_id", "seq"])
    op.create_table(
        "feature_delivery",
        sa.Column("artifact_id", sa.String(length=64), nullable=False),
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("deliverer_id", sa.String(length=128), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("artifact_id"),
    )
    op.create_index("ix_feature_delivery_request_id", "feature_delivery", ["request_id"])
    op.create_table(
        "feature_request",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("requester_id", sa.String(length=128), nullable=False),
        sa.Column("feature", sa.String(), nullable=False),
        sa.Column("delivery_count", sa.Integer(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("request_id"),
        sa.UniqueConstraint("seq"),
    )
    op.create_index("ix_feature_request_requester_id", "feature_request", ["requester_id"])
    op.create_table(
        "received_message",
        sa.Column("agent_id", sa.String(length=128), nullable=False),
        sa.Column("message_id", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("resource_id", sa.String(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.PrimaryKeyConstraint("agent_id", "message_id"),
    )
    op.create_table(
        "token",
        sa.Column("token_id", sa.String(length=64), nullable=False),
        sa.Column("agent_id", sa.String(length=128), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("expires_at", TIME, nullable=True),
        sa.Column("revoked_at", TIME, nullable=True),
        sa.PrimaryKeyConstraint("token_id"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_index("ix_token_agent_id", "token", ["agent_id"])


def downgrade() -> None:
    raise NotImplementedError("kernelhub does not downgrade below its first schema")
