"""Build and test one component: C99 with gcc and gcov coverage, each declared self-test
`int name(void)` run through a generated harness, every step in the sandbox; the verdict
says what happened. Other languages are UNSUPPORTED (no toolchain here)."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from generated.kernelhub.v1 import hub_pb2 as pb

from .sandbox import Limits, RunResult, Sandbox, read_capped

CC = "/usr/bin/gcc"
GCOV = "/usr/bin/gcov"
MAX_DIAGNOSTICS = 4000  # characters of the compiler's first diagnostics (the contract: 4096)
MAX_DETAIL = 200
LANGUAGES = frozenset({"c", "c99"})
# The harness calls one self-test by name and says what it returned; exit 0 only for 0.
HARNESS = """\
#include <stdio.h>
#include <string.h>
{declarations}
int main(int argc, char **argv) {{
    int r;
    if (argc != 2) return 2;
{dispatch}
    fprintf(stderr, "unknown self-test %s\\n", argv[1]);
    return 2;
}}
"""
DISPATCH = """\
    if (strcmp(argv[1], "{name}") == 0) {{
        r = {name}();
        printf("kernelhub-selftest returned %d\\n", r);
        return r == 0 ? 0 : 1;
    }}
"""
BUILD = (
    f"{CC} -std=c99 -Wall -Wextra -O0 --coverage -Dmain=kernelhub_main -c component.c"
    f" -o component.o && {CC} -std=c99 -O0 --coverage harness.c component.o -o selftest"
)
# Every file gcov reports for component.gcno: `#line` can put the component's lines under
# any name, so all count. The .gcno (what lines there are) is moved out of the scratch dir
# once built, where the self-tests cannot rewrite it. (The counts are measured in the code's
# own process, in a .gcda it writes: forgeable in principle; coverage is a hint, not proof.)
_COVERAGE = re.compile(rb"File '[^'\n]*'\s*\nLines executed:\s*([0-9.]+)% of (\d+)")
_LOCATION = re.compile(rb"^([^:\n]*:\d+(?::\d+)?): (?:fatal )?(?:error|warning)", re.M)
NOTES = "/coverage"  # where the validator's copy of the .gcno and .gcda appears to gcov
_RETURNED = re.compile(rb"kernelhub-selftest returned (-?\d+)")


@dataclass(frozen=True)
class BuildLimits:
    """The compiler's limits and each self-test's."""

    build: Limits = field(default_factory=lambda: Limits(cpu_seconds=20, wall_seconds=60))
    test: Limits = field(default_factory=lambda: Limits(cpu_seconds=5, wall_seconds=10))


def source_of(artifact: pb.Artifact) -> tuple[str, str, list[str]]:
    """(language, code, test entry points) of a code or OS component."""
    if artifact.HasField("code_component"):
        c = artifact.code_component
        return c.language, c.code, list(c.test_entry_points)
    o = artifact.os_component
    return o.language, o.implementation, list(o.test_entry_points)


class Builder:
    def __init__(
        self,
        sandbox: Sandbox,
        limits: BuildLimits | None = None,
        work_dir: Path | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.limits = limits or BuildLimits()
        self.work_dir = work_dir
        self.toolchain = ""
        self._uids: dict[Path, int] = {}  # scratch dir -> the uid its component runs as

    async def start(self) -> None:
        """Learn the toolchain's version (on the host: it is the host's compiler)."""
        if not await asyncio.to_thread(Path(CC).exists):
            return
        process = await asyncio.create_subprocess_exec(
            CC, "--version", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        out, _ = await asyncio.wait_for(process.communicate(), 30)
        self.toolchain = out.decode(errors="replace").splitlines()[0][:200] if out else "gcc"

    async def validate(
        self, artifact: pb.Artifact, deadline: float | None = None
    ) -> pb.ValidationVerdict:
        """The verdict on one component. `deadline` (time.monotonic()): when the lease ends;
        self-tests that would run past it are not run, and the verdict is TIMED_OUT, so it
        still reaches the hub in time."""
        language, code, entry_points = source_of(artifact)
        verdict = pb.ValidationVerdict(sandboxed=self.sandbox.enabled)
        if language.lower() not in LANGUAGES or not self.toolchain:
            verdict.state = pb.VALIDATION_STATE_UNSUPPORTED
            verdict.diagnostics = f"no toolchain for language {language!r} on this validator"
            return verdict
        started = time.monotonic()
        scratch = Path(
            await asyncio.to_thread(tempfile.mkdtemp, prefix="kh-build-", dir=self.work_dir)
        )
        try:
            await self._build_and_test(scratch, code, entry_points, verdict, deadline)
        finally:
            self._uids.pop(scratch, None)
            # Off the loop: a component may have left many files behind.
            await asyncio.to_thread(shutil.rmtree, scratch, True)
        verdict.run_seconds = time.monotonic() - started
        verdict.toolchain = self.toolchain
        return verdict

    async def _run(self, argv: list[str], scratch: Path, limits: Limits) -> RunResult:
        return await self.sandbox.run(argv, scratch, limits, self._uids[scratch])

    def _write_sources(self, scratch: Path, code: str, entry_points: list[str]) -> int:
        (scratch / "component.c").write_text(code)
        declarations = "".join(f"int {name}(void);\n" for name in entry_points)
        dispatch = "".join(DISPATCH.format(name=name) for name in entry_points)
        (scratch / "harness.c").write_text(
            HARNESS.format(declarations=declarations, dispatch=dispatch)
        )
        return self.sandbox.prepare(scratch)

    def _diagnostics(self, stderr: bytes) -> str:
        """The compiler's words; without a sandbox only counts and the first location: it
        quotes whatever the code `#include`s, and there that is any file the host has."""
        if self.sandbox.enabled:
            return stderr.decode(errors="replace")
        first = _LOCATION.search(stderr)
        where = f", the first at {first.group(1).decode(errors='replace')}" if first else ""
        return (
            f"{stderr.count(b'error:')} errors, {stderr.count(b'warning:')} warnings{where}"
            " (the text is left out: without a sandbox it may quote host files)"
        )

    async def _build_and_test(
        self,
        scratch: Path,
        code: str,
        entry_points: list[str],
        verdict: pb.ValidationVerdict,
        deadline: float | None,
    ) -> None:
        self._uids[scratch] = await asyncio.to_thread(
            self._write_sources, scratch, code, entry_points
        )
        build = self.limits.build
        # One sandbox for compile and link (a sandbox costs ~50 ms to start). The component
        # may define its own main: renamed, so the harness's is the one.
        compiled = await self._run(["/bin/sh", "-c", BUILD], scratch, build)
        verdict.warning_count = compiled.stderr.count(b"warning:")
        verdict.peak_memory_kib = compiled.peak_kib
        if not compiled.started:
            # The sandbox did not start (its marker never came): the validator's failure, not
            # the component's. What stderr says is not the test: the compiler prints the
            # code's `#line` names there.
            verdict.state = pb.VALIDATION_STATE_ERROR
            verdict.diagnostics = compiled.stderr.decode(errors="replace")[:MAX_DIAGNOSTICS]
            return
        if compiled.returncode != 0:
            verdict.build_ok = False
            verdict.state = (
                pb.VALIDATION_STATE_TIMED_OUT if compiled.timed_out else pb.VALIDATION_STATE_FAILED
            )
            text = self._diagnostics(compiled.stderr)
            ended = compiled.why(build)
            verdict.diagnostics = f"build failed ({ended}):\n{text}"[:MAX_DIAGNOSTICS]
            return
        verdict.build_ok = True
        kept = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="kh-gcno-", dir=self.work_dir))
        try:
            await self._test(scratch, entry_points, verdict, deadline, compiled, kept)
        finally:
            await asyncio.to_thread(shutil.rmtree, kept, True)

    def _keep_notes(self, scratch: Path, kept: Path) -> None:
        """Move component.gcno out of the scratch dir (before any self-test runs) into
        `kept`, the validator's: what lines there are is then not the code's to say."""
        kept.chmod(0o755)
        data = read_capped(scratch / "component.gcno", self.limits.build.file_bytes)
        if data is not None:
            (kept / "component.gcno").write_bytes(data)
        (scratch / "component.gcno").unlink(missing_ok=True)

    def _take_counts(self, scratch: Path, kept: Path) -> bool:
        """Copy the self-tests' component.gcda beside the kept .gcno (read as if hostile:
        the code could have made it anything); False if there is no such pair."""
        data = read_capped(scratch / "component.gcda", self.limits.build.file_bytes)
        if data is None or not (kept / "component.gcno").exists():
            return False
        (kept / "component.gcda").write_bytes(data)
        return True

    async def _test(
        self,
        scratch: Path,
        entry_points: list[str],
        verdict: pb.ValidationVerdict,
        deadline: float | None,
        compiled: RunResult,
        kept: Path,
    ) -> None:
        await asyncio.to_thread(self._keep_notes, scratch, kept)
        if verdict.warning_count:
            verdict.diagnostics = self._diagnostics(compiled.stderr)[:MAX_DIAGNOSTICS]
        timed_out = False
        test = self.limits.test
        for name in entry_points:
            if deadline is not None and time.monotonic() + test.wall_seconds > deadline:
                timed_out = True
                verdict.test_results.add(name=name, detail="not run: the lease's time ran out")
                continue
            ran = await self._run(["./selftest", name], scratch, test)
            verdict.tests_run += 1
            verdict.peak_memory_kib = max(verdict.peak_memory_kib, ran.peak_kib)
            passed = ran.returncode == 0 and not ran.output_exceeded
            if passed:
                verdict.tests_passed += 1
                detail = "returned 0"
            elif (
                ran.returncode == 1
                and (m := _RETURNED.search(ran.stdout))
                and not (ran.output_exceeded or ran.timed_out)
            ):
                detail = f"returned {m.group(1).decode()}"
            else:
                detail = ran.why(test)
            timed_out = timed_out or ran.timed_out
            verdict.test_results.add(name=name, passed=passed, detail=detail[:MAX_DETAIL])
        files: list[tuple[bytes, bytes]] = []
        if await asyncio.to_thread(self._take_counts, scratch, kept):
            seen = self.sandbox.outside(kept, NOTES)
            coverage = await self.sandbox.run(
                [GCOV, "-n", "-o", f"{seen}/component.gcno", "component.c"],
                scratch,
                self.limits.build,
                self._uids[scratch],
                [(kept, NOTES)],
            )
            files = _COVERAGE.findall(coverage.stdout)
        total = sum(int(lines) for _, lines in files)
        if total:
            executed = sum(float(pct) * int(lines) / 100.0 for pct, lines in files)
            verdict.line_coverage = min(1.0, round(executed) / total)
        if verdict.tests_passed == len(entry_points):
            verdict.state = pb.VALIDATION_STATE_PASSED
        elif timed_out:
            verdict.state = pb.VALIDATION_STATE_TIMED_OUT
        else:
            verdict.state = pb.VALIDATION_STATE_FAILED
        failed = [r for r in verdict.test_results if not r.passed]
        if failed:
            summary = "; ".join(f"{r.name}: {r.detail}" for r in failed)
            verdict.diagnostics = (f"self-tests failed: {summary}\n" + verdict.diagnostics)[
                :MAX_DIAGNOSTICS
            ]
