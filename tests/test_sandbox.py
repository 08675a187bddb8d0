"""Hostile components through a real hub and a real validator in its bubblewrap sandbox:
each ends in a failing verdict, the validator keeps working (a good component after them
passes) and the host is untouched (no file outside the scratch dir, the hub's database
unread, no connection to the hub's port). Tight limits keep the whole battery short."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.roles import Role
from hub_service.testing import TestHub
from trainer_service import HubClient
from validator_service.builder import Builder, BuildLimits
from validator_service.sandbox import MEMORY_BUDGET, Limits, Sandbox, _read_time
from validator_service.worker import Validator

from .conftest import make_config

LIMITS = BuildLimits(
    build=Limits(cpu_seconds=4, wall_seconds=20, memory_bytes=256 << 20, processes=16),
    test=Limits(
        cpu_seconds=1,
        wall_seconds=3,
        memory_bytes=128 << 20,
        processes=16,
        disk_bytes=32 << 20,
        total_memory_bytes=256 << 20,
    ),
)
FAILING = {pb.VALIDATION_STATE_FAILED, pb.VALIDATION_STATE_TIMED_OUT}
# Each self-test returns 0 only if its attack worked: a pass would be an escape.
HOSTILE = {
    "endless_loop": "int spin(void) { volatile unsigned long n = 0; for (;;) n++; return 0; }\n",
    "fork_bomb": (
        "#define _POSIX_C_SOURCE 200809L\n#include <unistd.h>\n"
        "int bomb(void) { for (;;) fork(); return 0; }\n"
    ),
    "memory_hog": (
        "#include <stdlib.h>\n#include <string.h>\n"
        "int hog(void) { for (;;) { char *p = malloc(1 << 24); if (!p) return 1;"
        " memset(p, 1, 1 << 24); } }\n"
    ),
    "gigabyte_output": (
        "#include <stdio.h>\n#include <string.h>\n"
        "int flood(void) { static char buf[1 << 16]; memset(buf, 'x', sizeof buf);"
        " for (int i = 0; i < 16384; i++) fwrite(buf, 1, sizeof buf, stdout); return 0; }\n"
    ),
    "write_outside": (
        "#include <stdio.h>\n"
        'int escape(void) { FILE *f = fopen("{escape}", "w"); if (!f) return 1;'
        ' fputs("escaped", f); fclose(f); return 0; }\n'
    ),
    "read_host_file": (
        "#include <stdio.h>\n"
        'int steal(void) { FILE *f = fopen("{database}", "r"); if (!f) return 1;'
        " return fgetc(f) == EOF; }\n"
    ),
    "network": (
        "#define _POSIX_C_SOURCE 200809L\n"
        "#include <arpa/inet.h>\n#include <netinet/in.h>\n#include <sys/socket.h>\n"
        "int dial(void) { struct sockaddr_in a = {0}; int s = socket(AF_INET, SOCK_STREAM, 0);"
        " if (s < 0) return 1; a.sin_family = AF_INET; a.sin_port = htons({port});"
        ' a.sin_addr.s_addr = inet_addr("127.0.0.1");'
        " return connect(s, (struct sockaddr *)&a, sizeof a) == 0 ? 0 : 1; }\n"
    ),
    "compiler_bomb": (
        "#define A0 1,\n"
        + "".join(f"#define A{i} A{i - 1} A{i - 1}\n" for i in range(1, 32))
        + "int bomb[] = { A31 0 };\nint nothing(void) { return 0; }\n"
    ),
    "segfault": "int crash(void) { volatile int *p = 0; return *p; }\n",
    "disk_filler": (
        "#include <stdio.h>\n#include <string.h>\n"
        "int fill(void) { static char buf[1 << 16]; char name[32]; memset(buf, 'x', sizeof buf);"
        ' for (int i = 0; i < 100000; i++) { sprintf(name, "f%d", i); FILE *f = fopen(name, "w");'
        " if (!f) return 1; for (int j = 0; j < 64; j++) fwrite(buf, 1, sizeof buf, f);"
        " fclose(f); } return 0; }\n"
    ),
}
ENTRY = {
    "endless_loop": "spin",
    "fork_bomb": "bomb",
    "memory_hog": "hog",
    "gigabyte_output": "flood",
    "write_outside": "escape",
    "read_host_file": "steal",
    "network": "dial",
    "compiler_bomb": "nothing",
    "segfault": "crash",
    "disk_filler": "fill",
}


def component(name: str, code: str, entry: str) -> pb.CodeComponent:
    return pb.CodeComponent(
        component_id=name,
        name=name,
        language="c",
        code=code,
        specialization=pb.SPECIALIZATION_SECURITY,
        test_entry_points=[entry],
    )


@pytest.fixture
def work() -> Iterator[Path]:
    """Scratch dirs where the sandbox's uids can reach them (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="kh-test-validator-"))
    path.chmod(0o711)
    try:
        yield path
        assert not list(path.iterdir()), "scratch dirs are removed"
    finally:
        shutil.rmtree(path, ignore_errors=True)


