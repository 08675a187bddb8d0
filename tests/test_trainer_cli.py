"""The runner script as people use it: `kernelhub-trainer run` and `kernelhub-trainer swarm`."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.report import embedded_data
from hub_service.server import HubServer
from trainer_service.simulation.behavior import SimulatedBehavior, load_behavior

from .conftest import HubHarness, make_config, target
from .plugins.tagging_behavior import TaggingBehavior

ROOT = Path(__file__).resolve().parent.parent


async def trainer_cli(*args: str, timeout: float = 90) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trainer_service",
        *args,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "160"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_run_shares_with_a_plugged_in_behavior(
    hub: HubServer, harness: HubHarness, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(await harness.token("AI_Node_1") + "\n")
    code, out, err = await trainer_cli(
        "run",
        "--id",
        "AI_Node_1",
        "--specialization",
        "networking",
        "--duration",
        "3s",
        "--hub",
        target(hub),
        "--token-file",
        str(token_file),
        "--tempo",
        "20",
        "--seed",
        "5",
        "--behavior",
        "tests.plugins.tagging_behavior:TaggingBehavior",
    )
    assert code == 0, err
    assert "patterns_generated" in out or "patterns" in out.lower()
    assert " - AI_Node_1 - INFO - " in err, "logs carry the agent id, as the prototype's did"
    shared = await harness.query(
        "ListArtifacts",
        pb.ListArtifactsRequest(contributor_id="AI_Node_1", kind=pb.ARTIFACT_KIND_PATTERN),
    )
    assert shared.artifacts, "the trainer shared patterns"
    assert {a.pattern.attributes["source"] for a in shared.artifacts} == {"plugin"}
    code_components = await harness.query(
        "ListArtifacts",
        pb.ListArtifactsRequest(contributor_id="AI_Node_1", kind=pb.ARTIFACT_KIND_CODE_COMPONENT),
    )
    assert all(a.code_component.language == "c" for a in code_components.artifacts)


async def test_run_with_a_bad_token_fails_in_one_line(hub: HubServer) -> None:
    code, _, err = await trainer_cli(
        "run",
        "--id",
        "AI_Node_1",
        "--specialization",
        "networking",
        "--duration",
        "3s",
        "--hub",
        target(hub),
        "--token",
        "kh_wrong",
    )
    assert code == 1
    assert "error: UNAUTHENTICATED" in err
    assert "Traceback" not in err


async def test_usage_errors_exit_2() -> None:
    code, _, err = await trainer_cli(
        "run", "--id", "AI_Node_1", "--specialization", "plumbing", "--duration", "1s"
    )
    assert code == 2 and "plumbing" in err
    code, _, err = await trainer_cli("swarm", "--count", "2", "--duration", "soon")
    assert code == 2 and "soon" in err
    code, _, err = await trainer_cli(
        "swarm", "--count", "1", "--hub", "h:1", "--tokens-file", "t", "--report", "r.html"
    )
    assert code == 2 and "--report reads the embedded hub's database" in err


async def test_swarm_with_its_own_hub_ends_with_a_summary(tmp_path: Path) -> None:
    db = tmp_path / "swarm.db"
    code, out, err = await trainer_cli(
        "swarm",
        "--count",
        "4",
        "--duration",
        "6s",
        "--tempo",
        "20",
        "--seed",
        "11",
        "--db",
        str(db),
        "--report",
        str(tmp_path / "report.html"),
    )
    assert code == 0, err
    assert "Swarm summary" in out and "Hub totals" in out
    assert f"report written to {tmp_path / 'report.html'}" in out
    assert "validated/passed/failed" in out  # the swarm's one validator by default
    for i in range(1, 5):
        assert f"AI_Node_{i}" in out
    # The swarm's hub persisted what its trainers did.
    hub = HubServer(make_config(f"sqlite:///{db}"))
    await hub.start()
    try:
        harness = HubHarness(hub)
        stats = await harness.query("GetHubStats", pb.GetHubStatsRequest())
        assert stats.agents_known >= 4
        assert (
            stats.knowledge_base.pattern_count > 0 and stats.knowledge_base.code_component_count > 0
        )
        # Every component is queued; what its validator judged in the time it had passed
        # (how many it got to depends on the machine's speed: not asserted).
        kb = stats.knowledge_base
        judged = stats.artifacts_by_validation_state
        assert sum(judged.values()) == kb.code_component_count + kb.os_component_count, judged
        assert set(judged) <= {"VALIDATION_STATE_PENDING", "VALIDATION_STATE_PASSED"}, judged
        await harness.close()
        # The run report, written at the end of the run, counts what the hub holds.
        drawn = embedded_data((tmp_path / "report.html").read_text())
        assert drawn["totals"]["artifacts"]["pattern"] == stats.knowledge_base.pattern_count
        assert drawn["totals"]["agents"] == stats.agents_known
    finally:
        await hub.stop()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("tests.plugins.tagging_behavior", "must look like package.module:ClassName"),
        (":TaggingBehavior", "must look like package.module:ClassName"),
        ("tests.plugins.tagging_behavior:", "must look like package.module:ClassName"),
        ("tests.plugins.tagging-behavior:TaggingBehavior", "must look like package.module:"),
        ("tests..plugins:TaggingBehavior", "must look like package.module:ClassName"),
        ("tests.plugins.no_such_module:Behavior", "cannot import 'tests.plugins.no_such_module'"),
        (
            "tests.plugins.tagging_behavior:Missing",
            "'tests.plugins.tagging_behavior' has no attribute 'Missing'",
        ),
        ("tests.plugins.tagging_behavior:pb", "is not a class"),
        ("tests.plugins.tagging_behavior:pb.Pattern", "does not look like a Behavior"),
        ("collections:Counter", "does not look like a Behavior"),
        ("decimal:Context.Etiny", "is not a class"),
    ],
)
def test_load_behavior_names_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_behavior(spec)


def test_load_behavior_follows_a_dotted_attribute() -> None:
    assert isinstance(
        load_behavior("tests.plugins.tagging_behavior:TaggingBehavior"), TaggingBehavior
    )
    assert isinstance(
        load_behavior("trainer_service.simulation:behavior.SimulatedBehavior"), SimulatedBehavior
    )


async def test_a_bad_behavior_is_a_usage_error() -> None:
    code, _, err = await trainer_cli(
        "run",
        "--id",
        "AI_Node_1",
        "--specialization",
        "networking",
        "--duration",
        "1s",
        "--token",
        "kh_unused",
        "--behavior",
        "tests.plugins.tagging_behavior:Missing",
    )
    assert code == 2 and "has no attribute 'Missing'" in err


async def test_swarm_dashboard_opens_beside_its_own_hub_and_prints_its_url() -> None:
    code, out, err = await trainer_cli(
        "swarm", "--count", "2", "--duration", "3s", "--tempo", "20", "--dashboard", "0"
    )
    assert code == 0, err
    assert re.search(r"dashboard: http://127\.0\.0\.1:\d+/", out), out
    assert "Swarm summary" in out
    code, _, err = await trainer_cli(
        "swarm", "--count", "2", "--hub", "localhost:1", "--tokens-file", "t", "--dashboard"
    )
    assert code == 2 and "kernelhub-dashboard" in err
