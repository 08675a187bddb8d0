"""The sandbox every untrusted step runs in: bubblewrap (no network, no host files but the
toolchain, read-only; one scratch directory writable; own pid, user, ipc, uts namespaces;
dies with the validator) around prlimit (CPU, address space, processes, file size, no core)
and GNU time (peak memory), as an unprivileged uid, under a wall-clock timeout and an
output cap. The validator only talks to it with asyncio subprocesses.

Memory: run as root where the cgroup v1 memory and pids controllers are the validator's to
divide, each run gets a cgroup of its own: `total_memory_bytes` for all its processes (the
kernel kills past it), `processes` tasks, and the peak memory it reports. Everywhere, the
address-space limit is per process, so `processes` x `memory_bytes` (+ the /dev/shm cap) is
what one run may take at most; Limits refuses more than MEMORY_BUDGET.
Inside, `/` and `/dev` are read-only (they are tmpfs: RAM), /dev/shm is capped, and no
nested user namespace can be made.

GNU time's report goes to a file outside the scratch dir, bound in as a single file (which
the code cannot unlink or replace) and read back defensively: the code may still write
into it, so the peak memory it gives is the code's word (used only without cgroups, and
never for a limit).

`--no-sandbox` keeps the rlimits, the timeout and the cap but drops bubblewrap: the code
then sees the host (every verdict says `sandboxed: false`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

log = logging.getLogger(__name__)

BWRAP = "/usr/bin/bwrap"
PRLIMIT = "/usr/bin/prlimit"
GNU_TIME = "/usr/bin/time"
SETPRIV = "/usr/bin/setpriv"
NOBODY = 65534  # the uid and gid the code sees itself run as, inside the sandbox
# Run by root, the validator gives each component a uid of its own from this range, outside:
# the process limit counts one component's processes only, and no two components (nor the
# leftovers of one killed) share anything a uid owns.
UID_BASE, UID_COUNT = 200_000, 1_000_000
# The toolchain: read-only, and all the code can see of the host.
READ_ONLY = ("/usr", "/etc/alternatives")
SCRATCH = "/work"  # where the scratch directory appears inside
REPORT = "/run/kernelhub-time"  # where GNU time's report file appears inside
SH = "/bin/sh"
# Printed inside the sandbox (to stderr) before the tool runs: its absence, and not what
# stderr says (the code controls that), tells a sandbox that did not start.
STARTED = 'printf "%s\\n" "$0" >&2 && exec "$@"'
MEMORY_BUDGET = 4 << 30  # processes x address space, per run
REPORT_BYTES = 4096  # of GNU time's report read back
CGROUPS = Path("/sys/fs/cgroup")
# Joins the cgroups named by the first two arguments, then runs the rest (as root, before
# the uid is dropped: the code cannot leave them).
JOIN = 'echo $$ > "$1" && echo $$ > "$2" && shift 2 && exec "$@"'
EMPTY_POLLS, EMPTY_POLL = 200, 0.005  # waiting (off the loop) for a killed cgroup to empty


class SandboxUnavailable(RuntimeError):
    """No working sandbox: the message says what is missing and what to do."""


@dataclass(frozen=True)
class Limits:
    """What one step may take. The builder uses wider limits for the compiler."""

    cpu_seconds: int = 10
    wall_seconds: float = 30.0
    memory_bytes: int = 256 * 1024 * 1024  # address space, per process
    processes: int = 16  # per uid: the compiler's own children fit, a fork bomb does not
    file_bytes: int = 16 * 1024 * 1024
    output_bytes: int = 64 * 1024  # stdout and stderr kept; beyond, the run is killed
    # The scratch dir on the host's disk: FSIZE caps each file, this the whole dir (bytes
    # and entries), checked every DISK_POLL seconds while a step runs; beyond, it is killed.
    disk_bytes: int = 64 * 1024 * 1024
    disk_entries: int = 4096
    shm_bytes: int = 16 * 1024 * 1024  # /dev/shm inside (tmpfs: RAM)
    total_memory_bytes: int = 1 << 30  # all the run's processes together (with cgroups)

    def __post_init__(self) -> None:
        """Refuse limits whose worst case (every process at its address-space limit) is
        more than the stated budget: the per-process limit alone does not bound a run."""
        if self.processes * self.memory_bytes > MEMORY_BUDGET:
            raise ValueError(
                f"{self.processes} processes x {self.memory_bytes >> 20} MiB is more than "
                f"the memory budget of {MEMORY_BUDGET >> 20} MiB per run"
            )


@dataclass(frozen=True)
class RunResult:
    returncode: int  # the command's exit status (128 + N for a signal, as a shell says)
    stdout: bytes
    stderr: bytes
    wall_seconds: float
    peak_kib: int = 0
    signal: int = 0  # the signal that killed the command (0: it exited)
    timed_out: bool = False  # the wall clock ran out
    output_exceeded: bool = False
    disk_exceeded: bool = False
    memory_exceeded: bool = False  # the cgroup's memory limit killed a process
    started: bool = True  # the sandbox started (its marker came before the tool ran)

    def why(self, limits: Limits) -> str:
        """In words, what ended a run that did not exit 0."""
        if self.timed_out:
            return f"wall-clock limit ({limits.wall_seconds:g} s)"
        if self.memory_exceeded:
            return f"memory limit ({limits.total_memory_bytes} bytes in all)"
        if self.disk_exceeded:
            return f"disk limit ({limits.disk_bytes} bytes, {limits.disk_entries} files)"
        if self.output_exceeded:
            return f"output limit ({limits.output_bytes} bytes)"
        if self.signal == signal.SIGXCPU or (
            self.signal == signal.SIGKILL and self.wall_seconds >= limits.cpu_seconds * 0.9
        ):
            return f"CPU time limit ({limits.cpu_seconds} s)"
        if self.signal == signal.SIGXFSZ:
            return f"file size limit ({limits.file_bytes} bytes)"
        if self.signal:
            return f"killed by {signal.Signals(self.signal).name}"
        return f"exited with status {self.returncode}"


class Sandbox:
    def __init__(self, enabled: bool = True, bwrap: str = BWRAP) -> None:
        self.enabled = enabled
        self.bwrap = bwrap
        self._as_root = os.geteuid() == 0
        # The validator's own memory and pids cgroups, if it may divide them (else None).
        self.cgroups = _cgroup_bases() if self._as_root else None

    def _wrap(
        self,
        argv: Sequence[str],
        scratch: Path,
        limits: Limits,
        report: Path,
        uid: int,
        marker: str,
        read_only: Sequence[tuple[Path, str]] = (),
        cgroups: Sequence[Path] = (),
    ) -> list[str]:
        limited = [
            SH,
            "-c",
            STARTED,
            marker,
            PRLIMIT,
            f"--cpu={limits.cpu_seconds}",
            f"--as={limits.memory_bytes}",
            f"--nproc={limits.processes}",
            f"--fsize={limits.file_bytes}",
            "--core=0",
            GNU_TIME,
            "-f",
            "%M",
            "-o",
            REPORT if self.enabled else str(report),
            *argv,
        ]
        drop = [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--"]
        if cgroups:
            procs = [str(group / "cgroup.procs") for group in cgroups]
            drop = [SH, "-c", JOIN, "sh", *procs, *drop]
        if not self.enabled:
            return (drop if self._as_root else []) + limited
        jail = [self.bwrap, "--unshare-all", "--unshare-user", "--disable-userns"]
        jail += ["--die-with-parent", "--new-session"]
        jail += ["--uid", str(NOBODY), "--gid", str(NOBODY)]
        for path in READ_ONLY:
            if Path(path).exists():
                jail += ["--ro-bind", path, path]
        for link in ("bin", "lib", "lib64", "sbin"):
            if Path(f"/usr/{link}").exists():
                jail += ["--symlink", f"usr/{link}", f"/{link}"]
        jail += ["--proc", "/proc", "--dev", "/dev", "--bind", str(scratch), SCRATCH]
        jail += ["--size", str(limits.shm_bytes), "--tmpfs", "/dev/shm"]
        for host, seen in read_only:
            jail += ["--ro-bind", str(host), seen]
        jail += ["--bind", str(report), REPORT, "--remount-ro", "/dev", "--remount-ro", "/"]
        jail += ["--chdir", SCRATCH, "--clearenv", "--setenv", "PATH", "/usr/bin:/bin"]
        jail += ["--setenv", "TMPDIR", f"{SCRATCH}/tmp", "--setenv", "HOME", SCRATCH]
        # bubblewrap as the component's uid too: the processes the code makes count against
        # that uid's process limit, not root's (which every root process on the host fills).
        return (drop if self._as_root else []) + jail + ["--", *limited]

    def prepare(self, scratch: Path) -> int:
        """Make `scratch` the code's to write; returns the uid its runs use (`run(uid=)`)."""
        (scratch / "tmp").mkdir(parents=True, exist_ok=True)
        uid = UID_BASE + secrets.randbelow(UID_COUNT) if self._as_root else os.geteuid()
        if self._as_root:
            for path in (scratch, scratch / "tmp", *scratch.iterdir()):
                os.chown(path, uid, uid)
        return uid

    def inside(self, path: Path, scratch: Path) -> str:
        """A scratch path as the code sees it."""
        return f"{SCRATCH}/{path.relative_to(scratch)}" if self.enabled else str(path)

    def outside(self, host: Path, seen: str) -> str:
        """Where a `read_only` bind (`run`) appears to the code."""
        return seen if self.enabled else str(host)

    async def run(
        self,
        argv: Sequence[str],
        scratch: Path,
        limits: Limits,
        uid: int = NOBODY,
        read_only: Sequence[tuple[Path, str]] = (),
    ) -> RunResult:
        """Run `argv` (paths as the code sees them) in the sandbox, in `scratch`, as `uid`
        (from `prepare`); `read_only`: (host path, path inside) pairs bound read-only."""
        reports = await asyncio.to_thread(self._report_file, uid)
        cgroups: list[Path] = []
        try:
            if self.cgroups is not None:
                cgroups = await asyncio.to_thread(_make_cgroups, self.cgroups, limits)
            result = await self._run(
                argv, scratch, limits, uid, reports / "time", read_only, cgroups
            )
            if cgroups:
                peak, oom = await asyncio.to_thread(_cgroup_memory, cgroups[0])
                result = replace(result, peak_kib=peak, memory_exceeded=oom)
            return result
        finally:
            if cgroups:
                await asyncio.to_thread(_remove_cgroups, cgroups)
            await asyncio.to_thread(shutil.rmtree, reports, True)

    def _report_file(self, uid: int) -> Path:
        """A directory of the validator's, outside the scratch dir, holding an empty file
        GNU time (as `uid`) may write: the code never sees the directory."""
        directory = Path(tempfile_dir())
        directory.chmod(0o711)
        fd = os.open(directory / "time", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            if self._as_root:
                os.fchown(fd, uid, uid)
        finally:
            os.close(fd)
        return directory

    async def _run(
        self,
        argv: Sequence[str],
        scratch: Path,
        limits: Limits,
        uid: int,
        report: Path,
        read_only: Sequence[tuple[Path, str]],
        cgroups: Sequence[Path],
    ) -> RunResult:
        marker = f"kernelhub-sandbox-{secrets.token_hex(16)}"
        loop = asyncio.get_running_loop()
        start = loop.time()
        process = await asyncio.create_subprocess_exec(
            *self._wrap(argv, scratch, limits, report, uid, marker, read_only, cgroups),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=scratch,
            start_new_session=True,  # its own process group: killed whole
            env={"PATH": "/usr/bin:/bin", "TMPDIR": str(scratch / "tmp"), "HOME": str(scratch)},
        )
        assert process.stdout is not None and process.stderr is not None
        budget = [limits.output_bytes]
        exceeded = asyncio.Event()

        async def read(stream: asyncio.StreamReader) -> bytes:
            kept = bytearray()
            while chunk := await stream.read(65536):
                room = budget[0]
                kept += chunk[: max(room, 0)]
                budget[0] -= len(chunk)
                if budget[0] < 0:
                    exceeded.set()  # the run is killed; what it still wrote is dropped
            # Read to the end (EOF comes once the run is dead): a pipe left unread would
            # keep its transport open past the run.
            return bytes(kept)

        readers = asyncio.gather(read(process.stdout), read(process.stderr))
        disk_full = asyncio.Event()

        async def watch_disk() -> None:
            while True:
                await asyncio.sleep(DISK_POLL)  # a poll's period, not a wait for a condition
                size, entries = await asyncio.to_thread(_usage, scratch, limits.disk_entries)
                if size > limits.disk_bytes or entries > limits.disk_entries:
                    disk_full.set()
                    exceeded.set()
                    return

        watcher = asyncio.ensure_future(watch_disk())
        over: asyncio.Future[Any] = asyncio.ensure_future(exceeded.wait())
        timed_out = False
        try:
            done, _ = await asyncio.wait(
                {cast("asyncio.Future[Any]", readers), over},
                timeout=limits.wall_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                timed_out = True
            if timed_out or exceeded.is_set():
                _kill(process)
            stdout, stderr = await asyncio.wait_for(readers, timeout=10)
            await asyncio.wait_for(process.wait(), timeout=10)
        finally:
            over.cancel()
            watcher.cancel()
            if process.returncode is None:
                _kill(process)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), timeout=10)
            readers.cancel()
        wall = loop.time() - start
        code = process.returncode if process.returncode is not None else -signal.SIGKILL
        code = code if code >= 0 else 128 - code  # killed itself: as a shell says it
        peak, killed_by = await asyncio.to_thread(_read_time, report)
        if code > 128 and not killed_by:
            killed_by = code - 128
        started = stderr.startswith(marker.encode() + b"\n")
        return RunResult(
            returncode=code,
            stdout=stdout,
            stderr=stderr[len(marker) + 1 :] if started else stderr,
            started=started,
            wall_seconds=wall,
            peak_kib=peak,
            signal=killed_by,
            timed_out=timed_out,
            output_exceeded=exceeded.is_set() and not disk_full.is_set(),
            disk_exceeded=disk_full.is_set(),
        )

    async def check(self) -> None:
        """Prove the sandbox works here (a command inside it that must not see the network),
        or raise SandboxUnavailable saying what is missing."""
        needed = [PRLIMIT, GNU_TIME] + ([self.bwrap] if self.enabled else [])
        if self._as_root:
            needed.append(SETPRIV)
        missing = _missing(needed)
        if missing:
            packages = {self.bwrap: "bubblewrap", PRLIMIT: "util-linux", GNU_TIME: "time"}
            raise SandboxUnavailable(
                f"missing {', '.join(missing)} (apt-get install "
                f"{' '.join(sorted({packages.get(m, 'util-linux') for m in missing}))}); "
                "or run with --no-sandbox, and every verdict will say it was not sandboxed"
            )
        if self.cgroups is not None:
            try:
                await asyncio.to_thread(_probe_cgroups, self.cgroups)
            except OSError as error:  # visible but not ours to divide (a container's view)
                log.warning("no per-run cgroups (%s): per-process limits only", error)
                self.cgroups = None
        if not self.enabled:
            return
        scratch = Path(tempfile_dir())
        try:
            uid = self.prepare(scratch)
            result = await self.run(
                ["/bin/sh", "-c", "echo ok"], scratch, Limits(wall_seconds=20), uid
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if not result.started or result.returncode != 0 or result.stdout.strip() != b"ok":
            raise SandboxUnavailable(
                f"bubblewrap cannot start a sandbox here (exit {result.returncode}: "
                f"{result.stderr.decode(errors='replace').strip()[:300]}); it needs unprivileged "
                "user namespaces (sysctl kernel.unprivileged_userns_clone=1); or run with "
                "--no-sandbox, and every verdict will say it was not sandboxed"
            )


DISK_POLL = 0.05


def _usage(root: Path, most: int) -> tuple[int, int]:
    """Bytes (allocated, so sparse files count as what they take) and entries under `root`,
    counting no further than `most` + 1 entries."""
    size = entries = 0
    stack = [str(root)]
    while stack and entries <= most:
        try:
            with os.scandir(stack.pop()) as found:
                for entry in found:
                    entries += 1
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    size += info.st_blocks * 512
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except OSError:
            continue
    return size, entries


def _missing(paths: Sequence[str]) -> list[str]:
    return [path for path in paths if not Path(path).exists()]


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="kernelhub-validator-")