TOOLS = ("/usr/bin/bwrap", "/usr/bin/time", "/usr/bin/gcc", "/usr/bin/prlimit")
needs_tools = pytest.mark.skipif(
    not all(os.path.exists(tool) for tool in TOOLS),
    reason=f"the validator needs {', '.join(TOOLS)} (scripts/setup installs them)",
)


@needs_tools
async def test_hostile_components_fail_and_harm_nothing(tmp_path: Path, work: Path) -> None:
    database = tmp_path / "hub.db"
    escape = tmp_path / "escaped.txt"
    async with TestHub.in_process(make_config(f"sqlite:///{database}")) as hub:
        sharer = await hub.issue_token("attacker")
        validator_token = await hub.issue_token("v1", role=Role.VALIDATOR)
        sandbox = Sandbox()
        await sandbox.check()
        validator = Validator(hub.target, validator_token, Builder(sandbox, LIMITS, work), "v1")
        stop = asyncio.Event()
        running = asyncio.ensure_future(validator.run(stop, limit=len(HOSTILE) + 1))
        names: dict[str, str] = {}
        async with HubClient(
            hub.target, "attacker", sharer, specialization=pb.SPECIALIZATION_SECURITY
        ) as client:
            for name, code in HOSTILE.items():
                source = (
                    code.replace("{escape}", str(escape))
                    .replace("{database}", str(database))
                    .replace("{port}", str(hub.port))
                )
                receipt = await client.share_code_component(component(name, source, ENTRY[name]))
                names[receipt.resource_id] = name
            good = await client.share_code_component(
                component("good", "int good(void) { return 0; }\n", "good")
            )
            verdicts: dict[str, pb.ValidationVerdict] = {}

            async def collect() -> None:
                async for item in client.events():
                    if isinstance(item, pb.HubEvent) and item.HasField("artifact_validated"):
                        verdicts[item.artifact_validated.artifact_id] = (
                            item.artifact_validated.verdict
                        )
                        if len(verdicts) == len(names) + 1:
                            return

            await asyncio.wait_for(collect(), timeout=120)
        counts = await asyncio.wait_for(running, timeout=30)
    states = {names.get(a, "good"): pb.ValidationState.Name(v.state) for a, v in verdicts.items()}
    for artifact_id, name in names.items():
        verdict = verdicts[artifact_id]
        assert verdict.state in FAILING, (name, states, verdict)
        assert verdict.sandboxed
    assert verdicts[good.resource_id].state == pb.VALIDATION_STATE_PASSED, states
    assert verdicts[good.resource_id].line_coverage == 1.0
    assert counts.validated == len(HOSTILE) + 1
    # What each attack met, in the verdict's words.
    detail = {names[a]: v.diagnostics for a, v in verdicts.items() if a in names}
    # The CPU limit, or on a loaded machine the wall clock first: either ends it.
    assert any(limit in detail["endless_loop"] for limit in ("CPU time limit", "wall-clock limit"))
    assert "output limit" in detail["gigabyte_output"]
    assert "returned 1" in detail["read_host_file"] and "returned 1" in detail["network"]
    assert "build failed" in detail["compiler_bomb"]
    assert "SIGSEGV" in detail["segfault"]
    assert "disk limit" in detail["disk_filler"]
    assert not escape.exists()


@needs_tools
async def test_without_the_sandbox_every_verdict_says_so_and_other_languages_are_unsupported(
    work: Path,
) -> None:
    builder = Builder(Sandbox(enabled=False), LIMITS, work)
    await builder.start()
    good = pb.Artifact(
        kind=pb.ARTIFACT_KIND_CODE_COMPONENT,
        code_component=component("good", "int good(void) { return 0; }\n", "good"),
    )
    verdict = await builder.validate(good)
    assert verdict.state == pb.VALIDATION_STATE_PASSED and not verdict.sandboxed
    assert verdict.toolchain.startswith("gcc") and verdict.peak_memory_kib > 0
    assert verdict.line_coverage == 1.0
    assert verdict.warning_count == 0
    sloppy = pb.Artifact(
        kind=pb.ARTIFACT_KIND_CODE_COMPONENT,
        code_component=component("sloppy", "int good(void) { int unused; return 0; }\n", "good"),
    )
    warned = await builder.validate(sloppy)
    assert warned.state == pb.VALIDATION_STATE_PASSED and warned.warning_count == 1
    assert "1 warnings, the first at component.c:1:" in warned.diagnostics
    rust = pb.Artifact(
        kind=pb.ARTIFACT_KIND_OS_COMPONENT,
        os_component=pb.OsComponent(language="rust", implementation="fn main() {}"),
    )
    unsupported = await builder.validate(rust)
    assert unsupported.state == pb.VALIDATION_STATE_UNSUPPORTED
    assert "rust" in unsupported.diagnostics
    broken = pb.Artifact(
        kind=pb.ARTIFACT_KIND_CODE_COMPONENT,
        code_component=component("broken", "int good(void) { return 0 }\n", "good"),
    )
    failed = await builder.validate(broken)
    assert failed.state == pb.VALIDATION_STATE_FAILED and not failed.build_ok
    assert "1 errors" in failed.diagnostics and "component.c" in failed.diagnostics


