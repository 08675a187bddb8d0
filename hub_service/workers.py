"""`kernelhub-hub serve --workers N`: N hub processes on one port and one PostgreSQL database,
and the parent that keeps them running, so one hub uses N of a machine's cores.

Each worker is a replica (docs/scaling.md): the shared log's lock orders their commits, and each
delivers every worker's events. The parent serves nothing itself:

- It reserves the port: a socket bound with SO_REUSEPORT and never listening, held for the
  parent's life. `--port 0` thus gives one number every worker binds (gRPC's `so_reuseport`);
  the kernel spreads new connections over the workers' listening sockets; and nothing else can
  take the port while a worker restarts: a plain hub binds without SO_REUSEPORT, and a bind
  without it is tried first, so a port anyone holds (another supervisor's, a gRPC server with
  SO_REUSEPORT) is refused rather than shared. A wildcard host is reserved as gRPC binds it,
  dual-stack on [::].
- It starts each worker with multiprocessing's `spawn` (a fresh interpreter; its `HubConfig`
  pickled). The worker says it is serving over a socket pair, and reads EOF on it when the
  parent dies, which drains it: no worker serves unsupervised.
- A worker that exits is restarted after a backoff (0.5 s, doubling to 10 s with each death of
  that worker within a minute); more than `worker_max_restarts` deaths of one worker within a
  minute, or more than that many starts in a row that never served (a worker killed
  `START_TIMEOUT` after each start dies less often than once a minute), stop every worker,
  and the parent exits 1 saying why.
- SIGTERM or SIGINT is forwarded (SIGTERM) to every worker, each drains as one hub does; the
  parent waits `shutdown_grace` + `STOP_MARGIN`, then SIGKILLs what is left. It exits 0 when
  every worker drained.

The parent runs no event loop: it waits on its workers' sentinels and pipes and on a signal
wakeup fd (`multiprocessing.connection.wait`), each wait bounded by its next deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from . import serving
from .config import HubConfig
from .server import HubServer

log = logging.getLogger(__name__)

RESTART_WINDOW = 60.0  # seconds over which a worker's deaths count towards giving up
BACKOFF_FIRST = 0.5  # seconds before the first restart; doubled for each death in the window
BACKOFF_MAX = 10.0
# What a draining worker may take beyond `shutdown_grace`: its last commit, the writer
# process's exit, the database's connections closed.
STOP_MARGIN = 10.0
START_TIMEOUT = 120.0  # a worker not serving this long after its start is killed (a death)
KILL_WAIT = 5.0  # seconds for a SIGKILLed worker to be reaped
_SPAWN = multiprocessing.get_context("spawn")


class WorkersError(ValueError):
    """Settings that cannot run as workers; the message says why."""


def check(config: HubConfig) -> None:
    """Workers are replicas: they need PostgreSQL, and ports that do not collide."""
    if not config.database_url.startswith("postgresql"):
        raise WorkersError(
            f"--workers {config.workers} needs PostgreSQL (a postgresql+psycopg:// URL): "
            "workers are replicas sharing one database's log, its advisory lock and "
            "LISTEN/NOTIFY; a SQLite or memory:// hub is one process (--workers 1)"
        )
    if config.metrics_port:
        last = config.metrics_port + config.workers - 1
        if last > 65535:
            raise WorkersError(
                f"--metrics-port {config.metrics_port}: worker i serves metrics on it + i, "
                f"and {last} is past 65535"
            )
        if config.port and config.metrics_port <= config.port <= last:
            raise WorkersError(
                f"--port {config.port} is among the workers' metrics ports "
                f"{config.metrics_port}-{last} (worker i: --metrics-port + i)"
            )


def supervise(config: HubConfig, log_level: str) -> int:
    """Runs `config.workers` workers until a signal drains them; the exit code."""
    try:
        check(config)
        try:
            reserved = _reserve(config.host, config.port)
        except OSError as error:  # the port is taken, or the host is not this machine's
            log.error(
                "kernelhub could not start: %s:%d: %s", config.host, config.port, error.strerror
            )
            return 1
        with reserved:
            port = int(reserved.getsockname()[1])
            if config.metrics_port and config.metrics_port <= port < (
                config.metrics_port + config.workers
            ):
                raise WorkersError(
                    f"port {port} is among the workers' metrics ports; pick --port or "
                    "--metrics-port apart"
                )
            with _signals() as wakeup:
                return Supervisor(dataclasses.replace(config, port=port), log_level, wakeup).run()
    except WorkersError as error:
        print(f"kernelhub-hub: {error}", file=sys.stderr)
        return 2


# gRPC binds a wildcard host as one dual-stack socket on [::] (IPv4 only where IPv6 is missing).
_WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def _reserve(host: str, port: int) -> socket.socket:
    """A SO_REUSEPORT socket bound to `host:port` (0: a free port) and never listened on: it
    holds the port for the workers, and takes none of their connections. Raises OSError
    (EADDRINUSE) when anything holds the port already, SO_REUSEPORT or not: another
    supervisor's reservation, a gRPC server with its default options."""
    address: tuple[Any, ...]
    if host in _WILDCARDS and _has_ipv6():
        family, kind, proto, address = socket.AF_INET6, socket.SOCK_STREAM, 0, ("::", port)
    else:
        family, kind, proto, _, address = socket.getaddrinfo(
            "0.0.0.0" if host in _WILDCARDS else host.removeprefix("[").removesuffix("]"),
            port,
            type=socket.SOCK_STREAM,
            flags=socket.AI_PASSIVE,
        )[0]
    if port:
        # A plain bind (SO_REUSEADDR, for connections in TIME_WAIT, but no SO_REUSEPORT) fails
        # on a port anyone holds; the reservation alone would share it with their sockets.
        with _socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    reserved = _socket(family, kind, proto)
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind(address)
    except BaseException:
        reserved.close()
        raise
    return reserved


