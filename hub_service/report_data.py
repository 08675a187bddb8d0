"""The run report's numbers, read from the database in bounded memory: counts are aggregated
in SQL (time buckets, pairs, contributors: rows bounded by the figure, not the events), and
durations come from rows streamed a few at a time into fixed histogram bins.

The result is plain JSON-able data (`ReportData.as_json`): the report draws it and embeds it,
so a test can compare the figures' numbers with the rows exactly.
"""

from __future__ import annotations

import calendar
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, and_, case, cast, func
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select

from generated.kernelhub.v1 import hub_pb2 as pb

from .models import AgentRow, ArtifactRow, CollaborationRow, FeatureDeliveryRow, FeatureRequestRow

# Upper bounds (seconds) of the duration and latency bins; the last bin is everything above.
DURATION_BINS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# At most this many time buckets in the shares plot: the bucket width grows with the span.
MAX_BUCKETS = 60
NICE_WIDTHS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)
TOP_PAIRS = 60  # collaboration graph: the busiest pairs (the rest are counted, not drawn)
TOP_CONTRIBUTORS = 25
ENDED = (
    pb.COLLABORATION_STATE_COMPLETED,
    pb.COLLABORATION_STATE_DECLINED,
    pb.COLLABORATION_STATE_EXPIRED,
)
STREAM_ROWS = 1000  # rows held at once while streaming durations


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """An enum value's short name ("networking"), or the prefix and number if unknown."""
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return f"{prefix.lower()}{value}"


def specialization_name(value: int) -> str:
    return enum_name(pb.Specialization, value, "SPECIALIZATION_")


def kind_name(value: int) -> str:
    return enum_name(pb.ArtifactKind, value, "ARTIFACT_KIND_")


def state_name(value: int) -> str:
    return enum_name(pb.CollaborationState, value, "COLLABORATION_STATE_")


def bin_index(seconds: float) -> int:
    """Which DURATION_BINS bin `seconds` falls in (len(DURATION_BINS): above the last)."""
    for i, upper in enumerate(DURATION_BINS):
        if seconds <= upper:
            return i
    return len(DURATION_BINS)


def epoch_seconds(moment: datetime) -> int:
    """Whole seconds since the epoch of a stored (naive UTC) time, as the SQL buckets count."""
    return calendar.timegm(moment.utctimetuple())


@dataclass
class Window:
    """Rows created in [since, until), either end open; a naive time is UTC."""

    since: datetime | None = None
    until: datetime | None = None

    def where(self, column: Any) -> list[ColumnElement[bool]]:
        clauses = []
        if self.since is not None:
            clauses.append(column >= _aware(self.since))
        if self.until is not None:
            clauses.append(column < _aware(self.until))
        return clauses


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass
class Histogram:
    """Durations in DURATION_BINS, with their count, mean and maximum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(DURATION_BINS) + 1))
    count: int = 0
    total_seconds: float = 0.0
    max_seconds: float = 0.0

    def add(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.counts[bin_index(seconds)] += 1
        self.count += 1
        self.total_seconds += seconds
        self.max_seconds = max(self.max_seconds, seconds)

    def as_json(self) -> dict[str, Any]:
        mean = self.total_seconds / self.count if self.count else 0.0
        return {
            "counts": self.counts,
            "count": self.count,
            "mean_seconds": round(mean, 6),
            "max_seconds": round(self.max_seconds, 6),
        }


@dataclass
class ReportData:
    window: dict[str, str | None]
    totals: dict[str, Any]
    shares: dict[str, Any]
    graph: dict[str, Any]
    durations: dict[str, Any]
    feature_latency: dict[str, Any]
    contributions: dict[str, Any]
    validation: dict[str, Any] | None  # None: the database records no validation verdicts

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _floor_seconds(s: Session, column: Any) -> ColumnElement[int]:
    """Whole seconds since the epoch, computed by the database, exactly (no float)."""
    if s.get_bind().dialect.name == "sqlite":
        return cast(func.strftime("%s", column), BigInteger)
    return cast(func.floor(func.extract("epoch", column)), BigInteger)


def _width(span: int) -> int:
    """The smallest nice bucket width that keeps the shares plot within MAX_BUCKETS."""
    for width in NICE_WIDTHS:
        if span < width * MAX_BUCKETS:
            return width
    return math.ceil(span / MAX_BUCKETS)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else _aware(moment).astimezone(UTC).isoformat()


def gather(s: Session, window: Window) -> ReportData:
    """Every figure's numbers for the rows created in `window`."""
    return ReportData(
        window={"since": _iso(window.since), "until": _iso(window.until)},
        totals=_totals(s, window),
        shares=_shares(s, window),
        graph=_graph(s, window),
        durations=_durations(s, window),
        feature_latency=_feature_latency(s, window),
        contributions=_contributions(s, window),
        validation=_validation(s, window),
    )


