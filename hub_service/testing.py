"""Start a real hub for a test, a benchmark or a demo: the one place that does.

Like `temporalio.testing`, a hub here is the real thing: a real port (any free one unless you
pick it), a real database (a temporary SQLite file unless you give one), real gRPC, and
tokens issued the way an operator issues them. Two ways to run it:

- `TestHub.in_process(config)`: a `HubServer` in this event loop; fast, and `hub.server`
  gives the tests that need them its store and router.
- `TestHub.subprocess(database, args=..., env=...)`: `python -m hub_service serve` in its
  own process, for what needs a process boundary: SIGKILL, SIGTERM, RSS, a profiler.

    async with TestHub.in_process() as hub:
        token = await hub.issue_token("AI_Node_1")
        stats = await hub.stub().GetHubStats(
            pb.GetHubStatsRequest(), metadata=[("authorization", f"Bearer {token}")]
        )

Leaving the `async with` stops the hub gracefully (a subprocess gets SIGTERM, then SIGKILL
if it has not exited within `stop_timeout`); `kill()` is the fault: no drain, no goodbye.
A stopped hub can be started again on the same database (and, as a subprocess, port).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType

import grpc

from generated.kernelhub.v1 import hub_pb2_grpc

from .config import HubConfig
from .roles import Role
from .server import HubServer

LOOPBACK = "127.0.0.1"
# What `kernelhub-hub serve` prints on stdout once it is serving.
_READY = re.compile(rb"kernelhub serving on \S+:(\d+)")
# How often a starting subprocess's stdout is looked at for that line.
_POLL_SECONDS = 0.02
# The project root, so a subprocess runs this very hub_service even when it is not installed.
_ROOT = str(Path(__file__).resolve().parent.parent)


class HubStartError(RuntimeError):
    """A hub subprocess exited or did not say it was serving in time; the message has its
    stderr's last lines."""