def _has_ipv6() -> bool:
    """Whether this kernel makes IPv6 sockets (Python may be built with IPv6 it lacks)."""
    if not socket.has_ipv6:
        return False
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def _socket(family: int, kind: int, proto: int) -> socket.socket:
    """A socket; IPv6 ones dual-stack, as gRPC's wildcard listener is."""
    made = socket.socket(family, kind, proto)
    if family == socket.AF_INET6:
        try:
            made.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except BaseException:
            made.close()
            raise
    return made


def _ignore(signum: int, frame: Any) -> None:
    """The signal's number reaches the wakeup fd; nothing else is done here."""


@contextlib.contextmanager
def _signals() -> Iterator[socket.socket]:
    """SIGINT and SIGTERM as bytes on a socket the supervisor's wait watches."""
    receive, send = socket.socketpair()
    receive.setblocking(False)
    send.setblocking(False)
    previous = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, signal.SIGTERM)}
    old_fd = signal.set_wakeup_fd(send.fileno())
    try:
        yield receive
    finally:
        signal.set_wakeup_fd(old_fd)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        receive.close()
        send.close()


@dataclass
class Worker:
    """One worker slot: its process (None while it waits to be restarted) and its deaths."""

    index: int
    config: HubConfig
    process: BaseProcess | None = None
    pipe: Connection | None = None  # the parent's end; the worker's says when it serves
    started: float = 0.0
    serving: bool = False
    restart_at: float | None = None
    killed_at: float | None = None  # when it was killed for not serving: reaped next
    deaths: deque[float] = field(default_factory=deque)
    failed_starts: int = 0  # deaths in a row without serving, whenever they came

    def describe_exit(self) -> str:
        assert self.process is not None
        code = self.process.exitcode
        if code is not None and code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"


