"""What the page shows, aggregated from the hub's events and polls within fixed bounds.

Memory does not grow with the run: rates live in a fixed window of one-second buckets,
tables keep their newest rows up to a cap, the collaboration graph its busiest pairs. So
1,000 agents and thousands of events a second cost the browser a snapshot of the same size.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.json_format import MessageToDict

from generated.kernelhub.v1 import hub_pb2 as pb

WINDOW_SECONDS = 300  # shares per second over the last five minutes
RECENT_EVENTS = 20
RECENT_REQUESTS = 500  # feature requests followed for waiting / delivered
MAX_EDGES = 2000  # pairs kept for the collaboration graph (the busiest)
GRAPH_EDGES = 150  # pairs the page draws
MAX_CONTRIBUTORS = 20_000
MAX_ONLINE = 20_000  # agents the online table holds
TOP_CONTRIBUTORS = 10
RECENT_FAILURES = 20  # failed verdicts the page lists, newest first
MAX_VERDICT_STATES = 16  # states counted (a newer hub's unknown numbers included)
DIAGNOSTIC_CHARS = 200  # of a failure's first diagnostic line
# Verdicts on the code: the pass rate is PASSED over these (as GetHubStats' validation_pass_rate).
JUDGED = frozenset({"PASSED", "FAILED", "TIMED_OUT"})
FAILURES = frozenset({"FAILED", "ERROR", "TIMED_OUT"})
KNOWN_KINDS = frozenset(
    {
        "artifact_shared",
        "feature_requested",
        "feature_delivered",
        "collaboration_updated",
        "agent_joined",
        "agent_left",
        "artifact_validated",
        "omitted",
    }
)
ARTIFACT_KINDS = ("pattern", "code_component", "os_component")


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """`NETWORKING` for SPECIALIZATION_NETWORKING; the number for one this client predates."""
    try:
        return str(enum.Name(value)).removeprefix(prefix)
    except ValueError:
        return str(value)


def artifact_label(artifact: pb.Artifact) -> str:
    kind = artifact.WhichOneof("content")
    if kind == "pattern":
        return artifact.pattern.pattern_type or artifact.pattern.pattern_id
    if kind == "code_component":
        return artifact.code_component.name
    if kind == "os_component":
        return artifact.os_component.name
    return artifact.artifact_id


def to_json(message: Any) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


@dataclass
class Aggregate:
    """Fed by the hub feed (`event`, `stats`, `agents`), read by the web app (`snapshot`)."""

    started: float = field(default_factory=time.time)
    # second -> artifact kind -> shares committed in that second (hub time)
    _shares: dict[int, Counter[str]] = field(default_factory=dict)
    _recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS))
    # request id -> [feature, requester, deliveries], newest last
    _requests: OrderedDict[str, list[Any]] = field(default_factory=OrderedDict)
    # (agent, agent) sorted -> collaborations between them
    _edges: Counter[tuple[str, str]] = field(default_factory=Counter)
    _contributors: Counter[str] = field(default_factory=Counter)
    _other_kinds: Counter[str] = field(default_factory=Counter)  # events this page predates
    _verdicts: Counter[str] = field(default_factory=Counter)  # state -> verdicts seen
    _failures: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT_FAILURES))
    events_seen: int = 0
    last_seq: int = 0
    watching: bool = False
    watch_error: str = ""
    hub_stats: dict[str, Any] = field(default_factory=dict)
    # Who is online: the Watch stream's roster, then its presence changes (`presence`).
    online: dict[str, dict[str, Any]] = field(default_factory=dict)
    online_truncated: bool = False
    _in_roster: bool = False  # between a roster's first update and its roster_complete

    # --- fed ---------------------------------------------------------------------------

    def event(self, event: pb.HubEvent) -> None:
        self.events_seen += 1
        self.last_seq = max(self.last_seq, event.seq)
        kind = event.WhichOneof("body") or ""
        label, link = "", ""
        if kind == "artifact_shared":
            artifact = event.artifact_shared
            content = artifact.WhichOneof("content") or "unknown"
            second = event.create_time.seconds or int(time.time())
            self._shares.setdefault(second, Counter())[content] += 1
            self._trim_window(second)
            if event.sender_id in self._contributors or len(self._contributors) < MAX_CONTRIBUTORS:
                self._contributors[event.sender_id] += 1
            label, link = f"{content}: {artifact_label(artifact)}", artifact.artifact_id
        elif kind == "feature_requested":
            info = event.feature_requested.request
            self._requests[info.request_id] = [info.feature, info.requester_id, 0]
            while len(self._requests) > RECENT_REQUESTS:
                self._requests.popitem(last=False)
            label = info.feature
        elif kind == "feature_delivered":
            delivered = event.feature_delivered
            if (request := self._requests.get(delivered.request_id)) is not None:
                request[2] += 1
            label, link = f"delivers {delivered.request_id}", delivered.artifact.artifact_id
        elif kind == "collaboration_updated":
            collab = event.collaboration_updated.collaboration
            state = enum_name(pb.CollaborationState, collab.state, "COLLABORATION_STATE_")
            if collab.state == pb.COLLABORATION_STATE_PROPOSED:
                pair = tuple(sorted((collab.initiator_id, collab.target_id)))
                self._add_edge((pair[0], pair[1]))
            label = f"{collab.initiator_id} + {collab.target_id}: {state}"
        elif kind == "artifact_validated":
            label, link = (
                self._verdict(event.artifact_validated, event.seq),
                (event.artifact_validated.artifact_id),
            )
        elif kind in ("agent_joined", "agent_left"):
            pass  # logged by hubs before presence was state: history, not who is online
        elif kind not in KNOWN_KINDS:
            self._other_kinds[kind] += 1
        self._recent.append(
            {
                "seq": event.seq,
                "kind": kind,
                "sender": event.sender_id,
                "time": event.create_time.seconds,
                "label": label[:200],
                "artifact": link,
            }
        )

    def _verdict(self, validated: pb.ArtifactValidated, seq: int) -> str:
        """Counts the verdict by state; keeps it if it is a failure. Its label."""
        state = enum_name(pb.ValidationState, validated.verdict.state, "VALIDATION_STATE_")
        if state in self._verdicts or len(self._verdicts) < MAX_VERDICT_STATES:
            self._verdicts[state] += 1
        if state in FAILURES:
            diagnostics = validated.verdict.diagnostics.strip()
            self._failures.append(
                {
                    "seq": seq,
                    "artifact_id": validated.artifact_id,
                    "component_id": validated.component_id[:200],
                    "contributor": validated.contributor_id,
                    "state": state,
                    "diagnostic": diagnostics.splitlines()[0][:DIAGNOSTIC_CHARS]
                    if diagnostics
                    else "",
                }
            )
        return f"{validated.component_id}: {state}"

    def _trim_window(self, newest: int) -> None:
        if len(self._shares) > WINDOW_SECONDS:
            for second in sorted(self._shares)[: len(self._shares) - WINDOW_SECONDS]:
                del self._shares[second]
        for second in [s for s in self._shares if s < newest - WINDOW_SECONDS]:
            del self._shares[second]

    def _add_edge(self, pair: tuple[str, str]) -> None:
        self._edges[pair] += 1
        if len(self._edges) > MAX_EDGES:
            # Forget the quietest pairs (a tenth, so this runs rarely).
            for quiet, _ in self._edges.most_common()[-(MAX_EDGES // 10) :]:
                del self._edges[quiet]

    def stats(self, stats: pb.GetHubStatsResponse) -> None:
        self.hub_stats = to_json(stats)
        self.hub_stats.get("knowledge_base", {}).pop("recent_artifacts", None)

    def presence(self, update: pb.PresenceUpdate) -> None:
        """Who is online, from the Watch stream: a roster (after the stream starts, or
        after it fell far behind) replaces the table; later updates change it."""
        if update.roster and not self._in_roster:
            self.online = {}
            self.online_truncated = False
        self._in_roster = update.roster and not update.roster_complete
        for agent in update.online:
            self._joined(agent)
        for agent_id in update.offline:
            self.online.pop(agent_id, None)

    def _joined(self, agent: pb.AgentInfo) -> None:
        if agent.agent_id not in self.online and len(self.online) >= MAX_ONLINE:
            self.online_truncated = True
            return
        self.online[agent.agent_id] = {
            "agent_id": agent.agent_id,
            "specialization": enum_name(pb.Specialization, agent.specialization, "SPECIALIZATION_"),
            "version": agent.version[:64],
            "capabilities": len(agent.capabilities),
        }

    # --- read ----------------------------------------------------------------------------

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """What the page draws, the same size however busy the hub is."""
        now = time.time() if now is None else now
        end = int(now)
        seconds = list(range(end - 120, end))  # the chart's last two minutes
        rates = {
            kind: [self._shares.get(s, Counter()).get(kind, 0) for s in seconds]
            for kind in ARTIFACT_KINDS
        }
        by_spec = Counter(a["specialization"] for a in self.online.values())
        waiting = sum(1 for r in self._requests.values() if r[2] == 0)
        edges = self._edges.most_common(GRAPH_EDGES)
        return {
            "now": now,
            "hub": self.hub_stats,
            "feed": {
                "watching": self.watching,
                "error": self.watch_error,
                "events_seen": self.events_seen,
                "last_seq": self.last_seq,
                "uptime": now - self.started,
            },
            "online_by_specialization": dict(sorted(by_spec.items())),
            "online_count": len(self.online),
            "online_truncated": self.online_truncated,
            "shares": {"seconds": seconds, "by_kind": rates},
            "shares_last_minute": {kind: sum(rates[kind][-60:]) for kind in ARTIFACT_KINDS},
            "requests": {
                "followed": len(self._requests),
                "waiting": waiting,
                "delivered": len(self._requests) - waiting,
                "recent": [
                    {"request_id": rid, "feature": f, "requester": who, "deliveries": n}
                    for rid, (f, who, n) in list(self._requests.items())[-10:][::-1]
                ],
            },
            "graph": [{"a": a, "b": b, "count": n} for (a, b), n in edges],
            "top_contributors": self._contributors.most_common(TOP_CONTRIBUTORS),
            "recent_events": list(self._recent)[::-1],
            "other_events": dict(self._other_kinds),
            "validation": self._validation(),
        }

    def _validation(self) -> dict[str, Any]:
        judged = sum(n for state, n in self._verdicts.items() if state in JUDGED)
        return {
            "verdicts": sum(self._verdicts.values()),
            "by_state": dict(sorted(self._verdicts.items())),
            "pass_rate": self._verdicts["PASSED"] / judged if judged else None,
            "recent_failures": list(self._failures)[::-1],
        }

    def agents_page(self, offset: int, limit: int) -> dict[str, Any]:
        ids = sorted(self.online)[offset : offset + limit]
        return {
            "total": len(self.online),
            "offset": offset,
            "agents": [self.online[i] for i in ids],
        }
