"""The event log says what each event is about (`subscriptions.Tags`): its EventKind, its
artifact kind and its specializations as bits, so a replay filters by subscription in SQL.
Existing rows are tagged from their bodies (their contributor's specialization as the agent
table holds it now); presence events older hubs logged get their kind, which no replay
selects.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.subscriptions import tags_of

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

BATCH = 2000  # rows tagged per statement round


def upgrade() -> None:
    with op.batch_alter_table("event") as batch:
        for name in ("kind", "artifact_kind", "spec_mask"):
            batch.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default="0"))
    connection = op.get_bind()
    specs: dict[str, int] = dict(
        connection.execute(sa.text("SELECT agent_id, specialization FROM agent")).all()
    )
    update = sa.text(
        "UPDATE event SET kind = :kind, artifact_kind = :artifact_kind, spec_mask = :spec_mask "
        "WHERE seq = :seq"
    )
    after = 0
    while True:
        rows = connection.execute(
            sa.text(
                "SELECT seq, sender_id, broadcast, body FROM event WHERE seq > :after "
                "ORDER BY seq LIMIT :limit"
            ),
            {"after": after, "limit": BATCH},
        ).all()
        if not rows:
            return
        values = []
        for seq, sender, broadcast, body in rows:
            event = pb.HubEvent.FromString(body)
            tags = tags_of(event, int(specs.get(sender, 0)) if broadcast else 0)
            values.append(
                {
                    "seq": seq,
                    "kind": tags.kind,
                    "artifact_kind": tags.artifact_kind,
                    "spec_mask": tags.spec_mask,
                }
            )
        connection.execute(update, values)
        after = rows[-1][0]


def downgrade() -> None:
    with op.batch_alter_table("event") as batch:
        for name in ("spec_mask", "artifact_kind", "kind"):
            batch.drop_column(name)