class Supervisor:
    """The parent of `config.workers` workers on `config.port` (already reserved)."""

    def __init__(self, config: HubConfig, log_level: str, wakeup: socket.socket) -> None:
        self.config = config
        self.log_level = log_level
        self.wakeup = wakeup
        self.workers = [Worker(i, _worker_config(config, i)) for i in range(config.workers)]
        self.announced = False

    def run(self) -> int:
        """Every worker stopped whatever happens: a failure here (say, spawning a restart)
        must not leave workers serving on their own."""
        code: int | None = None
        try:
            code = self._supervise()
        finally:
            drained = self._stop_all()
        return drained if code is None else code

    def _supervise(self) -> int | None:
        """Starts and tends the workers: 1 once one died too often, None at a signal."""
        for worker in self.workers:
            self._start(worker)
        while True:
            now = time.monotonic()
            ready = wait(self._waitables(), timeout=self._next_deadline(now) - now)
            if self.wakeup in ready:
                got = b""
                with contextlib.suppress(BlockingIOError):
                    got = self.wakeup.recv(64)
                names = ", ".join(
                    signal.Signals(b).name for b in got if b in signal.valid_signals()
                )
                log.info("%s received: draining %d workers", names or "a signal", len(self.workers))
                return None
            if self._tend(set(ready)):
                return 1

    def _waitables(self) -> list[Any]:
        waitables: list[Any] = [self.wakeup]
        for worker in self.workers:
            if worker.process is not None:
                waitables.append(worker.process.sentinel)
                if not worker.serving and worker.pipe is not None:
                    waitables.append(worker.pipe)
        return waitables

    def _next_deadline(self, now: float) -> float:
        deadlines = [now + RESTART_WINDOW]
        for worker in self.workers:
            if worker.restart_at is not None:
                deadlines.append(worker.restart_at)
            elif worker.process is not None and not worker.serving and worker.killed_at is None:
                deadlines.append(worker.started + START_TIMEOUT)
            # A killed worker's sentinel wakes the wait when it is reaped: no deadline, which
            # would be past (a loop spinning) while the kernel takes its time.
        return max(now, min(deadlines))

    def _tend(self, ready: set[Any]) -> bool:
        """One round: workers that said they serve, died, are overdue or due a restart. True
        once a worker died too often (the supervisor gives up)."""
        now = time.monotonic()
        for worker in self.workers:
            process = worker.process
            if process is None:
                if worker.restart_at is not None and worker.restart_at <= now:
                    self._start(worker)
                continue
            if worker.pipe is not None and worker.pipe in ready:
                self._heard(worker)
            if process.sentinel in ready:
                if self._died(worker, now):
                    return True
            elif (
                not worker.serving
                and worker.killed_at is None
                and now - worker.started > START_TIMEOUT
            ):
                log.error(
                    "worker %d (pid %s) is not serving %gs after its start: killing it",
                    worker.index,
                    process.pid,
                    START_TIMEOUT,
                )
                process.kill()  # its sentinel is ready once it is reaped: a death
                worker.killed_at = now
        if not self.announced and all(w.serving for w in self.workers):
            self.announced = True
            print(
                f"kernelhub serving on {self.config.host}:{self.config.port} "
                f"({len(self.workers)} workers)",
                flush=True,
            )
        return False

    def _start(self, worker: Worker) -> None:
        ours, theirs = _SPAWN.Pipe()
        process = _SPAWN.Process(
            target=run_worker,
            args=(worker.config, worker.index, theirs, self.log_level),
            name=f"kernelhub-worker-{worker.index}",
        )
        process.start()
        theirs.close()  # the worker's end lives in the worker: EOF here when it dies
        worker.process, worker.pipe = process, ours
        worker.started, worker.serving, worker.restart_at = time.monotonic(), False, None
        worker.killed_at = None

    def _heard(self, worker: Worker) -> None:
        assert worker.pipe is not None and worker.process is not None
        try:
            port, metrics_port = worker.pipe.recv()
        except (EOFError, OSError):  # it died before saying so: its sentinel tells
            worker.pipe.close()
            worker.pipe = None  # not waited on again meanwhile
            return
        worker.serving = True
        log.info(
            "worker %d (pid %s) serving on %s:%d%s",
            worker.index,
            worker.process.pid,
            self.config.host,
            port,
            f"; metrics on :{metrics_port}/metrics" if metrics_port is not None else "",
        )

    def _died(self, worker: Worker, now: float) -> bool:
        """Reaps a dead worker and schedules its restart; True when it died too often."""
        assert worker.process is not None
        worker.process.join(KILL_WAIT)
        how, pid = worker.describe_exit(), worker.process.pid
        if worker.pipe is not None:
            worker.pipe.close()
        worker.process.close()
        worker.process = worker.pipe = None
        worker.failed_starts = 0 if worker.serving else worker.failed_starts + 1
        worker.serving = False
        worker.deaths.append(now)
        while worker.deaths and worker.deaths[0] < now - RESTART_WINDOW:
            worker.deaths.popleft()
        limit = self.config.worker_max_restarts
        if len(worker.deaths) > limit:
            log.error(
                "worker %d (pid %s) %s, its death number %d within %gs (--worker-max-restarts "
                "%d): giving up, stopping the other workers",
                worker.index,
                pid,
                how,
                len(worker.deaths),
                RESTART_WINDOW,
                limit,
            )
            return True
        # A worker killed START_TIMEOUT after each start dies less often than the window
        # counts: its starts that never served count whenever they came.
        if worker.failed_starts > limit:
            log.error(
                "worker %d (pid %s) %s, its start number %d in a row that never served "
                "(--worker-max-restarts %d): giving up, stopping the other workers",
                worker.index,
                pid,
                how,
                worker.failed_starts,
                limit,
            )
            return True
        backoff = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (len(worker.deaths) - 1))
        log.warning(
            "worker %d (pid %s) %s; restarting it in %.1fs", worker.index, pid, how, backoff
        )
        worker.restart_at = now + backoff
        return False

    def _stop_all(self) -> int:
        """SIGTERM to every worker; waits for their drains, then SIGKILLs the rest. 0 when
        every worker that was serving drained."""
        running = [w for w in self.workers if w.process is not None]
        for worker in running:
            assert worker.process is not None
            worker.process.terminate()
        deadline = time.monotonic() + self.config.shutdown_grace + STOP_MARGIN
        left = list(running)
        while left and (remaining := deadline - time.monotonic()) > 0:
            wait([w.process.sentinel for w in left if w.process is not None], timeout=remaining)
            left = [w for w in left if w.process is not None and w.process.is_alive()]
        failed = []
        for worker in left:
            assert worker.process is not None
            log.error(
                "worker %d (pid %s) did not drain within %gs: killing it",
                worker.index,
                worker.process.pid,
                self.config.shutdown_grace + STOP_MARGIN,
            )
            worker.process.kill()
            failed.append(worker)
        for worker in running:
            assert worker.process is not None
            worker.process.join(KILL_WAIT)
            # A worker still starting had nothing to drain: SIGTERM ends it as it stands.
            if worker.serving and worker.process.exitcode != 0 and worker not in failed:
                log.error("worker %d %s while draining", worker.index, worker.describe_exit())
                failed.append(worker)
            if worker.pipe is not None:
                worker.pipe.close()
        if failed:
            return 1
        log.info("every worker drained")
        return 0


