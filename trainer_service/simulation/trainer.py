"""One trainer agent: the prototype's training loop and collaboration flows on
top of `HubClient`, with every decision delegated to a `Behavior`.

Two activities run side by side for the length of a run: the training cycle
(share a pattern, share a code component, sometimes ask for a feature, rest)
and the event consumer (learn from others' artifacts, build requested
features, propose/accept/work on collaborations). Anything that sends from
the consumer runs in a bounded set of helper tasks, never inline: a receipt
arrives on the same stream as the events, so awaiting it inside the event
loop could wait on itself.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Coroutine
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, Final, TypeVar

import grpc

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.complementarity import complements
from trainer_service.sdk.client import DEFAULT_TARGET, HubClient
from trainer_service.sdk.errors import ClientClosed, FailedPrecondition, HubError, NotFound
from trainer_service.simulation.behavior import (
    MAX_OPEN_COLLABORATIONS,
    Behavior,
    BehaviorContext,
    SimulatedBehavior,
    TrainerState,
    VerdictHook,
)
from trainer_service.simulation.capabilities import (
    Specialization,
    capabilities_for,
    parse_specialization,
    specialization_name,
)

_T = TypeVar("_T")

# Bounds on everything the trainer keeps or runs concurrently.
MAX_HELPER_TASKS: Final = 64
MAX_COLLABORATION_WORKERS: Final = 16
MAX_TRACKED_SESSIONS: Final = 256
MAX_KNOWN_PEERS: Final = 4096
MAX_PROPOSALS_PER_SYNC: Final = 2
MAX_PROGRESS_STEPS: Final = 25
MIN_PROGRESS_STEP: Final = 0.05
# Feature requests and proposals older than this (replayed after a long
# absence) are not acted on: their requester has moved on or the hub expired them.
MAX_ACTIONABLE_AGE_SECONDS: Final = 600.0

_ACTIVE_STATES: Final = frozenset({pb.COLLABORATION_STATE_PROPOSED, pb.COLLABORATION_STATE_ACTIVE})


@dataclass
class TrainingMetrics:
    patterns_generated: int = 0
    components_created: int = 0
    features_requested: int = 0
    features_implemented: int = 0
    features_received: int = 0
    collaborations_proposed: int = 0
    collaborations_accepted: int = 0
    collaborations_declined: int = 0
    collaborations_completed: int = 0
    events_received: int = 0
    artifacts_received: int = 0
    syncs_received: int = 0
    errors: int = 0
    # Verdicts on this trainer's own components (the validators' word, not its own).
    components_validated: int = 0
    components_passed: int = 0
    components_failed: int = 0  # FAILED or TIMED_OUT: the code's fault
    # Feature requests of this trainer for which it adopted a delivery that passed validation.
    features_adopted: int = 0

    @property
    def shared(self) -> int:
        """Everything this trainer put into the knowledge base."""
        return self.patterns_generated + self.components_created + self.features_implemented

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class Deliveries:
    """The deliveries of this trainer's feature requests, and which it adopted: the best
    validated one (PASSED, then the most line coverage, then the first). Bounded: the
    oldest deliveries are forgotten."""

    def __init__(self, limit: int = 1024) -> None:
        self._request_of: dict[str, str] = {}  # artifact id -> request id, oldest first
        self._adopted: dict[str, float] = {}  # request id -> coverage of the adopted one
        self._limit = limit

    def note(self, artifact_id: str, request_id: str) -> None:
        self._request_of[artifact_id] = request_id
        while len(self._request_of) > self._limit:
            forgotten = self._request_of.pop(next(iter(self._request_of)))
            if forgotten not in self._request_of.values():
                self._adopted.pop(forgotten, None)

    def judge(self, validated: pb.ArtifactValidated) -> tuple[str, bool] | None:
        """(request id, whether it is the request's first adoption) if this verdict makes
        its delivery the one to adopt; None otherwise."""
        request_id = self._request_of.pop(validated.artifact_id, None)
        verdict = validated.verdict
        if request_id is None or verdict.state != pb.VALIDATION_STATE_PASSED:
            return None
        best = self._adopted.get(request_id)
        if best is not None and verdict.line_coverage <= best:
            return None
        self._adopted[request_id] = verdict.line_coverage
        return request_id, best is None


class KnowledgeBase:
    """What a trainer learned from others, bounded: counts per kind and the
    ids of the most recent artifacts (the hub holds the rest)."""

    def __init__(self, recent: int = 100) -> None:
        self.counts: Counter[str] = Counter()
        self.contributors: Counter[str] = Counter()
        self.recent: deque[str] = deque(maxlen=recent)

    def learn(self, artifact: pb.Artifact) -> None:
        kind = artifact.WhichOneof("content") or "unknown"
        self.counts[kind] += 1
        if len(self.contributors) < MAX_KNOWN_PEERS or artifact.contributor_id in self.contributors:
            self.contributors[artifact.contributor_id] += 1
        self.recent.append(artifact.artifact_id)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _describe_artifact(artifact: pb.Artifact) -> str:
    content = artifact.WhichOneof("content")
    if content == "pattern":
        return f"pattern {artifact.pattern.pattern_id}"
    if content == "code_component":
        return f"component {artifact.code_component.component_id}"
    if content == "os_component":
        return f"OS component {artifact.os_component.name}"
    return f"artifact {artifact.artifact_id}"


def interests(specialization: Specialization) -> pb.Subscription:
    """What a reference trainer subscribes to: shares and requests of its own
    specialization and of those that complement it (what it can learn from and pair
    with); presence; and, as for everyone, whatever is addressed to it."""
    return pb.Subscription(
        specializations=[specialization, *complements(specialization)],  # type: ignore[list-item]
    )


def _raise_failure(*tasks: asyncio.Task[None]) -> None:
    """Re-raises the first exception among finished tasks (a fatal hub error or a bug)."""
    for task in tasks:
        if task.done() and not task.cancelled():
            error = task.exception()
            if error is not None:
                raise error


def _collab_type_name(value: pb.CollaborationType.ValueType) -> str:
    try:
        return pb.CollaborationType.Name(value).removeprefix("COLLABORATION_TYPE_").lower()
    except ValueError:
        return "unknown"


class NetworkedKernelTrainer:
    """A trainer agent. `await trainer.run(seconds)` connects, trains, and
    returns its metrics; a fatal hub error (bad token, superseded, hub gone
    for good) is raised after a clean shutdown."""

    def __init__(
        self,
        agent_id: str,
        specialization: Specialization | str,
        target: str = DEFAULT_TARGET,
        token: str = "",
        *,
        behavior: Behavior | None = None,
        seed: int | str = 0,
        tempo: float = 1.0,
        credentials: grpc.ChannelCredentials | None = None,
        connect_timeout: float = 10.0,
        reconnect_timeout: float = 60.0,
        stop_grace: float = 10.0,
        subscribe_all: bool = False,
    ) -> None:
        """`subscribe_all`: receive every share and request, not only those of this
        trainer's specialization and its complements (`interests`)."""
        if not tempo > 0 or not math.isfinite(tempo):
            raise ValueError(f"tempo must be a positive number, got {tempo}")
        self.agent_id = agent_id
        self.specialization: Specialization = (
            parse_specialization(specialization)
            if isinstance(specialization, str)
            else specialization
        )
        self.capabilities = tuple(capabilities_for(self.specialization))
        self.target = target
        self._token = token
        self.behavior: Behavior = behavior if behavior is not None else SimulatedBehavior()
        self.tempo = tempo
        self._credentials = credentials
        self._connect_timeout = connect_timeout
        self._reconnect_timeout = reconnect_timeout
        self._stop_grace = stop_grace
        self._subscribe_all = subscribe_all
        # Separate streams so the training cycle's draws don't depend on how
        # network events happened to interleave with it.
        self._cycle_rng = random.Random(f"{seed}:{agent_id}:cycle")
        self._event_rng = random.Random(f"{seed}:{agent_id}:events")

        self.metrics = TrainingMetrics()
        self.knowledge = KnowledgeBase()
        self._deliveries = Deliveries()  # of its feature requests, to adopt the best
        self.status = "idle"
        self.error: HubError | None = None
        self._log = logging.LoggerAdapter(logging.getLogger(__name__), {"agent_id": agent_id})

        self._hub: HubClient | None = None
        self._stop = asyncio.Event()
        self._cycle = 0
        # Makes the trainer's own artifact ids unique across runs of the same agent.
        self._run_id = f"{int(time.time() * 1000) & 0xFFFFFFFF:08x}"
        self._sessions: dict[str, pb.Collaboration] = {}
        self._accepting: set[str] = set()
        self._deciding: set[str] = set()
        self._proposing: set[str] = set()
        self._workers: dict[str, asyncio.Task[None]] = {}
        # Sessions this trainer completed, so a late ACTIVE update doesn't restart the work.
        self._completed_here: deque[str] = deque(maxlen=MAX_TRACKED_SESSIONS)
        self._helpers: set[asyncio.Task[None]] = set()
        self._peers: dict[str, Specialization] = {}
        self._log.info(
            "NetworkedKernelTrainer initialized: %s (%s)",
            agent_id,
            specialization_name(self.specialization),
        )

    @property
    def specialization_name(self) -> str:
        return specialization_name(self.specialization)

    @property
    def open_collaborations(self) -> int:
        """Sessions this trainer works on (it accepted them), as in the prototype's
        load limit; sessions it proposed are the partner's work."""
        working = sum(
            1
            for c in self._sessions.values()
            if c.state == pb.COLLABORATION_STATE_ACTIVE and c.target_id == self.agent_id
        )
        return working + len(self._accepting)

    def stop(self) -> None:
        """Ends the run early, as if the duration had passed."""
        self._stop.set()

    # ------------------------------------------------------------------
    # The run
    # ------------------------------------------------------------------

    async def run(self, duration_seconds: float) -> TrainingMetrics:
        if not duration_seconds > 0:
            raise ValueError(f"duration must be positive, got {duration_seconds}")
        if self.status != "idle":
            raise RuntimeError("a trainer runs once; create a new one")
        loop = asyncio.get_running_loop()
        self.status = "connecting"
        client = HubClient(
            self.target,
            self.agent_id,
            self._token,
            specialization=self.specialization,
            capabilities=self.capabilities,
            credentials=self._credentials,
            # A fresh trainer has no saved seq: the network's history is not its work.
            skip_history=True,
            subscription=None if self._subscribe_all else interests(self.specialization),
            connect_timeout=self._connect_timeout,
            reconnect_timeout=self._reconnect_timeout,
        )
        try:
            async with client as hub:
                self._hub = hub
                self.status = "running"
                self._log.info("Connected and authenticated to hub at %s", self.target)
                self._log.info("Starting collaborative training for %gs", duration_seconds)
                timer = loop.call_later(duration_seconds, self._stop.set)
                try:
                    await self._train(hub)
                finally:
                    timer.cancel()
                    self.status = "stopping"
        except HubError as error:
            self.error = error
            self.status = "failed"
            self._log.error("Training stopped: %s", error)
            raise
        except BaseException:
            self.status = "failed"
            raise
        finally:
            self._hub = None
        self.status = "done"
        self._log.info("Training session completed")
        self._log.info("Final metrics: %s", self.metrics.as_dict())
        return self.metrics

    async def _train(self, hub: HubClient) -> None:
        cycles = asyncio.create_task(self._training_loop(hub), name=f"{self.agent_id}-cycles")
        consumer = asyncio.create_task(self._consume(hub), name=f"{self.agent_id}-events")
        stopping = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({cycles, consumer, stopping}, return_when=asyncio.FIRST_COMPLETED)
            self._stop.set()
            _raise_failure(cycles, consumer)
            # Graceful: let the current cycle and in-flight helpers finish their sends.
            loop = asyncio.get_running_loop()
            grace_end = loop.time() + self._stop_grace
            await asyncio.wait({cycles}, timeout=self._stop_grace)
            busy = {*self._helpers, *self._workers.values()}
            if busy:
                await asyncio.wait(busy, timeout=max(0.1, grace_end - loop.time()))
            _raise_failure(cycles, consumer)
        finally:
            leftovers: list[asyncio.Task[Any]] = [
                cycles,
                consumer,
                stopping,
                *self._helpers,
                *self._workers.values(),
            ]
            for task in leftovers:
                task.cancel()
            await asyncio.wait(leftovers, timeout=self._stop_grace)

    async def _sleep(self, seconds: float) -> bool:
        """Sleeps seconds/tempo; False (at once) when the run is stopping."""
        if self._stop.is_set():
            return False
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=seconds / self.tempo)
        except TimeoutError:
            return True
        return False

    def _context(self, rng: random.Random) -> BehaviorContext:
        initiated = sum(
            1
            for c in self._sessions.values()
            if c.state == pb.COLLABORATION_STATE_PROPOSED and c.initiator_id == self.agent_id
        )
        return BehaviorContext(
            agent_id=self.agent_id,
            specialization=self.specialization,
            capabilities=self.capabilities,
            rng=rng,
            state=TrainerState(
                run_id=self._run_id,
                cycle=self._cycle,
                open_collaborations=self.open_collaborations,
                pending_proposals=initiated + len(self._proposing),
                patterns_shared=self.metrics.patterns_generated,
                components_shared=self.metrics.components_created,
                artifacts_known=self.knowledge.total,
                peers=MappingProxyType(dict(self._peers)),
            ),
        )

    async def _send(self, what: str, send: Awaitable[_T]) -> _T | None:
        """A refused message is logged and counted, not fatal; the end of the
        session (bad token, superseded, gave up reconnecting) is."""
        try:
            return await send
        except HubError as error:
            hub = self._hub
            if hub is not None and hub.terminal_error is not None:
                raise hub.terminal_error from error
            if isinstance(error, ClientClosed):
                raise
            self.metrics.errors += 1
            self._log.warning("Failed to %s: %s", what, error)
            return None

    async def _decide(self, what: str, decision: Awaitable[_T]) -> _T | None:
        """A behavior that raises loses that one decision, not the run."""
        try:
            return await decision
        except Exception:
            self.metrics.errors += 1
            self._log.exception("Behavior failed to %s", what)
            return None

    # ------------------------------------------------------------------
    # Training cycle
    # ------------------------------------------------------------------

    async def _training_loop(self, hub: HubClient) -> None:
        rng = self._cycle_rng
        while not self._stop.is_set():
            self._cycle += 1
            if not await self._sleep(rng.uniform(0.5, 2.0)):  # thinking
                return
            pattern = await self._decide(
                "generate a pattern", self.behavior.generate_pattern(self._context(rng))
            )
            if pattern is not None:
                receipt = await self._send("share pattern", hub.share_pattern(pattern))
                if receipt is not None:
                    self.metrics.patterns_generated += 1
                    self._log.info(
                        "Shared pattern: %s (artifact %s)", pattern.pattern_id, receipt.resource_id
                    )
            if not await self._sleep(rng.uniform(1.0, 3.0)):  # coding
                return
            component = await self._decide(
                "generate a code component",
                self.behavior.generate_code_component(self._context(rng)),
            )
            if component is not None:
                receipt = await self._send(
                    "share code component", hub.share_code_component(component)
                )
                if receipt is not None:
                    self.metrics.components_created += 1
                    self._log.info(
                        "Shared code component: %s (artifact %s)",
                        component.component_id,
                        receipt.resource_id,
                    )
            request = await self._decide(
                "choose a feature request",
                self.behavior.choose_feature_request(self._context(rng)),
            )
            if request is not None and not self._stop.is_set():
                receipt = await self._send(
                    f"request feature {request.feature}",
                    hub.request_feature(request.feature, request.requirements, request.description),
                )
                if receipt is not None:
                    self.metrics.features_requested += 1
                    self._log.info(
                        "Requested feature: %s (request %s)", request.feature, receipt.resource_id
                    )
            if not await self._sleep(rng.uniform(5.0, 15.0)):  # rest
                return

    # ------------------------------------------------------------------
    # Events
    # ------------------------------------------------------------------

    async def _consume(self, hub: HubClient) -> None:
        async for item in hub.events():
            if isinstance(item, pb.TrainingSync):
                self.metrics.syncs_received += 1
                await self._on_sync(item)
            else:
                self.metrics.events_received += 1
                self._on_event(item)

    def _spawn(self, what: str, work: Coroutine[Any, Any, None]) -> bool:
        if len(self._helpers) >= MAX_HELPER_TASKS:
            work.close()
            self.metrics.errors += 1
            self._log.warning("Too busy to %s; skipped", what)
            return False
        task = asyncio.create_task(self._guarded(what, work))
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)
        return True

    async def _guarded(self, what: str, work: Awaitable[None]) -> None:
        try:
            await work
        except HubError as error:
            # Terminal errors also reach the consumer through events(); nothing else to do.
            self._log.debug("Stopped trying to %s: %s", what, error)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.metrics.errors += 1
            self._log.exception("Failed to %s", what)

    def _remember_peer(self, agent_id: str, specialization: Specialization) -> None:
        if agent_id == self.agent_id:
            return
        if agent_id not in self._peers and len(self._peers) >= MAX_KNOWN_PEERS:
            self._peers.pop(next(iter(self._peers)))
        self._peers[agent_id] = specialization

    def _is_stale(self, event: pb.HubEvent) -> bool:
        if not event.HasField("create_time"):
            return False
        age = time.time() - event.create_time.ToMicroseconds() / 1e6
        return age > MAX_ACTIONABLE_AGE_SECONDS

    def _on_event(self, event: pb.HubEvent) -> None:
        body = event.WhichOneof("body")
        if body == "artifact_shared":
            artifact = event.artifact_shared
            if artifact.contributor_id != self.agent_id:
                self.knowledge.learn(artifact)
                self.metrics.artifacts_received += 1
                self._log.info(
                    "Learned %s from %s", _describe_artifact(artifact), artifact.contributor_id
                )
        elif body == "feature_requested":
            request = event.feature_requested.request
            if request.requester_id == self.agent_id or self._stop.is_set():
                return
            if self._is_stale(event):
                self._log.info("Ignoring stale feature request %s", request.request_id)
                return
            self._log.info("Feature request from %s: %s", request.requester_id, request.feature)
            self._spawn(f"build feature {request.feature}", self._build_and_deliver(request))
        elif body == "feature_delivered":
            delivered = event.feature_delivered
            self.metrics.features_received += 1
            self._deliveries.note(delivered.artifact.artifact_id, delivered.request_id)
            self.knowledge.learn(delivered.artifact)
            self._log.info(
                "Feature delivered for request %s by %s",
                delivered.request_id,
                event.sender_id or delivered.artifact.contributor_id,
            )
        elif body == "artifact_validated":
            self._on_validated(event.artifact_validated)
        elif body == "collaboration_updated":
            self._on_collaboration(event, event.collaboration_updated.collaboration)

    def _on_validated(self, validated: pb.ArtifactValidated) -> None:
        """A verdict: on a delivery to this trainer, perhaps the one it adopts; on its own
        component, counted, logged and handed to the behaviour's `on_verdict` hook."""
        adopted = self._deliveries.judge(validated)
        if adopted is not None:
            request_id, first = adopted
            if first:
                self.metrics.features_adopted += 1
            self._log.info(
                "Adopted delivery %s from %s for request %s (%.0f%% line coverage)",
                validated.artifact_id,
                validated.contributor_id,
                request_id,
                validated.verdict.line_coverage * 100,
            )
        if validated.contributor_id != self.agent_id:
            return
        verdict = validated.verdict
        self.metrics.components_validated += 1
        state = pb.ValidationState.Name(verdict.state)
        if verdict.state == pb.VALIDATION_STATE_PASSED:
            self.metrics.components_passed += 1
            self._log.info(
                "Component %s PASSED (%d/%d self-tests, %.0f%% line coverage)",
                validated.component_id,
                verdict.tests_passed,
                verdict.tests_run,
                verdict.line_coverage * 100,
            )
        else:
            if verdict.state in (pb.VALIDATION_STATE_FAILED, pb.VALIDATION_STATE_TIMED_OUT):
                self.metrics.components_failed += 1
            self._log.warning(
                "Component %s %s: %s",
                validated.component_id,
                state.removeprefix("VALIDATION_STATE_"),
                verdict.diagnostics.splitlines()[0] if verdict.diagnostics else "no diagnostics",
            )
        if isinstance(self.behavior, VerdictHook) and not self._stop.is_set():
            self._spawn(
                "react to a verdict",
                self.behavior.on_verdict(self._context(self._event_rng), validated),
            )

    async def _on_sync(self, sync: pb.TrainingSync) -> None:
        # Who is online is presence (state the client keeps), not events.
        online = self._hub.online.values() if self._hub is not None else ()
        for agent in [*sync.active_agents, *online]:
            self._remember_peer(agent.agent_id, agent.specialization)
        self._log.info(
            "Synced with %d active AIs, %d collaboration opportunities",
            len(sync.active_agents),
            len(sync.opportunities),
        )
        if self._stop.is_set():
            return
        partners = {
            c.initiator_id if c.target_id == self.agent_id else c.target_id
            for c in self._sessions.values()
        }
        proposed = 0
        for opportunity in sync.opportunities:
            if proposed >= MAX_PROPOSALS_PER_SYNC:
                break
            other = opportunity.agent_id
            if other == self.agent_id or other in partners or other in self._proposing:
                continue
            wanted = await self._decide(
                "decide on a proposal",
                self.behavior.should_propose(self._context(self._event_rng), opportunity),
            )
            if not wanted:
                continue
            self._proposing.add(other)
            if self._spawn(f"propose a collaboration to {other}", self._propose(opportunity)):
                proposed += 1
            else:
                self._proposing.discard(other)

    async def _propose(self, opportunity: pb.CollaborationOpportunity) -> None:
        hub = self._require_hub()
        other = opportunity.agent_id
        try:
            kind = (
                pb.COLLABORATION_TYPE_CODE_REVIEW
                if opportunity.specialization == self.specialization
                else pb.COLLABORATION_TYPE_CROSS_SPECIALIZATION
            )
            description = (
                f"{_collab_type_name(kind)} between {self.specialization_name} and "
                f"{specialization_name(opportunity.specialization)}"
            )
            receipt = await self._send(
                f"propose a collaboration to {other}",
                hub.propose_collaboration(other, kind, description),
            )
            if receipt is not None:
                self.metrics.collaborations_proposed += 1
                self._log.info(
                    "Initiated %s collaboration with %s (session %s)",
                    _collab_type_name(kind),
                    other,
                    receipt.resource_id,
                )
        finally:
            self._proposing.discard(other)

    def _on_collaboration(self, event: pb.HubEvent, collab: pb.Collaboration) -> None:
        me = self.agent_id
        if me not in (collab.initiator_id, collab.target_id):
            return
        sid = collab.session_id
        partner = collab.initiator_id if collab.target_id == me else collab.target_id
        if collab.state in _ACTIVE_STATES:
            if sid not in self._sessions and len(self._sessions) >= MAX_TRACKED_SESSIONS:
                if collab.state == pb.COLLABORATION_STATE_PROPOSED and collab.target_id == me:
                    self._spawn(
                        f"decline collaboration {sid}",
                        self._answer_proposal(collab, accept=False, reason="too many sessions"),
                    )
                return
            self._sessions[sid] = collab
            if collab.state == pb.COLLABORATION_STATE_PROPOSED:
                if collab.target_id == me and sid not in self._deciding and not self._stop.is_set():
                    if self._is_stale(event):
                        self._log.info("Ignoring stale collaboration proposal %s", sid)
                        return
                    self._deciding.add(sid)
                    if not self._spawn(f"answer collaboration {sid}", self._consider(collab)):
                        self._deciding.discard(sid)
            elif (
                collab.target_id == me
                and sid not in self._workers
                and sid not in self._completed_here
                and not self._stop.is_set()
            ):
                self._start_work(collab)
            elif collab.initiator_id == me and collab.progress > 0:
                self._log.info(
                    "Collaboration %s with %s progress: %.1f%%", sid, partner, collab.progress * 100
                )
            return
        # An ended session: forget it (and stop working on it).
        self._sessions.pop(sid, None)
        worker = self._workers.pop(sid, None)
        if worker is not None and worker is not asyncio.current_task():
            worker.cancel()
        if collab.state == pb.COLLABORATION_STATE_COMPLETED:
            self.metrics.collaborations_completed += 1
            self._log.info(
                "Completed collaboration %s with %s (artifact %s)",
                sid,
                partner,
                collab.result_artifact_id,
            )
        elif collab.state == pb.COLLABORATION_STATE_DECLINED:
            self._log.info(
                "Collaboration %s with %s declined: %s", sid, partner, collab.end_reason or "-"
            )
        elif collab.state == pb.COLLABORATION_STATE_EXPIRED:
            self._log.info(
                "Collaboration %s with %s expired: %s", sid, partner, collab.end_reason or "-"
            )

    async def _consider(self, collab: pb.Collaboration) -> None:
        sid = collab.session_id
        try:
            if self.open_collaborations >= MAX_OPEN_COLLABORATIONS:
                await self._answer_proposal(
                    collab,
                    accept=False,
                    reason=f"at capacity ({MAX_OPEN_COLLABORATIONS} open collaborations)",
                )
                return
            self._accepting.add(sid)  # reserve the slot while we think
            try:
                accept = await self._decide(
                    "decide on a collaboration",
                    self.behavior.should_accept(self._context(self._event_rng), collab),
                )
                await self._answer_proposal(
                    collab, accept=bool(accept), reason="not a good fit right now"
                )
            finally:
                self._accepting.discard(sid)
        finally:
            self._deciding.discard(sid)

    async def _answer_proposal(
        self, collab: pb.Collaboration, *, accept: bool, reason: str
    ) -> None:
        hub = self._require_hub()
        sid = collab.session_id
        if accept:
            if await self._send(f"accept collaboration {sid}", hub.accept_collaboration(sid)):
                self.metrics.collaborations_accepted += 1
                self._log.info("Joined collaboration %s with %s", sid, collab.initiator_id)
        elif await self._send(
            f"decline collaboration {sid}", hub.decline_collaboration(sid, reason)
        ):
            self.metrics.collaborations_declined += 1
            self._log.info(
                "Declined collaboration %s with %s: %s", sid, collab.initiator_id, reason
            )

    def _start_work(self, collab: pb.Collaboration) -> None:
        sid = collab.session_id
        if len(self._workers) >= MAX_COLLABORATION_WORKERS:
            self.metrics.errors += 1
            self._log.warning("Too many collaborations in progress; not working on %s", sid)
            return
        task = asyncio.create_task(self._guarded(f"work on {sid}", self._work_on(collab)))
        self._workers[sid] = task
        task.add_done_callback(functools.partial(self._worker_done, sid))

    def _worker_done(self, sid: str, task: asyncio.Task[None]) -> None:
        if self._workers.get(sid) is task:
            del self._workers[sid]

    async def _work_on(self, collab: pb.Collaboration) -> None:
        """The partner that accepted does the work: progress every 2 s until done."""
        hub = self._require_hub()
        sid = collab.session_id
        rng = self._event_rng
        progress = max(0.0, min(1.0, collab.progress))
        for step in range(1, MAX_PROGRESS_STEPS + 1):
            if progress >= 1.0 or not await self._sleep(2.0):
                break
            current = self._sessions.get(sid)
            if current is None:
                return  # ended while we worked
            increment = await self._decide(
                "estimate progress", self.behavior.progress_step(self._context(rng), current)
            )
            if increment is None or not math.isfinite(increment):
                increment = MIN_PROGRESS_STEP
            progress = min(1.0, progress + max(MIN_PROGRESS_STEP, min(1.0, increment)))
            self._log.info("Collaboration %s progress: %.1f%%", sid, progress * 100)
            try:
                await hub.report_progress(
                    sid, progress, f"{self.specialization_name} work, step {step}"
                )
            except (FailedPrecondition, NotFound) as error:
                self._log.info("Collaboration %s is no longer active: %s", sid, error.message)
                return
            except HubError as error:
                if hub.terminal_error is not None:
                    raise
                self.metrics.errors += 1
                self._log.warning("Failed to report progress on %s: %s", sid, error)
        if progress < 1.0 or sid not in self._sessions:
            return
        component = await self._decide(
            "build the collaborative component",
            self.behavior.collaborative_component(
                self._context(rng), self._sessions.get(sid, collab)
            ),
        )
        if component is None:
            return
        receipt = await self._send(
            f"complete collaboration {sid}", hub.complete_collaboration(sid, component)
        )
        if receipt is not None:
            self._completed_here.append(sid)
            self._log.info(
                "Finished collaboration %s; shared %s (artifact %s)",
                sid,
                component.name,
                receipt.resource_id,
            )

    async def _build_and_deliver(self, request: pb.FeatureRequestInfo) -> None:
        hub = self._require_hub()
        if not await self._sleep(1.0):  # development time
            return
        component = await self._decide(
            f"build {request.feature}",
            self.behavior.build_feature(self._context(self._event_rng), request),
        )
        if component is None:
            self._log.info("Not building %s for %s", request.feature, request.requester_id)
            return
        receipt = await self._send(
            f"deliver {request.feature}", hub.deliver_feature(request.request_id, component)
        )
        if receipt is not None:
            self.metrics.features_implemented += 1
            self._log.info(
                "Delivered feature %s to %s (artifact %s)",
                request.feature,
                request.requester_id,
                receipt.resource_id,
            )

    def _require_hub(self) -> HubClient:
        if self._hub is None:
            raise ClientClosed("the trainer is not connected")
        return self._hub
