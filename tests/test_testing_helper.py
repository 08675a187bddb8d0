"""hub_service.testing.TestHub: the README's example runs as written, and both ways of running
a hub (in process, subprocess) start, issue tokens, stop, are killed and start again."""

from __future__ import annotations

import asyncio
import inspect
import re
import socket
from pathlib import Path

import grpc
import psutil
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.testing import HubStartError, TestHub
from trainer_service import HubClient

from .conftest import WAIT, auth

README = Path(__file__).resolve().parent.parent / "README.md"


# --- the README's example, verbatim (test_readme_shows_this_example keeps them equal) ---
async def test_a_shared_pattern_reaches_the_other_trainer() -> None:
    async with TestHub.in_process() as hub:
        tokens = await hub.issue_tokens("my_sharer", "my_listener")
        networking = pb.SPECIALIZATION_NETWORKING
        async with (
            HubClient(hub.target, "my_sharer", tokens["my_sharer"], specialization=networking) as a,
            HubClient(
                hub.target, "my_listener", tokens["my_listener"], specialization=networking
            ) as b,
        ):
            pattern = pb.Pattern(
                pattern_id="ring",
                pattern_type="networking_pattern",
                specialization=networking,
                confidence=0.9,
            )
            receipt = await a.share_pattern(pattern)

            async def shared() -> pb.Artifact:
                async for item in b.events():
                    if isinstance(item, pb.HubEvent) and item.HasField("artifact_shared"):
                        return item.artifact_shared
                raise AssertionError("the stream ended")

            artifact = await asyncio.wait_for(shared(), timeout=10)
            assert artifact.artifact_id == receipt.resource_id
            assert artifact.contributor_id == "my_sharer"


# --- end of the README's example ---


def test_readme_shows_this_example() -> None:
    """The README's example is the test above, character for character, so it cannot go stale."""
    source = inspect.getsource(test_a_shared_pattern_reaches_the_other_trainer)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    (example,) = [block for block in blocks if "TestHub" in block]
    assert example.endswith(source), "the README's example differs from the test"
    imported: dict[str, object] = {}
    exec(example[: -len(source)], imported)  # the README's imports, nothing else
    for name, value in imported.items():
        assert name == "__builtins__" or globals().get(name) is value, f"{name} differs"


async def _stats(hub: TestHub, token: str) -> pb.GetHubStatsResponse:
    response: pb.GetHubStatsResponse = await hub.stub().GetHubStats(
        pb.GetHubStatsRequest(), metadata=auth(token), timeout=WAIT
    )
    return response


async def test_in_process_hub_restarts_on_its_database() -> None:
    hub = await TestHub.in_process().start()
    try:
        assert hub.port > 0 and hub.pid == psutil.Process().pid
        token = await hub.issue_token("AI_Node_1")
        assert (await _stats(hub, token)).agents_known >= 0
        database = hub.server.config.database_url
        await hub.stop()
        with pytest.raises(RuntimeError):
            _ = hub.server  # stopped: nothing to hand out
        await hub.start()
        assert hub.server.config.database_url == database
        await _stats(hub, token)  # the token was kept: same database
    finally:
        await hub.close()


async def test_subprocess_hub_is_killed_and_restarts_on_the_same_port(tmp_path: Path) -> None:
    hub = TestHub.subprocess(tmp_path / "hub.db", env={"KERNELHUB_LOG_LEVEL": "WARNING"})
    try:
        token = await hub.issue_token("AI_Node_1")  # before start: through the CLI
        await hub.start()
        port, pid = hub.port, hub.pid
        assert port > 0 and pid != psutil.Process().pid
        await _stats(hub, token)
        await hub.kill()
        assert hub.process is not None and hub.process.returncode is not None
        with pytest.raises(grpc.aio.AioRpcError) as down:
            await _stats(hub, token)
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        await hub.start()
        assert (hub.port, hub.pid != pid) == (port, True)
        await _stats(hub, token)
        assert await hub.terminate() == 0
    finally:
        await hub.close()


async def test_subprocess_that_cannot_start_says_why(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        hub = TestHub.subprocess(tmp_path / "hub.db", port=taken.getsockname()[1])
        with pytest.raises(HubStartError, match="exited \\(1\\)") as failed:
            await hub.start()
    await hub.close()
    assert "could not start" in str(failed.value)