@needs_tools
async def test_self_tests_that_would_outlast_the_lease_are_not_run(work: Path) -> None:
    builder = Builder(Sandbox(enabled=False), LIMITS, work)
    await builder.start()
    artifact = pb.Artifact(
        kind=pb.ARTIFACT_KIND_CODE_COMPONENT,
        code_component=component("good", "int good(void) { return 0; }\n", "good"),
    )
    verdict = await builder.validate(artifact, deadline=time.monotonic())  # the lease is over
    assert verdict.state == pb.VALIDATION_STATE_TIMED_OUT and verdict.build_ok
    assert verdict.tests_run == 0 and "lease" in verdict.test_results[0].detail


def artifact(code: str, entry: str = "t") -> pb.Artifact:
    return pb.Artifact(
        kind=pb.ARTIFACT_KIND_CODE_COMPONENT, code_component=component("hostile", code, entry)
    )


def host_file(directory: Path, name: str, text: str) -> Path:
    """A host file the uid the code runs as can read (as many a host file is)."""
    directory.chmod(0o755)
    path = directory / name
    path.write_text(text)
    path.chmod(0o644)
    return path


async def sandboxed(work: Path) -> Builder:
    sandbox = Sandbox()
    await sandbox.check()
    builder = Builder(sandbox, LIMITS, work)
    await builder.start()
    return builder


# Swaps GNU time's report (where the code can find it) for a symlink to a host file.
SWAP_REPORT = r"""
#define _DEFAULT_SOURCE
#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
static void swap(const char *p) { unlink(p); symlink("{target}", p); }
int t(void) {
    DIR *d = opendir("/work"); struct dirent *e; char p[300];
    while (d && (e = readdir(d))) if (!strncmp(e->d_name, ".peak-", 6)) {
        snprintf(p, sizeof p, "/work/%s", e->d_name); swap(p);
    }
    swap("/run/kernelhub-time");
    return 0;
}
"""


@needs_tools
async def test_the_code_cannot_swap_gnu_times_report(tmp_path: Path, work: Path) -> None:
    host = host_file(tmp_path, "forged", "9999999\n")
    builder = await sandboxed(work)
    verdict = await builder.validate(artifact(SWAP_REPORT.replace("{target}", str(host))))
    assert verdict.state == pb.VALIDATION_STATE_PASSED, verdict
    assert 0 < verdict.peak_memory_kib < 9999999
    # Read as if hostile: a FIFO neither blocks nor counts, nor does a symlink.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "link"
    link.symlink_to(host)
    assert await asyncio.wait_for(asyncio.to_thread(_read_time, fifo), 5) == (0, 0)
    assert _read_time(link) == (0, 0)


# Each returns 0 if the sandbox let it take what it should not.
ESCAPES = {
    "write_root": '#include <stdio.h>\nint t(void) { return fopen("/probe", "w") == 0; }\n',
    "write_dev": '#include <stdio.h>\nint t(void) { return fopen("/dev/probe", "w") == 0; }\n',
    "fill_shm": (  # 32 MiB of RAM in four files (each under the file size limit)
        "#include <stdio.h>\n"
        "int t(void) { static char b[1 << 20]; char n[32]; for (int k = 0; k < 4; k++) {"
        ' sprintf(n, "/dev/shm/x%d", k); FILE *f = fopen(n, "w"); if (!f) return 1;'
        " for (int i = 0; i < 8; i++) if (fwrite(b, 1, sizeof b, f) != sizeof b) return 1;"
        " if (fclose(f) != 0) return 1; } return 0; }\n"
    ),
    "nested_userns": (
        "#define _GNU_SOURCE\n#include <sched.h>\n"
        "int t(void) { return unshare(CLONE_NEWUSER) != 0; }\n"
    ),
}