class TestHub:
    """One real hub on loopback; an async context manager. Build it with `in_process()`
    or `subprocess()`, not the constructor."""

    __test__ = False  # a helper, not a pytest test class

    def __init__(
        self,
        *,
        in_process: bool,
        config: HubConfig | None = None,
        database: Path | str | None = None,
        port: int = 0,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        output_dir: Path | None = None,
        name: str = "hub",
        preexec_fn: Callable[[], None] | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> None:
        # Scratch space (a default database, the subprocess's output) lives until close(),
        # so a hub stopped and started again finds its data.
        self._temp: tempfile.TemporaryDirectory[str] | None = None
        if (config is None and database is None) or (not in_process and output_dir is None):
            self._temp = tempfile.TemporaryDirectory(prefix="kernelhub-test-")
        scratch = Path(self._temp.name) if self._temp is not None else Path()
        if in_process and config is None:
            config = HubConfig(
                host=LOOPBACK, port=0, database_url=HubConfig.sqlite_url(scratch / "hub.db")
            )
        self._config = config
        self.database: Path | str = (
            config.database_url if config is not None else database or scratch / "hub.db"
        )
        self.port = config.port if config is not None else port
        self._args = list(args)
        self._env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p),
            **(env or {}),
        }
        directory = output_dir if output_dir is not None else scratch
        self.stdout_path = directory / f"{name}.out"
        self.stderr_path = directory / f"{name}.err"
        self._preexec_fn = preexec_fn
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._server: HubServer | None = None
        self.process: asyncio.subprocess.Process | None = None
        self._channel: grpc.aio.Channel | None = None

    # --- constructors ---------------------------------------------------------------

    @classmethod
    def in_process(cls, config: HubConfig | None = None) -> TestHub:
        """A `HubServer` in this event loop. Without `config`: loopback, any free port, a
        temporary SQLite file, every other setting at its default."""
        return cls(in_process=True, config=config)

    @classmethod
    def subprocess(
        cls,
        database: Path | str | None = None,
        *,
        port: int = 0,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        output_dir: Path | None = None,
        name: str = "hub",
        preexec_fn: Callable[[], None] | None = None,
        start_timeout: float = 60.0,
        stop_timeout: float = 30.0,
    ) -> TestHub:
        """`python -m hub_service serve` on loopback. `database`: a SQLite file (a Path,
        passed as `--db`), a SQLAlchemy URL (a str, `--database-url`) or a temporary file.
        `args` are more `serve` flags; `env` is added to this process's environment.
        stdout and stderr go to `<output_dir>/<name>.out|.err` (a temporary directory by
        default). `preexec_fn` runs in the child before the hub (e.g. a parent-death signal)."""
        return cls(
            in_process=False,
            database=database,
            port=port,
            args=args,
            env=env,
            output_dir=output_dir,
            name=name,
            preexec_fn=preexec_fn,
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
        )

    # --- what a test uses -----------------------------------------------------------

    @property
    def target(self) -> str:
        """`host:port` for a gRPC channel."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def server(self) -> HubServer:
        """The running in-process `HubServer` (its store, router, committer)."""
        if self._server is None:
            raise RuntimeError("no in-process hub is running (TestHub.in_process, started)")
        return self._server

    @property
    def pid(self) -> int:
        """The hub's process: the subprocess, or this one for an in-process hub."""
        if self._config is not None:
            return os.getpid()
        if self.process is None:
            raise RuntimeError("the hub subprocess has not been started")
        return self.process.pid

    def stderr(self) -> str:
        """What a hub subprocess has written to stderr so far."""
        with contextlib.suppress(OSError):
            return self.stderr_path.read_text(errors="replace")
        return ""

    def channel(self) -> grpc.aio.Channel:
        """An insecure channel to the hub, closed when the hub stops or starts again."""
        if self._channel is None:
            # Its own subchannels: the process-wide ones to a killed hub's port may still be
            # in reconnect backoff when it serves again.
            self._channel = grpc.aio.insecure_channel(
                self.target, options=[("grpc.use_local_subchannel_pool", 1)]
            )
        return self._channel

    def stub(self) -> hub_pb2_grpc.HubServiceAsyncStub:
        """The raw HubService stub on `channel()`."""
        return hub_pb2_grpc.HubServiceStub(self.channel())  # type: ignore[return-value]

    async def issue_token(
        self, agent_id: str, ttl: timedelta | None = None, role: Role = Role.AGENT
    ) -> str:
        """A bearer token for `agent_id` (expiring after `ttl`, if given)."""
        if self._config is not None:
            return await self.server.issue_token(agent_id, ttl, role)
        return (await self.issue_tokens(agent_id, ttl=ttl, role=role))[agent_id]

    async def issue_tokens(
        self,
        *agent_ids: str,
        ttl: timedelta | None = None,
        role: Role = Role.AGENT,
        timeout: float = 300.0,
    ) -> dict[str, str]:
        """A token for each agent. For a subprocess hub this is `kernelhub-hub token issue`
        on its database, so it works before the hub is started, too."""
        if self._config is not None:
            return {
                agent_id: await self.server.issue_token(agent_id, ttl, role)
                for agent_id in agent_ids
            }
        argv = [sys.executable, "-m", "hub_service", "token", "issue", *agent_ids]
        argv += ["--role", role.value]
        if ttl is not None:
            argv += ["--ttl", f"{ttl.total_seconds()}s"]
        process = await asyncio.create_subprocess_exec(
            *argv,
            *self._database_args(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise HubStartError(f"token issue took longer than {timeout:g}s") from None
        if process.returncode != 0:
            raise HubStartError(f"token issue failed: {err.decode(errors='replace')[-2000:]}")
        pairs = (line.split(" ", 1) for line in out.decode().splitlines() if line)
        return {agent_id: token for agent_id, token in pairs}

    # --- start and stop -------------------------------------------------------------

    async def start(self) -> TestHub:
        """Starts (or restarts) the hub; returns once it is serving."""
        await self._close_channel()  # one to a killed hub may be in reconnect backoff
        if self._config is not None:
            server = HubServer(self._config)
            self.port = await server.start()
            self._server = server
            return self
        await self._spawn()
        return self

    async def _spawn(self) -> None:
        if self.process is not None and self.process.returncode is None:
            raise RuntimeError("the hub subprocess is already running")
        self.stdout_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.stdout_path.stat().st_size if self.stdout_path.exists() else 0
        with self.stdout_path.open("ab") as out, self.stderr_path.open("ab") as err:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "hub_service",
                "serve",
                "--host",
                LOOPBACK,
                "--port",
                str(self.port),
                *self._database_args(),
                *self._args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self._env,
                preexec_fn=self._preexec_fn,
            )
        clock = asyncio.get_running_loop()
        deadline = clock.time() + self._start_timeout
        while True:
            with self.stdout_path.open("rb") as out:
                out.seek(offset)
                ready = _READY.search(out.read())
            if ready:
                self.port = int(ready.group(1))
                return
            if self.process.returncode is not None or clock.time() > deadline:
                code = self.process.returncode
                await self.kill()
                why = f"exited ({code})" if code is not None else "is not serving"
                raise HubStartError(
                    f"the hub subprocess {why} after {self._start_timeout:g}s at most:\n"
                    + "\n".join(self.stderr().splitlines()[-15:])
                )
            await asyncio.sleep(_POLL_SECONDS)

    def _database_args(self) -> list[str]:
        if isinstance(self.database, Path):
            return ["--db", str(self.database)]
        return ["--database-url", self.database]

    async def stop(self) -> None:
        """Graceful: an in-process hub drains; a subprocess gets SIGTERM, then SIGKILL if it
        has not exited within `stop_timeout`."""
        await self._close_channel()
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop()
        if self.process is not None and self.process.returncode is None:
            try:
                await self.terminate()
            except TimeoutError:
                await self.kill()

    async def terminate(self) -> int:
        """SIGTERM to the subprocess (the graceful path); its exit code."""
        process = self._running()
        process.terminate()
        return await asyncio.wait_for(process.wait(), self._stop_timeout)

    async def kill(self) -> None:
        """SIGKILL to the subprocess: no drain, no goodbye."""
        process = self._running()
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await asyncio.wait_for(process.wait(), self._stop_timeout)

    async def close(self) -> None:
        """Ends the hub however it stands (a subprocess is killed) and releases all."""
        await self._close_channel()
        if self.process is not None and self.process.returncode is None:
            await self.kill()
        await self.stop()
        if self._temp is not None:
            self._temp.cleanup()
            self._temp = None

    def _running(self) -> asyncio.subprocess.Process:
        if self.process is None:
            raise RuntimeError("the hub subprocess has not been started")
        return self.process

    async def _close_channel(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close(None)

    async def __aenter__(self) -> TestHub:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()
        await self.close()


def die_with_parent() -> None:
    """preexec_fn for child processes (`TestHub.subprocess`'s, a benchmark's load): SIGTERM
    when the process that started them dies (Linux only), so a killed run, swarm or test
    leaves no hub or load behind."""
    if sys.platform != "linux":
        return
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