def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


def _read_time(path: Path) -> tuple[int, int]:
    """GNU time's report: peak RSS in KiB, and the signal that killed the command (or 0).
    The code could write into it: read as `read_capped` reads. Blocking: off the loop."""
    data = read_capped(path, REPORT_BYTES)
    lines = (data or b"").decode(errors="replace").splitlines()[-4:]
    peak = int(lines[-1]) if lines and lines[-1].strip().isdigit() else 0
    killed = 0
    for line in lines:
        if line.startswith("Command terminated by signal "):
            with contextlib.suppress(ValueError):
                killed = int(line.rsplit(" ", 1)[1])
    return peak, killed


def read_capped(path: Path, most: int) -> bytes | None:
    """A file the code could have made, read as if hostile: no symlink followed, no blocking
    on a FIFO, a regular file only, `most` bytes at most (None: not such a file). Blocking:
    call it off the event loop."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = []
        left = most
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _cgroup_bases() -> dict[str, Path] | None:
    """The validator's own cgroup v1 memory and pids directories, if it may make cgroups
    in both; else None (and only the per-process limits apply)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    bases: dict[str, Path] = {}
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for name in parts[1].split(","):
            if name in ("memory", "pids"):
                bases[name] = CGROUPS / name / parts[2].lstrip("/")
    if set(bases) != {"memory", "pids"} or not all(
        os.access(base, os.W_OK) and (base / "cgroup.procs").exists() for base in bases.values()
    ):
        return None
    return bases


