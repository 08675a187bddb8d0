"""The orchestrator: starts servers and loads in their own processes, collects the figures.

Every child process writes its output to files in the run's temporary directory (or a
pipe that is always read), is started with a parent-death signal, and is terminated,
then killed, when its step ends or fails. Every wait has a time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import psutil

from hub_service.testing import HubStartError, TestHub, die_with_parent

from .common import LOOPBACK, median

PYTHON = sys.executable
HUB_READY = re.compile(r"kernelhub serving on 127\.0\.0\.1:(\d+)")
BASELINE_READY = re.compile(r"baseline \w+ serving on 127\.0\.0\.1:(\d+)")
NATS_READY = re.compile(r"Listening for client connections on 127\.0\.0\.1:(\d+)")
DEFAULT_SCENARIOS = ("ingest", "fanout", "latency", "rss", "connect", "interest", "replay")
# Beside the peers (`run --peers`): NATS JetStream and the bare server, at fixed absolute rates.
PEER_SCENARIOS = ("peers_latency", "peers_ingest", "peers_fanout")
SCENARIOS = DEFAULT_SCENARIOS + PEER_SCENARIOS
# Where Debian puts nats-server (/usr/sbin is not on every PATH).
NATS_SERVER_PATHS = ("/usr/sbin/nats-server", "/usr/bin/nats-server")


class RunError(Exception):
    """A step of the run failed; the message says which and why."""


@dataclass(frozen=True)
class Sizes:
    ingest_count: int
    fanout_receivers: tuple[int, ...]
    fanout_deliveries: int  # per run; shares = max(fanout_min_count, deliveries // N)
    fanout_min_count: int
    latency_receivers: int
    latency_fractions: tuple[float, ...]  # of the hub's own max share rate; must hold 0.5
    latency_duration: float  # seconds per offered load
    latency_calibrate_count: int
    idle_trainers: int
    replay_count: int
    peer_rates: tuple[float, ...]  # absolute offered shares/s of the peers' latency points
    peer_receivers: int
    peer_duration: float  # seconds per rate and system
    peer_ingest_count: int
    peer_fanout_count: int
    connect_trainers: int = 1_000  # the connect storm (`--connect-trainers 5000` for more)
    interest_receivers: int = 1_000  # interest-filtered fan-out: trainers, 8 specializations
    # Its fixed offered rate, shares/s in all (each specialization in turn): low enough that
    # the load process, which reads every delivery, keeps up with the broadcast run. At 10
    # (10,000 deliveries/s) it did on this machine's fast days and sat at a full core on its
    # slow ones, the broadcast run's median delivery then 0.1-1.3 s behind: the figure
    # measured the load process, not the hub. At 5 it stays near 0.7 of a core.
    interest_rate: float = 5.0
    interest_duration: float = 10.0  # seconds of sharing
    sqlite_batch: int = 256
    ingest_batch: int = 16  # shares per stream message in the batched ingest run

    def fanout_count(self, receivers: int) -> int:
        return max(self.fanout_min_count, self.fanout_deliveries // receivers)


FULL = Sizes(
    ingest_count=20_000,
    fanout_receivers=(10, 50, 200),
    fanout_deliveries=200_000,
    fanout_min_count=2_000,
    latency_receivers=50,
    latency_fractions=(0.1, 0.25, 0.5, 0.75, 0.9),
    latency_duration=4.0,
    latency_calibrate_count=6_000,
    idle_trainers=1_000,
    replay_count=100_000,
    peer_rates=(20, 100, 200, 400, 800),
    peer_receivers=50,
    peer_duration=4.0,
    peer_ingest_count=20_000,
    peer_fanout_count=4_000,
)
QUICK = Sizes(
    ingest_count=2_000,
    fanout_receivers=(10,),
    fanout_deliveries=20_000,
    fanout_min_count=2_000,
    latency_receivers=10,
    latency_fractions=(0.25, 0.5),
    latency_duration=1.0,
    latency_calibrate_count=2_000,
    idle_trainers=50,
    replay_count=5_000,
    connect_trainers=100,
    interest_receivers=16,
    interest_duration=2.0,
    peer_rates=(20,),
    peer_receivers=10,
    peer_duration=1.5,
    peer_ingest_count=1_000,
    peer_fanout_count=500,
)


# --- child processes ---------------------------------------------------------------


class Child:
    """A child process whose stdout and stderr go to files in the work directory."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        self.env = env
        self.process: asyncio.subprocess.Process | None = None
        self._files: list[IO[bytes]] = []

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        out, err = self.stdout_path.open("wb"), self.stderr_path.open("wb")
        self._files = [out, err]
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=self.env,
            preexec_fn=die_with_parent,
        )

    def tail(self, lines: int = 15) -> str:
        text = ""
        for path in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def wait_for_line(
        self, pattern: re.Pattern[str], timeout: float, stderr: bool = False
    ) -> re.Match[str]:
        assert self.process is not None
        path = self.stderr_path if stderr else self.stdout_path
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            with contextlib.suppress(OSError):
                match = pattern.search(path.read_text(errors="replace"))
                if match:
                    return match
            if self.process.returncode is not None:
                raise RunError(f"{self.name} exited ({self.process.returncode}):\n{self.tail()}")
            await asyncio.sleep(0.05)
        raise RunError(f"{self.name} did not start within {timeout:g}s:\n{self.tail()}")

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(sig)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await asyncio.wait_for(process.wait(), 10)
        for file in self._files:
            file.close()
        self._files = []


