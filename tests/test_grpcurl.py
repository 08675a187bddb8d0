"""The README's grpcurl commands, run as written against a live hub."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.roles import Role
from hub_service.server import HubServer

from .conftest import HubHarness, target

README = Path(__file__).resolve().parent.parent / "README.md"
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


def readme_blocks() -> list[list[str]]:
    """The bash blocks of the README's grpcurl section, as lists of commands."""
    section = README.read_text().split("## Debugging with grpcurl", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)
    commands = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)  # backslash continuations
        commands.append(
            [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]
        )
    return commands


async def run(command: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.skipif(GRPCURL is None, reason="grpcurl is installed by the dev extra (scripts/setup)")
async def test_readme_grpcurl_commands_work_as_written(hub: HubServer, harness: HubHarness) -> None:
    listener = await harness.connect("AI_Node_2")
    token = await harness.token("grpcurl_debug")
    admin = await harness.token("ops", role=Role.ADMIN)
    assert GRPCURL is not None
    env = {
        **os.environ,
        "HUB": target(hub),
        "TOKEN": token,
        "ADMIN": admin,
        "PATH": f"{Path(GRPCURL).parent}:{os.environ['PATH']}",
    }
    session, errors, administer = readme_blocks()
    prelude = "\n".join(line for line in session if line.startswith(("HUB=", "TOKEN=")))
    outputs: dict[str, str] = {}
    for command in session:
        if command.startswith(("HUB=", "TOKEN=")):
            continue
        code, out, err = await run(f"{prelude}\n{command}", env)
        assert code == 0, f"{command}\nexit {code}\n{err}"
        outputs[command] = out

    def output_of(fragment: str) -> str:
        return next(out for cmd, out in outputs.items() if fragment in cmd)

    assert "kernelhub.v1.HubService" in output_of(" list")
    assert "rpc Connect ( stream .kernelhub.v1.ConnectRequest )" in output_of("describe")
    assert json.loads(output_of("Health/Check")) == {"status": "SERVING"}
    assert json.loads(output_of("GetHubStats"))["hub_version"]
    assert json.loads(output_of("ListAgents"))["agents"][0]["agent_id"] == "AI_Node_2"

    # The stdin session: welcome, a receipt with a seq, and field violations for the bad share.
    stream = output_of("-d @")
    responses = [json.loads(chunk) for chunk in re.split(r"(?<=\n})\n(?={)", stream.strip())]
    assert responses[0]["welcome"]["agent_id"] == "grpcurl_debug"
    receipts = [r for resp in responses for r in resp.get("receipts", [])]
    assert [r["message_id"] for r in receipts] == ["m1"] and int(receipts[0]["seq"]) > 0
    errors_seen = [e for resp in responses for e in resp.get("errors", [])]
    assert errors_seen[0]["code_name"] == "INVALID_ARGUMENT"
    fields = {v["field"] for v in errors_seen[0]["field_violations"]}
    assert "share_pattern.pattern.confidence" in fields

    # ... while a Python trainer on the same hub receives the shared pattern.
    shared = await listener.event("artifact_shared", contributor_id="grpcurl_debug")
    assert shared.artifact_shared.pattern.pattern_id == "p1"
    assert shared.seq == int(receipts[0]["seq"])
    listed = await harness.query("ListArtifacts", pb.ListArtifactsRequest())
    assert [a.pattern.pattern_id for a in listed.artifacts] == [
        "p1"
    ]  # the bad share stored nothing

    # The error examples fail readably.
    bad_page, missing = errors
    code, _, err = await run(f"{prelude}\n{bad_page}", env)
    assert code != 0 and "InvalidArgument" in err
    assert "google.rpc.BadRequest" in err and '"field":"page_size"' in err
    code, _, err = await run(f"{prelude}\n{missing}", env)
    assert code != 0 and "NotFound" in err and "art_missing" in err

    # The admin's commands: a token issued, listed, revoked; the log watched.
    admin_prelude = "\n".join(line for line in administer if line.startswith("ADMIN="))
    issue, listing, revoke, watch = (c for c in administer if not c.startswith("ADMIN="))
    results = []
    for command in (issue, listing, revoke, watch):
        results.append(await run(f"{prelude}\n{admin_prelude}\n{command}", env))
    for (code, _out, err), command in zip(results[:3], (issue, listing, revoke), strict=True):
        assert code == 0, f"{command}\nexit {code}\n{err}"
    issued = json.loads(results[0][1])
    assert issued["secret"].startswith("kh_") and issued["token"]["agent_id"] == "AI_Node_9"
    listed_ids = {t["agent_id"] for t in json.loads(results[1][1])["tokens"]}
    assert {"AI_Node_9", "ops", "grpcurl_debug"} <= listed_ids
    assert issued["secret"] not in results[1][1]
    assert json.loads(results[2][1]) == {"revoked_count": 1}
    code, out, err = results[3]
    assert "DeadlineExceeded" in err, err  # -max-time ended the watch, as the README says
    watched = [json.loads(chunk) for chunk in re.split(r"(?<=\n})\n(?={)", out.strip())]
    events = [e for response in watched for e in response.get("events", [])]
    assert [e["artifact_shared"]["pattern"]["pattern_id"] for e in events] == ["p1"]