def _probe_cgroups(bases: dict[str, Path]) -> None:
    """Make and remove one run's cgroups: OSError if they cannot be made here."""
    _remove_cgroups(_make_cgroups(bases, Limits()))


def _make_cgroups(bases: dict[str, Path], limits: Limits) -> list[Path]:
    """A memory and a pids cgroup for one run, limited; [memory, pids]."""
    name = f"kernelhub-{secrets.token_hex(8)}"
    made: list[Path] = []
    try:
        memory = bases["memory"] / name
        memory.mkdir()
        made.append(memory)
        (memory / "memory.limit_in_bytes").write_text(str(limits.total_memory_bytes))
        swap = memory / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limits.total_memory_bytes))
        pids = bases["pids"] / name
        pids.mkdir()
        made.append(pids)
        (pids / "pids.max").write_text(str(limits.processes))
    except OSError:
        _remove_cgroups(made)
        raise
    return made


def _cgroup_memory(memory: Path) -> tuple[int, bool]:
    """The run's peak memory in KiB (the kernel's count: not the code's word), and whether
    the limit killed a process."""
    try:
        peak = int((memory / "memory.max_usage_in_bytes").read_text()) >> 10
        control = (memory / "memory.oom_control").read_text().split()
    except (OSError, ValueError):
        return 0, False
    kills = control[control.index("oom_kill") + 1] if "oom_kill" in control else "0"
    return peak, kills.isdigit() and int(kills) > 0


def _remove_cgroups(groups: Sequence[Path]) -> None:
    """Kill what is left in them (the pid namespace's last processes die a moment after the
    run) and remove them; a bounded wait, then left behind (logged) rather than hang."""
    for group in reversed(groups):
        for _ in range(EMPTY_POLLS):
            try:
                tasks = (group / "cgroup.procs").read_text().split()
            except OSError:
                break
            if not tasks:
                break
            for task in tasks:
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(task), signal.SIGKILL)
            time.sleep(EMPTY_POLL)  # the kernel's teardown: polled, bounded
        try:
            group.rmdir()
        except OSError as error:
            log.warning("cgroup %s not removed: %s", group, error)