async def run_to_end(argv: list[str], env: dict[str, str], timeout: float) -> str:
    """Runs a short command to completion; returns its stdout."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=die_with_parent,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RunError(f"{' '.join(argv[:4])} ... took longer than {timeout:g}s") from None
    if process.returncode != 0:
        raise RunError(f"{' '.join(argv[:4])} ... failed:\n{err.decode(errors='replace')[-2000:]}")
    return out.decode()


def child_env() -> dict[str, str]:
    """The environment of every hub, load and baseline process."""
    env = dict(os.environ)
    env.update(
        {
            "KERNELHUB_RATE_LIMIT_PER_SECOND": "0",
            "KERNELHUB_TRAINING_SYNC_INTERVAL": "0",
            "KERNELHUB_LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
    )
    # The project root on the path, so `python -m hub_service` works uninstalled too.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


async def issue_tokens(db: Path, agents: list[str], out: Path, env: dict[str, str]) -> None:
    """(soak.py) `kernelhub-hub token issue` for every agent, into `out` (`agent token` lines)."""
    argv = [PYTHON, "-m", "hub_service", "token", "issue", *agents, "--db", str(db)]
    await run_to_end([*argv, "--out", str(out)], env, timeout=300)


def hub_argv(db: Path, port: int) -> list[str]:
    """(soak.py) `kernelhub-hub serve` on loopback (port 0: any free port, printed when ready)."""
    return [
        PYTHON,
        "-m",
        "hub_service",
        "serve",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--db",
        str(db),
    ]


@dataclass
class Server:
    """A server under test: the hub or a baseline."""

    kind: str  # "kernelhub", "baseline" or "jetstream"
    pid: int
    port: int
    tokens: Path | None

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.port}"


def find_nats_server() -> str | None:
    """nats-server on PATH or where Debian installs it; None when it is not there."""
    found = shutil.which("nats-server")
    if found:
        return found
    return next((p for p in NATS_SERVER_PATHS if os.access(p, os.X_OK)), None)


def peers_missing() -> str | None:
    """Why the peers cannot run here (nats-server or nats-py missing), or None."""
    if find_nats_server() is None:
        return (
            "nats-server not found (Debian: apt-get install nats-server; scripts/setup does it "
            "as root): the comparison with NATS JetStream is skipped"
        )
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py not installed (pip install -e '.[bench]'): the peers are skipped"
    return None


@dataclass
class Runner:
    sizes: Sizes
    workdir: Path
    profile_dir: Path | None = None
    log: Callable[[str], None] = print
    profile_gil: bool = False
    profile_native: bool = False
    profiles: list[str] = field(default_factory=list)
    _count: int = 0

    def env(self) -> dict[str, str]:
        return child_env()

    def _name(self, what: str) -> str:
        self._count += 1
        return f"{self._count:03d}-{what}"

    # --- servers ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def hub(self, agents: int, label: str) -> AsyncIterator[Server]:
        """A hub process on a fresh SQLite file, with a token for each of `agents` trainers."""
        name = self._name(f"hub-{label}")
        tokens = self.workdir / f"{name}.tokens"
        hub = TestHub.subprocess(
            self.workdir / f"{name}.db",
            env=self.env(),
            output_dir=self.workdir,
            name=name,
            preexec_fn=die_with_parent,
            stop_timeout=15.0,
        )
        profiler: Child | None = None
        try:
            try:
                issued = await hub.issue_tokens(*(f"bench_{i:05d}" for i in range(agents)))
                tokens.write_text("".join(f"{agent} {token}\n" for agent, token in issued.items()))
                tokens.chmod(0o600)
                await hub.start()
            except HubStartError as exc:
                raise RunError(f"{name}: {exc}") from None
            if self.profile_dir is not None:
                profiler = await self._profile(hub.pid, label)
            yield Server("kernelhub", hub.pid, hub.port, tokens)
        finally:
            if profiler is not None:
                await profiler.stop(signal.SIGINT, timeout=60)
            await hub.stop()

    @contextlib.asynccontextmanager
    async def baseline(self, mode: str, label: str, *flags: str) -> AsyncIterator[Server]:
        child = Child(
            self._name(f"baseline-{mode}-{label}"),
            [PYTHON, "-m", "kernelhub_bench.baselines", "serve", mode, *flags],
            self.workdir,
            self.env(),
        )
        try:
            await child.start()
            port = int((await child.wait_for_line(BASELINE_READY, 60)).group(1))
            yield Server("baseline", child.pid, port, None)
        finally:
            await child.stop()

    @contextlib.asynccontextmanager
    async def nats(self, label: str) -> AsyncIterator[Server]:
        """Our own `nats-server -js` on a free loopback port with a fresh store directory
        (never the machine's own NATS service)."""
        binary = find_nats_server()
        if binary is None:
            raise RunError("nats-server not found")
        name = self._name(f"nats-{label}")
        store = self.workdir / f"{name}.store"
        store.mkdir()
        child = Child(
            name,
            [binary, "-js", "-a", LOOPBACK, "-p", "-1", "-m", "0", "-sd", str(store)],
            self.workdir,
            self.env(),
        )
        try:
            await child.start()
            port = int((await child.wait_for_line(NATS_READY, 60, stderr=True)).group(1))
            yield Server("jetstream", child.pid, port, None)
        finally:
            await child.stop()

    async def _profile(self, pid: int, label: str) -> Child:
        assert self.profile_dir is not None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        py_spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
        out = self.profile_dir / f"hub-{label}.txt"
        child = Child(
            self._name(f"py-spy-{label}"),
            [
                py_spy,
                "record",
                "--pid",
                str(pid),
                "-o",
                str(out),
                "-f",
                "raw",
                "--threads",
                "--rate",
                "200",
                "--subprocesses",  # the writer process commits: its samples are the hub's too
                *(["--gil"] if self.profile_gil else []),
                # C frames need the process paused for each sample (slower, but whole stacks).
                *(["--native"] if self.profile_native else ["--nonblocking"]),
            ],
            self.workdir,
            self.env(),
        )
        await child.start()
        await asyncio.sleep(1.0)  # attached before the load starts
        self.profiles.append(str(out))
        return child

    # --- loads ------------------------------------------------------------------

    async def load(
        self,
        scenario: str,
        server: Server,
        params: dict[str, Any],
        deadline: float,
        on_phase: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """Runs one load process against `server`; returns its result (RunError if it failed)."""
        name = self._name(f"load-{scenario}-{server.kind}")
        if server.kind == "jetstream":
            argv = [PYTHON, "-m", "kernelhub_bench.jetstream", scenario]
            argv += ["--url", f"nats://{server.target}"]
        else:
            argv = [PYTHON, "-m", "kernelhub_bench.load", scenario, "--target", server.target]
        argv += ["--server-pid", str(server.pid), "--params", json.dumps(params)]
        argv += ["--deadline", str(deadline)]
        if server.tokens is not None:
            argv += ["--tokens", str(server.tokens)]
        stderr = (self.workdir / f"{name}.err").open("wb")
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=self.env(),
            preexec_fn=die_with_parent,
        )
        assert process.stdout is not None and process.stdin is not None
        until = time.monotonic() + deadline + 30
        try:
            while True:
                left = until - time.monotonic()
                if left <= 0:
                    raise RunError(f"{name} ran past its deadline")
                try:
                    line = await asyncio.wait_for(process.stdout.readline(), left)
                except TimeoutError:
                    raise RunError(f"{name} ran past its deadline") from None
                if not line:
                    err = (self.workdir / f"{name}.err").read_text(errors="replace")[-2000:]
                    raise RunError(f"{name} ended without a result:\n{err}")
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if "phase" in message and on_phase is not None:
                    await on_phase(message)
                    process.stdin.write(b"go\n")
                    await process.stdin.drain()
                elif "error" in message:
                    raise RunError(f"{scenario} against {server.kind}: {message['error']}")
                elif "result" in message:
                    result: dict[str, Any] = message["result"]
                    return result
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 15)
                except TimeoutError:
                    process.kill()
                    await process.wait()
            stderr.close()

    # --- scenarios -----------------------------------------------------------------

    async def ingest(self) -> dict[str, Any]:
        count, batch = self.sizes.ingest_count, self.sizes.ingest_batch
        async with self.hub(1, "ingest") as hub:
            durable = await self.load("ingest", hub, {"count": count}, deadline=count / 200 + 60)
        async with self.hub(1, "ingest-batched") as hub:
            batched = await self.load(
                "ingest", hub, {"count": count, "batch": batch}, deadline=count / 200 + 60
            )
        async with self.baseline("oneway", "ingest") as bare:
            oneway = await self.load(
                "ingest", bare, {"count": count, "oneway": True}, deadline=count / 500 + 60
            )
            oneway_batched = await self.load(
                "ingest",
                bare,
                {"count": count, "oneway": True, "batch": batch},
                deadline=count / 500 + 60,
            )
        out = await run_to_end(
            [
                PYTHON,
                "-m",
                "kernelhub_bench.baselines",
                "sqlite",
                "--db",
                str(self.workdir / f"{self._name('sqlite')}.db"),
                "--count",
                str(count),
                "--batch",
                str(self.sizes.sqlite_batch),
            ],
            self.env(),
            timeout=count / 500 + 60,
        )
        sqlite = json.loads(out.strip().splitlines()[-1])["result"]
        self.log(
            f"  ingest: kernelhub {durable['rate']:,.0f}/s ({_cores(durable)}), "
            f"one-way {oneway['rate']:,.0f}/s ({_cores(oneway)}), "
            f"sqlite {sqlite['rate']:,.0f}/s; {batch} per message: kernelhub "
            f"{batched['rate']:,.0f}/s ({_cores(batched)}), one-way "
            f"{oneway_batched['rate']:,.0f}/s ({_cores(oneway_batched)})"
        )
        return {
            "kernelhub": durable,
            "oneway": oneway,
            "sqlite": sqlite,
            "kernelhub_batched": batched,
            "oneway_batched": oneway_batched,
        }

    async def fanout(self, receivers: int) -> dict[str, Any]:
        count = self.sizes.fanout_count(receivers)
        params = {"receivers": receivers, "count": count}
        deadline = count * receivers / 2000 + 90
        async with self.hub(receivers + 1, f"fanout{receivers}") as hub:
            mine = await self.load("fanout", hub, params, deadline)
        async with self.baseline("fanout", f"fanout{receivers}") as bare:
            theirs = await self.load("fanout", bare, params, deadline)
        self.log(
            f"  fan-out N={receivers}: kernelhub {mine['rate']:,.0f}/s "
            f"({mine['events_per_response']:.1f} events/response), "
            f"bare {theirs['rate']:,.0f}/s ({theirs['events_per_response']:.1f}); "
            f"kernelhub {_cores(mine)}; bare {_cores(theirs)}"
        )
        return {"kernelhub": mine, "baseline": theirs}

    async def latency(self) -> dict[str, Any]:
        sizes = self.sizes
        receivers = sizes.latency_receivers
        points = len(sizes.latency_fractions)
        deadline = points * (sizes.latency_duration * 3 + 10) + 120
        async with self.hub(receivers + 1, "latency") as hub:
            mine = await self.load(
                "latency",
                hub,
                {
                    "receivers": receivers,
                    "duration": sizes.latency_duration,
                    "fractions": list(sizes.latency_fractions),
                    "calibrate_count": sizes.latency_calibrate_count,
                },
                deadline,
            )
        rates = [p["offered_shares_per_s"] for p in mine["points"]]
        async with self.baseline("fanout", "latency") as bare:
            theirs = await self.load(
                "latency",
                bare,
                {
                    "receivers": receivers,
                    "duration": sizes.latency_duration,
                    "rates": rates,
                    "fractions": list(sizes.latency_fractions),
                },
                deadline,
            )
        for a, b in zip(mine["points"], theirs["points"], strict=True):
            self.log(
                f"  latency @ {a['fraction']:.0%} of {mine['max_shares_per_s']:,.0f} shares/s: "
                f"kernelhub p50 {a['p50_ms']:.2f} p99 {a['p99_ms']:.2f} ms, "
                f"bare p50 {b['p50_ms']:.2f} p99 {b['p99_ms']:.2f} ms"
            )
        return {"kernelhub": mine, "baseline": theirs}

    async def rss(self) -> dict[str, Any]:
        trainers = self.sizes.idle_trainers
        async with self.hub(trainers, "rss") as hub:
            mine = await self._idle_rss(hub, trainers)
        async with self.baseline("fanout", "rss") as bare:
            theirs = await self._idle_rss(bare, trainers)
        self.log(
            f"  RSS per idle trainer: kernelhub {mine['per_trainer_kib']:.1f} KiB "
            f"(connected in {mine['connect_seconds']:.1f} s), "
            f"bare {theirs['per_trainer_kib']:.1f} KiB ({theirs['connect_seconds']:.1f} s)"
        )
        return {"kernelhub": mine, "baseline": theirs}

    async def _idle_rss(self, server: Server, trainers: int) -> dict[str, Any]:
        """The server's RSS growth while `trainers` idle trainers are connected, per trainer."""
        before = await settled_rss(server.pid)
        measured: dict[str, Any] = {}

        async def on_connected(message: dict[str, Any]) -> None:
            measured["rss"] = await settled_rss(server.pid)

        params = {"trainers": trainers, "per_channel": 50}
        load = await self.load("idle", server, params, trainers / 5 + 120, on_connected)
        if "rss" not in measured:
            raise RunError("the idle load never reported its trainers connected")
        return {
            "rss_before": before,
            "rss_after": measured["rss"],
            "per_trainer_kib": (measured["rss"] - before) / trainers / 1024,
            **load,
        }

    async def connect(self) -> dict[str, Any]:
        """The connect storm: every trainer at once, until each is live (welcome, roster)."""
        trainers = self.sizes.connect_trainers
        # At most 1,000 Hellos in flight: beyond that a trainer may wait longer than the
        # hub's hello timeout (10 s) for its stream to be read, on this 2-core machine.
        params = {"trainers": trainers, "per_channel": 50, "connect_concurrency": 1000}
        deadline = trainers / 10 + 120
        async with self.hub(trainers, "connect") as hub:
            mine = await self.load("connect", hub, {**params, "roster": True}, deadline)
        async with self.baseline("fanout", "connect") as bare:
            theirs = await self.load("connect", bare, params, deadline)
        self.log(
            f"  connect storm of {trainers:,}: kernelhub welcomed all in "
            f"{mine['welcome_seconds']:.2f} s, live in {mine['connect_seconds']:.2f} s "
            f"(everyone knows everyone in {mine['presence_seconds']:.2f} s, "
            f"{mine['presence_updates_per_trainer']:.1f} presence updates each), "
            f"bare {theirs['connect_seconds']:.2f} s"
        )
        return {"kernelhub": mine, "baseline": theirs}

    async def interest(self) -> dict[str, Any]:
        """Interest-filtered fan-out beside the same run with everyone subscribed to all."""
        sizes = self.sizes
        receivers = sizes.interest_receivers
        params = {
            "receivers": receivers,
            "rate": sizes.interest_rate,
            "duration": sizes.interest_duration,
            "per_channel": 50,
        }
        deadline = sizes.interest_duration * 3 + receivers / 20 + 120
        results = {}
        for filtered in (True, False):
            async with self.hub(receivers + 8, "interest") as hub:
                results["filtered" if filtered else "broadcast"] = await self.load(
                    "interest", hub, {**params, "filtered": filtered}, deadline
                )
        mine, theirs = results["filtered"], results["broadcast"]
        self.log(
            f"  interest fan-out, {receivers} trainers, {sizes.interest_rate:g} shares/s: "
            f"filtered {mine['rate']:,.0f} deliveries/s ({mine['deliveries']:,}), "
            f"{mine['hub_cpu_us_per_delivery']:.1f} µs hub CPU each, p50/p99 "
            f"{mine['p50_ms']:.1f}/{mine['p99_ms']:.1f} ms ({_cores(mine)}); broadcast "
            f"{theirs['rate']:,.0f}/s ({theirs['deliveries']:,}), "
            f"{theirs['hub_cpu_us_per_delivery']:.1f} µs each, p50/p99 "
            f"{theirs['p50_ms']:.1f}/{theirs['p99_ms']:.1f} ms ({_cores(theirs)})"
        )
        return {"kernelhub": mine, "baseline": theirs}

    async def replay(self, replays: int) -> dict[str, Any]:
        count = self.sizes.replay_count
        params = {"count": count, "replays": replays}
        deadline = count / 300 + replays * count / 5000 + 120
        async with self.hub(2, "replay") as hub:
            mine = await self.load("replay", hub, params, deadline)
        async with self.baseline("fanout", "replay", "--keep-log") as bare:
            theirs = await self.load("replay", bare, params, deadline)
        self.log(
            f"  replay of {count:,}: kernelhub {mine['rate']:,.0f} events/s, "
            f"bare {theirs['rate']:,.0f} events/s"
        )
        return {"kernelhub": mine, "baseline": theirs}

    # --- beside the peers: the bare server and NATS JetStream --------------------------

    @contextlib.asynccontextmanager
    async def peers(self, agents: int, label: str) -> AsyncIterator[dict[str, Server]]:
        """The three systems side by side, each in its own process(es)."""
        async with (
            self.hub(agents, label) as hub,
            self.baseline("fanout", label) as bare,
            self.nats(label) as jetstream,
        ):
            yield {"kernelhub": hub, "bare": bare, "jetstream": jetstream}

    async def peers_latency(self, run_index: int) -> dict[str, Any]:
        """p50/p99 share -> delivery for each system at each absolute rate; the systems take
        turns per rate (the order rotates, so no system always goes first)."""
        sizes = self.sizes
        receivers, duration = sizes.peer_receivers, sizes.peer_duration
        out: dict[str, Any] = {"receivers": receivers, "points": []}
        async with self.peers(receivers + 1, "peers-latency") as servers:
            names = list(servers)
            for i, rate in enumerate(sizes.peer_rates):
                turn = (run_index + i) % len(names)
                order = names[turn:] + names[:turn]
                point: dict[str, Any] = {"offered_shares_per_s": rate, "order": order}
                for system in order:
                    params = {"receivers": receivers, "duration": duration, "rates": [rate]}
                    result = await self.load(
                        "latency", servers[system], params, deadline=duration * 3 + 90
                    )
                    point[system] = result["points"][0]
                out["points"].append(point)
                self.log(
                    f"  peers @ {rate:,.0f} shares/s x {receivers}: "
                    + ", ".join(
                        f"{s} p50 {point[s]['p50_ms']:.1f} p99 {point[s]['p99_ms']:.1f} ms "
                        f"({_cores(point[s])})"
                        for s in names
                    )
                )
        return out

    async def peers_ingest(self) -> dict[str, Any]:
        """Durable ingest from one publisher, 256 in flight: receipts (or acks) per second."""
        count = self.sizes.peer_ingest_count
        params = {"count": count}
        deadline = count / 200 + 60
        async with self.peers(1, "peers-ingest") as servers:
            out = {
                "kernelhub": await self.load("ingest", servers["kernelhub"], params, deadline),
                "kernelhub_client": await self.load(
                    "ingest_client", servers["kernelhub"], params, deadline
                ),
                "bare": await self.load("ingest", servers["bare"], params, deadline),
                "jetstream": await self.load("ingest", servers["jetstream"], params, deadline),
            }
        for result in out.values():
            result["server_us_per_message"] = (
                result["server_cores"] * result["seconds"] / result["count"] * 1e6
            )
        self.log(
            "  peers ingest: "
            + ", ".join(
                f"{k} {r['rate']:,.0f}/s, {r['server_us_per_message']:.0f} us/msg ({_cores(r)})"
                for k, r in out.items()
            )
        )
        return out

    async def peers_fanout(self) -> dict[str, Any]:
        """Fan-out at saturation to the peers' receivers, the three systems back to back."""
        receivers, count = self.sizes.peer_receivers, self.sizes.peer_fanout_count
        params = {"receivers": receivers, "count": count}
        deadline = count * receivers / 2000 + 90
        async with self.peers(receivers + 1, "peers-fanout") as servers:
            out = {k: await self.load("fanout", s, params, deadline) for k, s in servers.items()}
        self.log(
            f"  peers fan-out N={receivers}: "
            + ", ".join(f"{k} {r['rate']:,.0f}/s ({_cores(r)})" for k, r in out.items())
        )
        return out