@needs_tools
@pytest.mark.parametrize("name", sorted(ESCAPES))
async def test_no_ram_backed_writes_nor_nested_namespaces(name: str, work: Path) -> None:
    builder = await sandboxed(work)
    verdict = await builder.validate(artifact(ESCAPES[name]))
    assert verdict.build_ok and verdict.state == pb.VALIDATION_STATE_FAILED, verdict
    assert "returned 1" in verdict.test_results[0].detail


# Six processes of 100 MiB each: every one within its address-space limit (128 MiB), all
# together past the run's 256 MiB.
MANY_HOGS = r"""
#define _DEFAULT_SOURCE
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
int t(void) {
    int ok = 1, status;
    for (int i = 0; i < 5; i++) if (fork() == 0) break;
    char *p = malloc(100u << 20);
    if (!p) return 1;
    memset(p, 1, 100u << 20);
    sleep(1);
    while (wait(&status) > 0) ok = ok && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    return ok ? 0 : 1;
}
"""


@needs_tools
async def test_a_runs_processes_together_stay_within_its_memory(work: Path) -> None:
    builder = await sandboxed(work)
    if builder.sandbox.cgroups is None:
        pytest.skip("no cgroup v1 memory and pids controllers to divide (needs root)")
    verdict = await builder.validate(artifact(MANY_HOGS))
    assert verdict.build_ok and verdict.state == pb.VALIDATION_STATE_FAILED, verdict
    assert verdict.peak_memory_kib <= (256 << 10) + 1024, verdict.peak_memory_kib


def test_limits_refuse_a_worst_case_past_the_memory_budget() -> None:
    with pytest.raises(ValueError, match="memory budget"):
        Limits(processes=64, memory_bytes=512 << 20)
    assert Limits().processes * Limits().memory_bytes <= MEMORY_BUDGET


UNTESTED = "\n".join(
    f"int f{i}(int x) {{\n  if (x) return {i};\n  return x;\n}}" for i in range(20)
)


@needs_tools
async def test_line_directives_do_not_hide_untested_lines(work: Path) -> None:
    builder = await sandboxed(work)
    elsewhere = 'int t(void) {\n  return 0;\n}\n#line 1 "elsewhere.c"\n' + UNTESTED + "\n"
    covered = await builder.validate(artifact(elsewhere))
    assert covered.state == pb.VALIDATION_STATE_PASSED
    assert 0 < covered.line_coverage < 0.2, covered.line_coverage


# Rewrites the notes gcov reads (what lines there are) from inside its own self-test.
REWRITE_NOTES = (
    "#include <stdio.h>\n"
    'int t(void) {\n  FILE *f = fopen("component.gcno", "w");\n  if (f) { fputs("forged", f);'
    " fclose(f); }\n  return 0;\n}\n"
)


@needs_tools
async def test_the_self_tests_cannot_rewrite_what_lines_there_are(work: Path) -> None:
    builder = await sandboxed(work)
    verdict = await builder.validate(artifact(REWRITE_NOTES))
    assert verdict.state == pb.VALIDATION_STATE_PASSED, verdict
    assert verdict.line_coverage == 1.0, verdict.line_coverage


@needs_tools
async def test_a_failing_build_cannot_pass_for_a_sandbox_failure(work: Path) -> None:
    builder = await sandboxed(work)
    blame = '#line 1 "bwrap: cannot start"\nint t(void) { return undefined_thing; }\n'
    failed = await builder.validate(artifact(blame))
    assert failed.state == pb.VALIDATION_STATE_FAILED and not failed.build_ok, failed


@needs_tools
async def test_without_the_sandbox_diagnostics_quote_no_host_file(
    tmp_path: Path, work: Path
) -> None:
    secret = host_file(tmp_path, "validator.token", "kh-secret-token-value\n")
    builder = Builder(Sandbox(enabled=False), LIMITS, work)
    await builder.start()
    verdict = await builder.validate(
        artifact(f'#include "{secret}"\nint t(void) {{ return 0; }}\n')
    )
    assert verdict.state == pb.VALIDATION_STATE_FAILED, verdict
    assert "kh-secret" not in verdict.diagnostics and "errors" in verdict.diagnostics


def test_the_validator_refuses_limits_past_the_memory_budget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from validator_service.cli import main

    token = tmp_path / "token"
    token.write_text("unused")
    argv = ["run", "--token-file", str(token), "--memory-mib", "1024", "--max-processes", "64"]
    assert main(argv) == 1
    assert "memory budget" in capsys.readouterr().err


@needs_tools
async def test_cgroups_that_cannot_be_made_leave_the_per_process_limits(tmp_path: Path) -> None:
    sandbox = Sandbox()
    sandbox.cgroups = {"memory": tmp_path / "absent", "pids": tmp_path / "absent"}
    await sandbox.check()
    assert sandbox.cgroups is None