def _worker_config(config: HubConfig, index: int) -> HubConfig:
    """Worker `index`'s settings: a replica on the reserved port; metrics on its own port."""
    metrics = config.metrics_port
    return dataclasses.replace(
        config,
        replica=True,
        metrics_port=metrics + index if metrics else metrics,
    )


def run_worker(config: HubConfig, index: int, pipe: Connection, log_level: str) -> None:
    """A worker process: one hub (serving.serve) that tells the parent when it serves."""
    logging.basicConfig(
        level=log_level, format=f"%(asctime)s - hub[{index}] - %(levelname)s - %(message)s"
    )
    sys.exit(asyncio.run(_serve_worker(config, pipe)))


async def _serve_worker(config: HubConfig, pipe: Connection) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def parent_gone() -> None:
        loop.remove_reader(pipe.fileno())
        log.warning("the supervisor is gone: draining")
        stop.set()

    def announce(config: HubConfig, hub: HubServer) -> None:
        endpoint = hub.metrics_endpoint
        try:
            pipe.send((hub.port, endpoint.port if endpoint is not None else None))
        except OSError:  # the parent died while this worker started
            stop.set()
            return
        # The parent never writes: readable is EOF, the parent gone.
        loop.add_reader(pipe.fileno(), parent_gone)

    return await serving.serve(config, announce, stop)