def _cores(result: dict[str, Any]) -> str:
    """Cores of the server (its main thread + other threads + child processes), of the
    load process and of everything else."""
    server, main, threads, children, client, other = (
        result.get(k, 0.0)
        for k in (
            "server_cores",
            "server_main_thread_cores",
            "server_other_threads_cores",
            "server_children_cores",
            "client_cores",
            "other_cores",
        )
    )
    return (
        f"server {server:.2f} = {main:.2f} main thread + {threads:.2f} threads + "
        f"{children:.2f} children; load {client:.2f}; other {other:.2f}"
    )


async def settled_rss(pid: int, quiet_cores: float = 0.05, timeout: float = 30.0) -> int:
    """The process's RSS once it has been idle (under `quiet_cores` of CPU) for half a second."""
    process = psutil.Process(pid)

    def cpu() -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    until = time.monotonic() + timeout
    last = cpu()
    while time.monotonic() < until:
        await asyncio.sleep(0.5)
        now = cpu()
        if (now - last) / 0.5 < quiet_cores:
            break
        last = now
    return int(process.memory_info().rss)


# --- the whole run ------------------------------------------------------------------


async def run(
    sizes: Sizes,
    repeat: int,
    scenarios: list[str],
    workdir: Path,
    profile_dir: Path | None = None,
    log: Callable[[str], None] = print,
    profile_gil: bool = False,
    profile_native: bool = False,
) -> dict[str, Any]:
    """Every scenario `repeat` times (the replay: one seeding, `repeat` reconnections),
    kernelhub and its baseline back to back each time. Returns the raw per-run results."""
    runner = Runner(sizes, workdir, profile_dir, log, profile_gil, profile_native)
    # SIGTERM and SIGHUP cancel the run like Ctrl-C does, so every child is stopped on the way out.
    loop, task = asyncio.get_running_loop(), asyncio.current_task()
    if task is not None:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, task.cancel)
    raw: dict[str, Any] = {
        "ingest": [],
        "fanout": {},
        "latency": [],
        "rss": [],
        "connect": [],
        "interest": [],
        "replay": None,
    }
    raw["peers"] = {"latency": [], "ingest": [], "fanout": [], "skipped": None}
    wanted_peers = [s for s in scenarios if s in PEER_SCENARIOS]
    if wanted_peers and (reason := peers_missing()) is not None:
        log(f"[yellow]peers skipped:[/yellow] {reason}")
        raw["peers"]["skipped"] = reason
        wanted_peers = []
    started = time.monotonic()
    for index in range(repeat):
        log(f"run {index + 1} of {repeat}")
        if "ingest" in scenarios:
            raw["ingest"].append(await runner.ingest())
        if "fanout" in scenarios:
            for receivers in sizes.fanout_receivers:
                raw["fanout"].setdefault(str(receivers), []).append(await runner.fanout(receivers))
        if "latency" in scenarios:
            raw["latency"].append(await runner.latency())
        if "rss" in scenarios:
            raw["rss"].append(await runner.rss())
        if "connect" in scenarios:
            raw["connect"].append(await runner.connect())
        if "interest" in scenarios:
            raw["interest"].append(await runner.interest())
        if "peers_latency" in wanted_peers:
            raw["peers"]["latency"].append(await runner.peers_latency(index))
        if "peers_ingest" in wanted_peers:
            raw["peers"]["ingest"].append(await runner.peers_ingest())
        if "peers_fanout" in wanted_peers:
            raw["peers"]["fanout"].append(await runner.peers_fanout())
    if "replay" in scenarios:
        raw["replay"] = await runner.replay(repeat)
    raw["seconds"] = time.monotonic() - started
    raw["sizes"] = asdict(sizes)
    raw["profiles"] = runner.profiles
    return raw