def _totals(s: Session, window: Window) -> dict[str, Any]:
    artifacts = s.exec(
        select(ArtifactRow.kind, func.count())
        .where(*window.where(ArtifactRow.created_at))
        .group_by(col(ArtifactRow.kind))
    ).all()
    states = s.exec(
        select(CollaborationRow.state, func.count())
        .where(*window.where(CollaborationRow.created_at))
        .group_by(col(CollaborationRow.state))
    ).all()
    first, last = s.exec(
        select(func.min(ArtifactRow.created_at), func.max(ArtifactRow.created_at)).where(
            *window.where(ArtifactRow.created_at)
        )
    ).one()
    return {
        "agents": int(s.exec(select(func.count()).select_from(AgentRow)).one()),
        "artifacts": {kind_name(k): int(n) for k, n in sorted(artifacts)},
        "collaborations": {state_name(k): int(n) for k, n in sorted(states)},
        "feature_requests": int(
            s.exec(
                select(func.count())
                .select_from(FeatureRequestRow)
                .where(*window.where(FeatureRequestRow.created_at))
            ).one()
        ),
        "feature_deliveries": int(
            s.exec(
                select(func.count())
                .select_from(FeatureDeliveryRow)
                .where(*window.where(FeatureDeliveryRow.created_at))
            ).one()
        ),
        "first_share": _iso(first),
        "last_share": _iso(last),
    }


def _shares(s: Session, window: Window) -> dict[str, Any]:
    """Artifacts per time bucket and specialization: rows are buckets x specializations."""
    seconds = _floor_seconds(s, ArtifactRow.created_at)
    low, high = s.exec(
        select(func.min(seconds), func.max(seconds)).where(*window.where(ArtifactRow.created_at))
    ).one()
    if low is None:
        return {"start_epoch": None, "bucket_seconds": 1, "buckets": 0, "series": {}}
    start, width = int(low), _width(int(high) - int(low))
    buckets = (int(high) - start) // width + 1
    bucket = (seconds - start) // width  # integers, not negative: exact on every database
    rows = s.exec(
        select(bucket, ArtifactRow.specialization, func.count())
        .where(*window.where(ArtifactRow.created_at))
        .group_by(bucket, col(ArtifactRow.specialization))
    ).all()
    series: dict[str, list[int]] = {}
    for index, specialization, n in rows:
        counts = series.setdefault(specialization_name(specialization), [0] * buckets)
        counts[int(index)] += int(n)
    return {
        "start_epoch": start,
        "bucket_seconds": width,
        "buckets": buckets,
        "series": dict(sorted(series.items())),
    }


def _graph(s: Session, window: Window) -> dict[str, Any]:
    """Who works with whom: collaborations per unordered pair (the busiest TOP_PAIRS)."""
    c = CollaborationRow
    a = case((col(c.initiator_id) < col(c.target_id), col(c.initiator_id)), else_=col(c.target_id))
    b = case((col(c.initiator_id) < col(c.target_id), col(c.target_id)), else_=col(c.initiator_id))
    completed = func.sum(case((col(c.state) == pb.COLLABORATION_STATE_COMPLETED, 1), else_=0))
    total = func.count()
    where = window.where(c.created_at)
    rows = s.exec(
        select(a, b, total, completed)
        .where(*where)
        .group_by(a, b)
        .order_by(total.desc(), a, b)
        .limit(TOP_PAIRS)
    ).all()
    pairs = int(
        s.exec(
            select(func.count()).select_from(select(a, b).where(*where).group_by(a, b).subquery())
        ).one()
    )
    ids = sorted({row[0] for row in rows} | {row[1] for row in rows})
    specializations = dict(
        s.exec(
            select(AgentRow.agent_id, AgentRow.specialization).where(
                col(AgentRow.agent_id).in_(ids)
            )
        ).all()
    )
    return {
        "nodes": [
            {"id": i, "specialization": specialization_name(specializations.get(i, 0))} for i in ids
        ],
        "edges": [
            {"a": x, "b": y, "count": int(n), "completed": int(done or 0)} for x, y, n, done in rows
        ],
        "pairs_total": pairs,
    }


