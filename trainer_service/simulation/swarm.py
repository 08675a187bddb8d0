"""Many trainers in one event loop, with a live table while they run and a
summary at the end; optionally with its own in-process hub so a demo needs
nothing else running."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from generated.kernelhub.v1 import hub_pb2 as pb
from trainer_service.sdk.client import HubClient
from trainer_service.sdk.errors import HubError
from trainer_service.sdk.targets import parse_hub_target
from trainer_service.simulation.behavior import Behavior
from trainer_service.simulation.capabilities import SPECIALIZATION_NAMES, parse_specialization
from trainer_service.simulation.trainer import NetworkedKernelTrainer, TrainingMetrics

MAX_SWARM_SIZE: Final = 256
REFRESH_PER_SECOND: Final = 4
# Time after the duration for trainers to finish sends and disconnect before
# the swarm stops waiting for them.
SHUTDOWN_ALLOWANCE_SECONDS: Final = 60.0
# Hub syncs every 30 s at tempo 1; a faster swarm gets proportionally faster syncs.
BASE_SYNC_INTERVAL_SECONDS: Final = 30.0

log = logging.getLogger(__name__)


def agent_ids(count: int) -> list[str]:
    return [f"AI_Node_{i}" for i in range(1, count + 1)]


def validator_ids(count: int) -> list[str]:
    return [f"validator_{i}" for i in range(1, count + 1)]


VALIDATOR_STOP_SECONDS: Final = 15.0  # a validator finishes its component, then exits


@contextlib.asynccontextmanager
async def validator_processes(
    target: str, tokens: Mapping[str, str], *, sandbox: bool = True
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """`kernelhub-validator run` per (id, token), each in its own process (the trainer never
    imports the validator: it runs untrusted builds and should not share the swarm's loop);
    stopped with SIGTERM when the block ends."""
    processes: list[asyncio.subprocess.Process] = []
    with tempfile.TemporaryDirectory(prefix="kernelhub-validators-") as directory:
        try:
            for validator_id, token in tokens.items():
                token_file = Path(directory) / validator_id
                token_file.write_text(token)
                token_file.chmod(0o600)
                argv = [sys.executable, "-m", "validator_service", "run", "--hub", target]
                argv += ["--token-file", str(token_file), "--name", validator_id]
                argv += ["--log-level", "WARNING"] + ([] if sandbox else ["--no-sandbox"])
                processes.append(
                    await asyncio.create_subprocess_exec(
                        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL
                    )
                )
            yield processes
        finally:
            for process in processes:
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.send_signal(signal.SIGTERM)
            for process in processes:
                try:
                    await asyncio.wait_for(process.wait(), VALIDATOR_STOP_SECONDS)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGKILL)
                    await process.wait()


def specialization_for(index: int) -> str:
    """AI_Node_1 gets the first specialization, and so on round the eight."""
    return SPECIALIZATION_NAMES[index % len(SPECIALIZATION_NAMES)]


@dataclass(frozen=True)
class SwarmResult:
    trainers: Sequence[NetworkedKernelTrainer]
    stats: pb.GetHubStatsResponse | None
    elapsed_seconds: float

    @property
    def failures(self) -> list[NetworkedKernelTrainer]:
        return [t for t in self.trainers if t.status != "done"]


class EmbeddedHubUnavailable(RuntimeError):
    """hub_service is missing or broken, so the swarm cannot run its own hub."""


MAX_REPLICAS: Final = 16
REPLICAS_NEED_POSTGRESQL: Final = (
    "hub replicas share one PostgreSQL database: --replicas needs "
    "--database-url postgresql+psycopg://USER@HOST/DATABASE (SQLite is one process's)"
)


@contextlib.asynccontextmanager
async def embedded_hub(
    db: Path | None,
    *,
    tempo: float,
    agents: Sequence[str],
    observers: Sequence[str] = (),
    validators: Sequence[str] = (),
    database_url: str | None = None,
    replicas: int = 0,
) -> AsyncIterator[tuple[str, dict[str, str], str]]:
    """Starts a hub in this process on SQLite (a temp dir unless `db`) or on `database_url`,
    or with `replicas`, that many hub replica processes on `database_url` (PostgreSQL), and
    issues a token per agent, an observer token per `observers` name (a dashboard's) and a
    validator's per validator; yields (target, tokens, database URL). The replicas' target
    names them all: the trainers spread over them and fail over across them."""
    if replicas and not (database_url or "").startswith("postgresql"):
        raise EmbeddedHubUnavailable(REPLICAS_NEED_POSTGRESQL)
    if not 0 <= replicas <= MAX_REPLICAS:
        raise ValueError(f"replicas must be between 0 and {MAX_REPLICAS}, got {replicas}")
    try:
        from hub_service.config import HubConfig
        from hub_service.roles import Role
        from hub_service.testing import TestHub, die_with_parent
    except ImportError as exc:
        raise EmbeddedHubUnavailable(
            f"the embedded hub needs hub_service, which failed to import: {exc}"
        ) from exc
    sync_interval = max(1.0, BASE_SYNC_INTERVAL_SECONDS / tempo)
    async with contextlib.AsyncExitStack() as stack:
        if database_url is None:
            if db is None:
                directory = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="kernelhub-swarm-")
                )
                db = Path(directory) / "kernelhub.db"
            database_url = f"sqlite:///{db}"
        if replicas:
            hubs = [
                TestHub.subprocess(
                    database_url,
                    args=["--replica", "true", "--training-sync-interval", str(sync_interval)],
                    env={"KERNELHUB_LOG_LEVEL": "WARNING"},
                    name=f"replica{i + 1}",
                    # A SIGKILLed swarm leaves no replica serving on its own.
                    preexec_fn=die_with_parent,
                )
                for i in range(replicas)
            ]
            for hub in hubs:
                stack.push_async_callback(hub.close)
            try:  # one failing cancels the others' starts (gather would leave them running)
                async with asyncio.TaskGroup() as starting:
                    for hub in hubs:
                        starting.create_task(hub.start())
            except* RuntimeError as group:  # HubStartError: its stderr says why
                raise EmbeddedHubUnavailable(
                    f"a hub replica did not start: {group.exceptions[0]}"
                ) from group.exceptions[0]
            issuer = hubs[0]
            # gRPC's own form (ipv4:a,b), which the validators' and dashboard's plain
            # channels take too (they connect to the first; the trainers spread).
            target = parse_hub_target(",".join(hub.target for hub in hubs)).target
        else:
            config = HubConfig(
                host="127.0.0.1",
                port=0,
                database_url=database_url,
                training_sync_interval=sync_interval,
            )
            issuer = await stack.enter_async_context(TestHub.in_process(config))
            target = issuer.target
        tokens = await issuer.issue_tokens(*agents)
        if observers:
            tokens |= await issuer.issue_tokens(*observers, role=Role.OBSERVER)
        if validators:
            tokens |= await issuer.issue_tokens(*validators, role=Role.VALIDATOR)
        yield target, tokens, database_url


async def fetch_stats(
    target: str, agent_id: str, token: str, credentials: grpc.ChannelCredentials | None
) -> pb.GetHubStatsResponse | None:
    """Hub totals for the summary; a failure here only costs that table."""
    try:
        async with HubClient(
            target, agent_id, token, stream=False, credentials=credentials
        ) as client:
            return await client.stats()
    except HubError as error:
        log.warning("could not fetch hub stats: %s", error)
        return None


async def run_swarm(
    *,
    target: str,
    tokens: Mapping[str, str],
    count: int,
    duration_seconds: float,
    seed: int,
    tempo: float,
    credentials: grpc.ChannelCredentials | None = None,
    behavior_factory: Callable[[], Behavior] | None = None,
    console: Console | None = None,
    stop: asyncio.Event | None = None,
    subscribe_all: bool = False,
) -> SwarmResult:
    """Runs AI_Node_1..N against `target` until the duration ends (or `stop` is
    set), showing a live table on `console` (none if it is None)."""
    if not 1 <= count <= MAX_SWARM_SIZE:
        raise ValueError(f"count must be between 1 and {MAX_SWARM_SIZE}, got {count}")
    trainers = [
        NetworkedKernelTrainer(
            agent_id,
            parse_specialization(specialization_for(i)),
            target,
            tokens[agent_id],
            behavior=behavior_factory() if behavior_factory else None,
            seed=seed,
            tempo=tempo,
            credentials=credentials,
            subscribe_all=subscribe_all,
        )
        for i, agent_id in enumerate(agent_ids(count))
    ]
    started = time.monotonic()
    deadline = started + duration_seconds
    tasks = [
        asyncio.create_task(_run_one(trainer, duration_seconds), name=trainer.agent_id)
        for trainer in trainers
    ]
    hard_stop = duration_seconds + SHUTDOWN_ALLOWANCE_SECONDS
    live = (
        Live(
            _live_view(trainers, deadline),
            console=console,
            refresh_per_second=REFRESH_PER_SECOND,
            transient=True,
        )
        if console is not None
        else contextlib.nullcontext()
    )
    try:
        with live:
            while not all(t.done() for t in tasks) and time.monotonic() - started < hard_stop:
                await asyncio.wait(tasks, timeout=1.0 / REFRESH_PER_SECOND)
                if stop is not None and stop.is_set():
                    for trainer in trainers:
                        trainer.stop()
                if isinstance(live, Live):
                    live.update(_live_view(trainers, deadline))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=SHUTDOWN_ALLOWANCE_SECONDS)
    first = trainers[0]
    stats = await fetch_stats(target, first.agent_id, tokens[first.agent_id], credentials)
    return SwarmResult(trainers, stats, time.monotonic() - started)


async def _run_one(trainer: NetworkedKernelTrainer, duration_seconds: float) -> TrainingMetrics:
    """One trainer's failure is reported in the table, not raised into the others."""
    try:
        await trainer.run(duration_seconds)
    except HubError:
        pass  # on trainer.error, shown in the summary
    except Exception:
        log.exception("%s crashed", trainer.agent_id)
    return trainer.metrics


_STATUS_STYLE: Final = {
    "idle": "dim",
    "connecting": "yellow",
    "running": "green",
    "stopping": "cyan",
    "done": "bold green",
    "failed": "bold red",
}


def _live_view(trainers: Sequence[NetworkedKernelTrainer], deadline: float) -> Group:
    remaining = max(0.0, deadline - time.monotonic())
    table = Table(title=f"kernelhub swarm: {len(trainers)} trainers, {remaining:.0f}s left")
    for column, justify in (
        ("Agent", "left"),
        ("Specialization", "left"),
        ("Status", "left"),
        ("Patterns", "right"),
        ("Components", "right"),
        ("Received", "right"),
        ("Collab open/done", "right"),
        ("Features req/impl", "right"),
        ("Errors", "right"),
    ):
        table.add_column(column, justify=justify, no_wrap=column == "Agent")  # type: ignore[arg-type]
    for t in trainers:
        m = t.metrics
        table.add_row(
            t.agent_id,
            t.specialization_name,
            Text(t.status, style=_STATUS_STYLE.get(t.status, "")),
            str(m.patterns_generated),
            str(m.components_created),
            str(m.artifacts_received),
            f"{t.open_collaborations}/{m.collaborations_completed}",
            f"{m.features_requested}/{m.features_implemented}",
            Text(str(m.errors), style="red" if m.errors else ""),
        )
    return Group(table)


def _result(trainer: NetworkedKernelTrainer) -> Text:
    if trainer.error is not None:
        return Text(str(trainer.error), style="red")
    if trainer.status != "done":
        return Text(trainer.status, style="red")
    return Text("ok", style="green")


def summary_tables(result: SwarmResult) -> list[Table]:
    """Per trainer: shared, received, collaborations, features; then hub totals."""
    per_trainer = Table(title=f"Swarm summary ({result.elapsed_seconds:.1f}s)")
    per_trainer.add_column("Agent", no_wrap=True)
    per_trainer.add_column("Specialization")
    per_trainer.add_column("Shared", justify="right")
    per_trainer.add_column("Received", justify="right")
    per_trainer.add_column("Collaborations\nprop/acc/done", justify="right")
    per_trainer.add_column("Features\nreq/impl/recv/adopted", justify="right")
    per_trainer.add_column("Components\nvalidated/passed/failed", justify="right")
    per_trainer.add_column("Errors", justify="right")
    per_trainer.add_column("Result")
    for t in result.trainers:
        m = t.metrics
        per_trainer.add_row(
            t.agent_id,
            t.specialization_name,
            str(m.shared),
            str(m.artifacts_received),
            f"{m.collaborations_proposed}/{m.collaborations_accepted}/{m.collaborations_completed}",
            f"{m.features_requested}/{m.features_implemented}/{m.features_received}"
            f"/{m.features_adopted}",
            f"{m.components_validated}/{m.components_passed}/{m.components_failed}",
            str(m.errors),
            _result(t),
        )
    tables = [per_trainer]
    if result.stats is not None:
        s = result.stats
        kb = s.knowledge_base
        hub = Table(title=f"Hub totals (hub {s.hub_version or '?'})")
        hub.add_column("Measure")
        hub.add_column("Value", justify="right")
        rows = [
            ("Agents known", s.agents_known),
            ("Agents online", s.agents_online),
            ("Patterns", kb.pattern_count),
            ("Code components", kb.code_component_count),
            ("OS components", kb.os_component_count),
            ("Feature requests", kb.feature_request_count),
            ("Feature deliveries", s.feature_delivery_count),
            *(
                (
                    "Collaborations "
                    + state.removeprefix("COLLABORATION_STATE_").lower().replace("_", " "),
                    n,
                )
                for state, n in sorted(s.collaborations_by_state.items())
            ),
            *(
                (
                    "Components "
                    + state.removeprefix("VALIDATION_STATE_").lower().replace("_", " "),
                    n,
                )
                for state, n in sorted(s.artifacts_by_validation_state.items())
            ),
            ("Validation pass rate", f"{s.validation_pass_rate:.0%}"),
            ("Head seq", s.head_seq),
        ]
        for name, value in rows:
            hub.add_row(name, str(value))
        tables.append(hub)
    return tables