def other_cores(raw: Any) -> list[float]:
    """Every measured interval's CPU taken by other work on the machine, in cores."""
    if isinstance(raw, dict):
        found = [float(raw["other_cores"])] if "other_cores" in raw else []
        return found + [x for v in raw.values() for x in other_cores(v)]
    if isinstance(raw, list):
        return [x for v in raw for x in other_cores(v)]
    return []


def summarize(raw: dict[str, Any], sizes: Sizes) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Medians over the runs, the ratios and the targets: (figures, latency sweep)."""
    figures: list[dict[str, Any]] = []

    def add(
        key: str,
        figure: str,
        unit: str,
        mine: list[float],
        theirs: list[float],
        baseline: str,
        target: tuple[str, float] | None = None,
    ) -> None:
        value, base = median(mine), median(theirs)
        # Each run measures kernelhub and its baseline back to back, under the same other
        # load on the machine: the ratio is the median of those paired ratios.
        ratio = median([m / t for m, t in zip(mine, theirs, strict=True) if t])
        met: bool | None = None
        text = "-"
        if target is not None:
            kind, limit = target
            if kind == "ratio_min":
                met, text = ratio >= limit, f">= {limit:g}x baseline"
            elif kind == "ratio_max":
                met, text = ratio <= limit, f"<= {limit:g}x baseline"
            elif kind == "max":
                met, text = value <= limit, f"<= {limit:g} {unit}"
            else:
                met, text = value >= limit, f">= {limit:,.0f} {unit}"
        figures.append(
            {
                "key": key,
                "figure": figure,
                "unit": unit,
                "kernelhub": value,
                "baseline": base,
                "baseline_name": baseline,
                "ratio": ratio,
                "target": text,
                "met": met,
                "runs": {"kernelhub": mine, "baseline": theirs},
            }
        )

    if raw["ingest"]:
        runs = raw["ingest"]
        hub = [r["kernelhub"]["rate"] for r in runs]
        add(
            "ingest",
            "durable ingest, 1 stream (receipt after commit)",
            "shares/s",
            hub,
            [r["oneway"]["rate"] for r in runs],
            "raw one-way gRPC ingest",
            ("ratio_min", 0.6),
        )
        if all("kernelhub_batched" in r for r in runs):
            batched = [r["kernelhub_batched"]["rate"] for r in runs]
            add(
                "ingest_batched",
                f"durable ingest, 1 stream, {sizes.ingest_batch} shares per message "
                "(RequestBatch; a receipt per share after commit)",
                "shares/s",
                batched,
                [r["oneway"]["rate"] for r in runs],
                "raw one-way gRPC ingest, one share per message",
                ("ratio_min", 0.6),
            )
            add(
                "ingest_batched_vs_oneway_batched",
                f"durable ingest, {sizes.ingest_batch} shares per message, against reading "
                "the same batched messages",
                "shares/s",
                batched,
                [r["oneway_batched"]["rate"] for r in runs],
                f"raw one-way gRPC ingest, {sizes.ingest_batch} shares per message",
            )
        add(
            "ingest_vs_sqlite",
            f"durable ingest vs raw SQLite executemany (batches of {sizes.sqlite_batch})",
            "shares/s",
            hub,
            [r["sqlite"]["rate"] for r in runs],
            "raw SQLite executemany",
        )
    for receivers, runs in raw["fanout"].items():
        add(
            f"fanout_{receivers}",
            f"fan-out to N={receivers} trainers",
            "events/s",
            [r["kernelhub"]["rate"] for r in runs],
            [r["baseline"]["rate"] for r in runs],
            "bare grpc.aio fan-out",
            ("ratio_min", 0.5),
        )
    sweep: dict[str, Any] = {}
    if raw["latency"]:
        runs = raw["latency"]
        receivers = sizes.latency_receivers
        fractions = list(sizes.latency_fractions)
        half = fractions.index(0.5)

        def point(side: str, i: int, field_name: str) -> list[float]:
            return [r[side]["points"][i][field_name] for r in runs]

        max_rate = median([r["kernelhub"]["max_shares_per_s"] for r in runs])
        label = f"at 50% of max load ({0.5 * max_rate:,.0f} shares/s), N={receivers}"
        add(
            "latency_p50",
            f"share->delivery p50 {label}",
            "ms",
            point("kernelhub", half, "p50_ms"),
            point("baseline", half, "p50_ms"),
            "bare grpc.aio fan-out, same load",
        )
        add(
            "latency_p99",
            f"share->delivery p99 {label}",
            "ms",
            point("kernelhub", half, "p99_ms"),
            point("baseline", half, "p99_ms"),
            "bare grpc.aio fan-out, same load",
            ("max", 10.0),
        )
        sweep = {
            "receivers": receivers,
            "max_shares_per_s": max_rate,
            "points": [
                {
                    "fraction": f,
                    "offered_shares_per_s": median(point("kernelhub", i, "offered_shares_per_s")),
                    "offered_deliveries_per_s": median(
                        point("kernelhub", i, "offered_deliveries_per_s")
                    ),
                    "kernelhub_p50_ms": median(point("kernelhub", i, "p50_ms")),
                    "kernelhub_p99_ms": median(point("kernelhub", i, "p99_ms")),
                    "baseline_p50_ms": median(point("baseline", i, "p50_ms")),
                    "baseline_p99_ms": median(point("baseline", i, "p99_ms")),
                    "other_cores": median(
                        point("kernelhub", i, "other_cores") + point("baseline", i, "other_cores")
                    ),
                }
                for i, f in enumerate(fractions)
            ],
        }
    if raw["rss"]:
        runs = raw["rss"]
        add(
            "rss_per_trainer",
            f"hub RSS per idle connected trainer, {sizes.idle_trainers:,} connected",
            "KiB",
            [r["kernelhub"]["per_trainer_kib"] for r in runs],
            [r["baseline"]["per_trainer_kib"] for r in runs],
            "bare grpc.aio server",
            ("max", 64.0),
        )
        add(
            "connect_idle",
            f"time to connect {sizes.idle_trainers:,} trainers (hello -> welcome, 50 at a time)",
            "s",
            [r["kernelhub"]["connect_seconds"] for r in runs],
            [r["baseline"]["connect_seconds"] for r in runs],
            "bare grpc.aio server",
        )
    if raw.get("connect"):
        runs = raw["connect"]
        add(
            "connect_storm",
            f"connect storm: {sizes.connect_trainers:,} fresh trainers at once, until each is "
            "live (welcome and roster)",
            "s",
            [r["kernelhub"]["connect_seconds"] for r in runs],
            [r["baseline"]["connect_seconds"] for r in runs],
            "bare grpc.aio server (welcome)",
            ("ratio_max", 3.0),
        )
        add(
            "connect_storm_welcome",
            f"connect storm: {sizes.connect_trainers:,} fresh trainers at once, until each has "
            "its welcome",
            "s",
            [r["kernelhub"]["welcome_seconds"] for r in runs],
            [r["baseline"]["welcome_seconds"] for r in runs],
            "bare grpc.aio server (welcome)",
        )
        add(
            "connect_storm_presence",
            f"connect storm: until each of {sizes.connect_trainers:,} knows every other is online",
            "s",
            [r["kernelhub"]["presence_seconds"] for r in runs],
            [r["baseline"]["connect_seconds"] for r in runs],
            "bare grpc.aio server (welcome)",
        )
    if raw.get("interest"):
        runs = raw["interest"]
        shape = (
            f"interest-filtered fan-out, {sizes.interest_receivers:,} trainers (own "
            f"specialization + complements), {sizes.interest_rate:g} shares/s"
        )
        everyone = "the same hub, everyone subscribed to everything"
        add(
            "interest_cpu",
            f"{shape}: hub CPU per delivered event",
            "µs",
            [r["kernelhub"]["hub_cpu_us_per_delivery"] for r in runs],
            [r["baseline"]["hub_cpu_us_per_delivery"] for r in runs],
            everyone,
            ("ratio_max", 1.0),
        )
        add(
            "interest_rate",
            f"{shape}: deliveries/s",
            "deliveries/s",
            [r["kernelhub"]["rate"] for r in runs],
            [r["baseline"]["rate"] for r in runs],
            everyone,
        )
        for q in ("p50", "p99"):
            add(
                f"interest_{q}",
                f"{shape}: {q} share -> delivery",
                "ms",
                [r["kernelhub"][f"{q}_ms"] for r in runs],
                [r["baseline"][f"{q}_ms"] for r in runs],
                everyone,
            )
    if raw["replay"]:
        replay = raw["replay"]
        add(
            "replay",
            f"replay of {sizes.replay_count:,} missed events to a reconnecting trainer",
            "events/s",
            [r["rate"] for r in replay["kernelhub"]["runs"]],
            [r["rate"] for r in replay["baseline"]["runs"]],
            "bare in-memory replay",
            ("min", 50_000.0),
        )
    _peer_figures(raw.get("peers") or {}, sizes, add)
    return figures, sweep


# The issue's targets beside the peers: (rates, kernelhub <= x bare, kernelhub <= x JetStream).
PEER_LATENCY_TARGET_RATES = (200, 400, 800)
PEER_TARGETS = {"bare": 1.5, "jetstream": 2.0}
PEER_NAMES = {"bare": "bare grpc.aio fan-out", "jetstream": "NATS JetStream (nats-py)"}
HUB_CORES_RATE = 200
HUB_CORES_MAX = 0.4


def _target_rates(rates: list[float]) -> list[float]:
    """The rates with targets; a run without any of them (the quick one) shows its highest."""
    chosen = [r for r in rates if r in PEER_LATENCY_TARGET_RATES]
    return chosen or rates[-1:]


def _peer_figures(peers: dict[str, Any], sizes: Sizes, add: Callable[..., None]) -> None:
    """The figures beside the peers (the whole per-rate table: summarize_peers)."""
    runs = peers.get("latency") or []
    if runs:
        rates = [p["offered_shares_per_s"] for p in runs[0]["points"]]
        n = runs[0]["receivers"]

        def side(system: str, i: int, key: str) -> list[float]:
            return [r["points"][i][system][key] for r in runs]

        for rate in _target_rates(rates):
            i = rates.index(rate)
            for q in ("p50", "p99"):
                for peer, limit in PEER_TARGETS.items():
                    add(
                        f"peers_{q}_{rate:g}_vs_{peer}",
                        f"share->delivery {q} at {rate:g} shares/s x {n} receivers, "
                        f"against {PEER_NAMES[peer]}",
                        "ms",
                        side("kernelhub", i, f"{q}_ms"),
                        side(peer, i, f"{q}_ms"),
                        f"{PEER_NAMES[peer]}, same rate",
                        ("ratio_max", limit) if rate in PEER_LATENCY_TARGET_RATES else None,
                    )
        rate = HUB_CORES_RATE if HUB_CORES_RATE in rates else rates[-1]
        i = rates.index(rate)
        add(
            f"peers_hub_cores_{rate:g}",
            f"hub CPU at {rate:g} shares/s x {n} receivers (with its writer process)",
            "cores",
            side("kernelhub", i, "server_cores"),
            side("bare", i, "server_cores"),
            "bare grpc.aio fan-out's CPU, same rate",
            ("max", HUB_CORES_MAX) if rate == HUB_CORES_RATE else None,
        )
    ingest = peers.get("ingest") or []
    if ingest:

        def rate_of(system: str, key: str = "rate") -> list[float]:
            return [r[system][key] for r in ingest]

        count = ingest[0]["kernelhub"]["count"]
        add(
            "peers_ingest_vs_bare",
            f"durable ingest, 1 publisher, 256 in flight, one share per message ({count:,})",
            "shares/s",
            rate_of("kernelhub"),
            rate_of("bare"),
            "bare grpc.aio server's receipts",
            ("ratio_min", 0.9),
        )
        add(
            "peers_ingest_vs_jetstream",
            "durable ingest, one share per message, against JetStream",
            "shares/s",
            rate_of("kernelhub"),
            rate_of("jetstream"),
            "JetStream publish-with-ack, 256 in flight",
        )
        add(
            "peers_ingest_client_vs_jetstream",
            "durable ingest through HubClient (it batches what waits), 256 in flight",
            "shares/s",
            rate_of("kernelhub_client"),
            rate_of("jetstream"),
            "JetStream publish-with-ack, 256 in flight",
            ("ratio_min", 1.0),
        )
        for system, label in (
            ("kernelhub", "one share per message"),
            ("kernelhub_client", "HubClient"),
        ):
            add(
                f"peers_ingest_cpu_{system}",
                f"server CPU per durable message, {label}",
                "us",
                rate_of(system, "server_us_per_message"),
                rate_of("jetstream", "server_us_per_message"),
                "nats-server's CPU per acked publish",
            )
    fanout = peers.get("fanout") or []
    if fanout:
        n = fanout[0]["kernelhub"]["receivers"]
        for peer, limit in (("bare", 1.3), ("jetstream", 1.4)):
            add(
                f"peers_fanout_vs_{peer}",
                f"fan-out at saturation to N={n}",
                "events/s",
                [r["kernelhub"]["rate"] for r in fanout],
                [r[peer]["rate"] for r in fanout],
                f"{PEER_NAMES[peer]}, same load",
                ("ratio_min", limit),
            )


def summarize_peers(peers: dict[str, Any]) -> dict[str, Any]:
    """The per-rate table beside the peers: each system's median p50/p99 and the cores of its
    server and of its load (which side was the bottleneck), with kernelhub's paired ratios."""
    runs = peers.get("latency") or []
    out: dict[str, Any] = {"skipped": peers.get("skipped"), "points": []}
    if not runs:
        return out
    out["receivers"] = runs[0]["receivers"]
    systems = ("kernelhub", "bare", "jetstream")
    for i, first in enumerate(runs[0]["points"]):
        row: dict[str, Any] = {"offered_shares_per_s": first["offered_shares_per_s"]}
        for system in systems:
            for key in ("p50_ms", "p99_ms", "server_cores", "client_cores", "other_cores"):
                row[f"{system}_{key}"] = median([r["points"][i][system][key] for r in runs])
        for peer in ("bare", "jetstream"):
            for q in ("p50_ms", "p99_ms"):
                pairs = [(r["points"][i]["kernelhub"][q], r["points"][i][peer][q]) for r in runs]
                row[f"{q.removesuffix('_ms')}_vs_{peer}"] = median([m / t for m, t in pairs if t])
        out["points"].append(row)
    return out