def _stream(s: Session, query: Any) -> Iterator[Any]:
    return iter(s.exec(query.execution_options(yield_per=STREAM_ROWS)))


def _durations(s: Session, window: Window) -> dict[str, Any]:
    """Created to ended (last update), per outcome, streamed into bins."""
    c = CollaborationRow
    by_outcome = {state_name(state): Histogram() for state in ENDED}
    query = select(c.state, c.created_at, c.updated_at).where(
        col(c.state).in_(ENDED), *window.where(c.created_at)
    )
    for state, created, updated in _stream(s, query):
        by_outcome[state_name(state)].add((updated - created).total_seconds())
    return {
        "bins": list(DURATION_BINS),
        "by_outcome": {name: h.as_json() for name, h in by_outcome.items()},
    }


def _feature_latency(s: Session, window: Window) -> dict[str, Any]:
    """Each request's wait for its first delivery (one row per request, streamed)."""
    first = (
        select(
            FeatureDeliveryRow.request_id,
            func.min(FeatureDeliveryRow.created_at).label("first_at"),
        )
        .group_by(col(FeatureDeliveryRow.request_id))
        .subquery()
    )
    query = (
        select(FeatureRequestRow.created_at, first.c.first_at)
        .outerjoin(first, and_(first.c.request_id == FeatureRequestRow.request_id))
        .where(*window.where(FeatureRequestRow.created_at))
    )
    latency, undelivered = Histogram(), 0
    for created, first_at in _stream(s, query):
        if first_at is None:
            undelivered += 1
        else:
            latency.add((first_at - created).total_seconds())
    return {"bins": list(DURATION_BINS), "undelivered": undelivered, **latency.as_json()}


def _contributions(s: Session, window: Window) -> dict[str, Any]:
    """Artifacts per contributor and kind, for the TOP_CONTRIBUTORS; the rest summed."""
    art = ArtifactRow
    where = window.where(art.created_at)
    total = func.count()
    top = s.exec(
        select(art.contributor_id, total)
        .where(*where)
        .group_by(col(art.contributor_id))
        .order_by(total.desc(), col(art.contributor_id))
        .limit(TOP_CONTRIBUTORS)
    ).all()
    ids = [agent_id for agent_id, _ in top]
    by_kind: dict[str, dict[str, int]] = {agent_id: {} for agent_id in ids}
    for agent_id, kind, n in s.exec(
        select(art.contributor_id, art.kind, func.count())
        .where(col(art.contributor_id).in_(ids), *where)
        .group_by(col(art.contributor_id), col(art.kind))
    ).all():
        by_kind[agent_id][kind_name(kind)] = int(n)
    specializations = dict(
        s.exec(
            select(AgentRow.agent_id, AgentRow.specialization).where(
                col(AgentRow.agent_id).in_(ids)
            )
        ).all()
    )
    everyone = s.exec(
        select(func.count(), func.count(func.distinct(art.contributor_id))).where(*where)
    ).one()
    shown = sum(n for _, n in top)
    return {
        "agents": [
            {
                "agent_id": agent_id,
                "specialization": specialization_name(specializations.get(agent_id, 0)),
                "by_kind": dict(sorted(by_kind[agent_id].items())),
                "total": int(n),
            }
            for agent_id, n in top
        ],
        "others": int(everyone[0]) - shown,
        "contributors_total": int(everyone[1]),
    }


def _validation(s: Session, window: Window) -> dict[str, Any] | None:
    """Shared components by validation state (PENDING until a validator's verdict), and the
    pass rate of those judged; None when the window holds no component."""
    rows = s.exec(
        select(ArtifactRow.validation_state, func.count())
        .where(col(ArtifactRow.validation_state) != 0, *window.where(ArtifactRow.created_at))
        .group_by(col(ArtifactRow.validation_state))
    ).all()
    if not rows:
        return None
    by_state = {
        enum_name(pb.ValidationState, state, "VALIDATION_STATE_"): int(n) for state, n in rows
    }
    judged = sum(by_state.get(state, 0) for state in ("passed", "failed", "timed_out"))
    return {
        "by_state": by_state,
        "pass_rate": by_state.get("passed", 0) / judged if judged else None,
    }
