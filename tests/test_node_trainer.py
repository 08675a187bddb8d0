"""The Node.js example trainer (examples/node-trainer) on a live hub, next to a Python trainer."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.server import HubServer

from .conftest import WAIT, HubHarness, hello, pattern, target

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "node-trainer"
NODE = shutil.which("node")
S = pb.CollaborationState

pytestmark = [
    pytest.mark.skipif(
        NODE is None, reason="node is not installed (scripts/setup installs nodejs)"
    ),
    pytest.mark.skipif(
        not (EXAMPLE / "node_modules").is_dir(),
        reason="examples/node-trainer/node_modules is missing: run scripts/setup "
        "(npm ci --prefix examples/node-trainer)",
    ),
]


class NodeTrainer:
    """`node trainer.js` as a subprocess: its stdout JSON lines, read with deadlines."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[dict[str, Any]] = []
        self.stderr = ""
        self._stderr_task = asyncio.create_task(self._drain_stderr())

    @classmethod
    async def start(
        cls, hub: HubServer | str, token: str, state_file: Path, **env: str
    ) -> NodeTrainer:
        """`hub`: an in-process hub, or the address(es) to give the trainer."""
        assert NODE is not None
        environ = {k: v for k, v in os.environ.items() if not k.startswith("KERNELHUB_")}
        environ |= {
            "KERNELHUB_HUB": hub if isinstance(hub, str) else target(hub),
            "KERNELHUB_AGENT_ID": "AI_Node_2",
            "KERNELHUB_TOKEN": token,
            "KERNELHUB_SPECIALIZATION": "graphics",
            "KERNELHUB_STATE_FILE": str(state_file),
            "KERNELHUB_DURATION": "60",
            **env,
        }
        process = await asyncio.create_subprocess_exec(
            NODE,
            str(EXAMPLE / "trainer.js"),
            env=environ,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def _drain_stderr(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.stderr += line.decode()

    async def _read_line(self) -> None:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            await self.wait()
            raise EOFError(f"node trainer exited ({self.process.returncode}):\n{self.stderr}")
        self.lines.append(json.loads(line))

    async def expect(self, kind: str, **match: Any) -> dict[str, Any]:
        """The first line of `kind` whose fields match, reading (at most WAIT s) until it comes."""

        async def find() -> dict[str, Any]:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if line["kind"] == kind and all(line.get(k) == v for k, v in match.items()):
                        return line
                seen = len(self.lines)
                await self._read_line()

        try:
            return await asyncio.wait_for(find(), WAIT)
        except TimeoutError:
            raise AssertionError(
                f"no {kind} {match} from the node trainer within {WAIT}s; stderr:\n{self.stderr}"
            ) from None

    async def wait(self, timeout: float = WAIT) -> int:
        """Read the rest of stdout and the exit code."""
        assert self.process.stdout is not None
        rest = await asyncio.wait_for(self.process.stdout.read(), timeout)
        self.lines += [json.loads(line) for line in rest.decode().splitlines()]
        code = await asyncio.wait_for(self.process.wait(), timeout)
        await asyncio.wait_for(self._stderr_task, timeout)
        return code

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["kind"] == kind]

    async def close(self) -> None:
        """Kill it if it still runs (a failed test), and reap it."""
        if self.process.returncode is None:
            self.process.kill()
        await asyncio.wait_for(self.process.wait(), WAIT)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._stderr_task, WAIT)


@contextlib.asynccontextmanager
async def node_trainer(
    hub: HubServer | str, token: str, state_file: Path, **env: str
) -> AsyncIterator[NodeTrainer]:
    trainer = await NodeTrainer.start(hub, token, state_file, **env)
    try:
        yield trainer
    finally:
        await trainer.close()


