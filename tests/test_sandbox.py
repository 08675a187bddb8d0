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
from validator_service.sandbox import Limits, Sandbox
from validator_service.worker import Validator

from .conftest import make_config

LIMITS = BuildLimits(
    build=Limits(cpu_seconds=4, wall_seconds=20, memory_bytes=512 << 20, processes=32),
    test=Limits(
        cpu_seconds=1, wall_seconds=3, memory_bytes=128 << 20, processes=16, disk_bytes=32 << 20
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
    assert verdict.warning_count == 0
    sloppy = pb.Artifact(
        kind=pb.ARTIFACT_KIND_CODE_COMPONENT,
        code_component=component("sloppy", "int good(void) { int unused; return 0; }\n", "good"),
    )
    warned = await builder.validate(sloppy)
    assert warned.state == pb.VALIDATION_STATE_PASSED and warned.warning_count == 1
    assert "unused" in warned.diagnostics
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
    assert "error" in failed.diagnostics and "component.c" in failed.diagnostics


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