async def test_node_trainer_shares_collaborates_and_resumes(
    hub: HubServer, harness: HubHarness, tmp_path: Path
) -> None:
    python = await harness.connect("AI_Node_1", hello("AI_Node_1", pb.SPECIALIZATION_NETWORKING))
    token = await harness.token("AI_Node_2")
    state_file = tmp_path / "AI_Node_2.seq"

    async with node_trainer(hub, token, state_file) as node:
        welcome = await node.expect("welcome", agent_id="AI_Node_2")
        assert welcome["resume_after_seq"] == "0"

        # The Python trainer's share reaches the Node trainer ...
        p1 = await python.receipt(
            await python.send(share_pattern=pb.SharePattern(pattern=pattern("p1")))
        )
        seen = await node.expect("artifact_shared", artifact_id=p1.resource_id)
        assert seen["contributor_id"] == "AI_Node_1" and seen["name"] == "p1"
        assert int(seen["seq"]) == p1.seq

        # ... and the Node trainer's pattern and code component reach the Python trainer.
        shared = await python.event(
            "artifact_shared", contributor_id="AI_Node_2", pattern__pattern_id="premultiplied_blend"
        )
        assert shared.artifact_shared.kind == pb.ARTIFACT_KIND_PATTERN
        assert shared.artifact_shared.pattern.specialization == pb.SPECIALIZATION_GRAPHICS
        shared = await python.event(
            "artifact_shared", contributor_id="AI_Node_2", code_component__name="blend_span"
        )
        assert shared.artifact_shared.kind == pb.ARTIFACT_KIND_CODE_COMPONENT
        code = shared.artifact_shared.code_component
        assert code.language == "c" and "void blend_span(" in code.code

        # A collaboration proposed by the Python trainer: the Node trainer accepts it, reports
        # progress and completes it.
        mid = await python.send(
            propose_collaboration=pb.ProposeCollaboration(
                target_agent_id="AI_Node_2",
                type=pb.COLLABORATION_TYPE_CROSS_SPECIALIZATION,
                description="remote framebuffer updates",
            )
        )
        session_id = (await python.receipt(mid)).resource_id
        completed = await python.event(
            "collaboration_updated",
            collaboration__session_id=session_id,
            collaboration__state=S.COLLABORATION_STATE_COMPLETED,
        )
        steps = [
            (
                e.collaboration_updated.collaboration.state,
                e.collaboration_updated.collaboration.progress,
            )
            for e in python.events
            if e.WhichOneof("body") == "collaboration_updated"
        ]
        assert steps == [
            (S.COLLABORATION_STATE_PROPOSED, 0.0),
            (S.COLLABORATION_STATE_ACTIVE, 0.0),
            (S.COLLABORATION_STATE_ACTIVE, 0.5),
            (S.COLLABORATION_STATE_ACTIVE, 1.0),
            (S.COLLABORATION_STATE_COMPLETED, 1.0),
        ]
        result_id = completed.collaboration_updated.collaboration.result_artifact_id
        await node.expect(
            "collaboration", session_id=session_id, state="COLLABORATION_STATE_COMPLETED"
        )
        receipt_kinds = [line["what"] for line in node.of("receipt")]
        assert receipt_kinds == [
            "share_pattern",
            "share_code_component",
            "accept_collaboration",
            "report_collaboration_progress",
            "report_collaboration_progress",
            "complete_collaboration",
        ]
        assert node.of("error") == []

        # It is stored: the session is COMPLETED and its component can be fetched.
        listed = await harness.query(
            "ListCollaborations", pb.ListCollaborationsRequest(agent_id="AI_Node_2")
        )
        [stored] = listed.collaborations
        assert (stored.session_id, stored.state) == (session_id, S.COLLABORATION_STATE_COMPLETED)
        assert (stored.initiator_id, stored.target_id) == ("AI_Node_1", "AI_Node_2")
        assert stored.result_artifact_id == result_id
        artifact = (
            await harness.query("GetArtifact", pb.GetArtifactRequest(artifact_id=result_id))
        ).artifact
        assert artifact.kind == pb.ARTIFACT_KIND_OS_COMPONENT
        assert artifact.contributor_id == "AI_Node_2"
        component = artifact.os_component
        assert component.component_type == "collaborative_component"
        assert set(component.specializations) == {
            pb.SPECIALIZATION_GRAPHICS,
            pb.SPECIALIZATION_NETWORKING,
        }
        assert "pack_dirty_rect(" in component.implementation

        # SIGTERM ends the stream cleanly: exit 0, everything answered, the last seq saved.
        node.process.send_signal(signal.SIGTERM)
        assert await node.wait() == 0, node.stderr
        [end] = node.of("end")
        assert end["unanswered"] == 0
        last_seq = int(state_file.read_text())
        assert last_seq == int(end["last_seq"]) >= completed.seq

    # While it is away the Python trainer shares again; the next run resumes after `last_seq`:
    # it gets the new share, and nothing it had already processed.
    p2 = await python.receipt(
        await python.send(share_pattern=pb.SharePattern(pattern=pattern("p2")))
    )
    async with node_trainer(hub, token, state_file, KERNELHUB_DURATION="4") as node:
        welcome = await node.expect("welcome")
        assert int(welcome["resume_after_seq"]) == last_seq > 0
        await node.expect("artifact_shared", artifact_id=p2.resource_id)
        assert await node.wait() == 0, node.stderr  # after KERNELHUB_DURATION
        assert [line["name"] for line in node.of("artifact_shared")] == ["p2"]
        assert node.of("collaboration") == []
        assert int(state_file.read_text()) >= p2.seq > last_seq


async def test_node_trainer_fails_clearly_without_a_valid_token(
    hub: HubServer, tmp_path: Path
) -> None:
    async with node_trainer(hub, "kh_not_a_token", tmp_path / "seq") as node:
        assert await node.wait() != 0
        [failure] = node.of("stream_error")
        assert failure["code_name"] == "UNAUTHENTICATED"
        assert "UNAUTHENTICATED" in node.stderr
        assert not (tmp_path / "seq").exists()
