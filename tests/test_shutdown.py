"""Graceful shutdown: what was read is committed and acknowledged, streams end with a clear
status, and a restarted hub on the same database carries on where it stopped."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.testing import HubStartError, TestHub

from .conftest import WAIT, HubHarness, auth, hello, make_config, pattern


async def test_stop_commits_what_was_read_and_ends_streams(database_url: str) -> None:
    hub = await TestHub.in_process(make_config(database_url)).start()
    harness = HubHarness(hub.server)
    sender = await harness.connect("AI_Node_1")
    sent = [
        await sender.send(share_pattern=pb.SharePattern(pattern=pattern(f"p{i}")))
        for i in range(200)
    ]
    await sender.receipt(sent[0])  # the hub is reading; now stop it mid-stream
    await hub.stop()

    with pytest.raises(grpc.aio.AioRpcError) as ended:
        while True:
            await sender._read_one()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (ended.value.details() or "")
    acknowledged = {mid: r for mid, r in sender.receipts.items() if mid in sent}
    assert acknowledged, "at least the first message was acknowledged"
    await harness.close()

    await hub.start()  # again, on the same database
    harness = HubHarness(hub.server)
    try:
        for receipt in acknowledged.values():
            stored = await harness.query(
                "GetArtifact", pb.GetArtifactRequest(artifact_id=receipt.resource_id)
            )
            assert stored.artifact.artifact_id == receipt.resource_id
        listed = await harness.query("ListArtifacts", pb.ListArtifactsRequest(page_size=500))
        assert len(listed.artifacts) >= len(acknowledged)
        again = await harness.connect("AI_Node_1")
        fresh = await again.receipt(
            await again.send(share_pattern=pb.SharePattern(pattern=pattern("after")))
        )
        assert fresh.seq > max(r.seq for r in acknowledged.values()), "seq keeps increasing"
        # Re-sending an acknowledged message_id after the restart is still a duplicate.
        first_mid = sent[0]
        await again.send(first_mid, share_pattern=pb.SharePattern(pattern=pattern("p0")))
        assert (await again.receipt(first_mid)).duplicate
    finally:
        await harness.close()
        await hub.close()


def _hub_cli(*args: str, db: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hub_service", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_cli_tokens_and_serve_with_sigterm(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    tokens_file = tmp_path / "tokens.txt"
    issued = _hub_cli("token", "issue", "AI_Node_1", "AI_Node_2", "--out", str(tokens_file), db=db)
    assert issued.returncode == 0, issued.stderr
    lines = tokens_file.read_text().split("\n")
    pairs = dict(line.split(" ") for line in lines if line)
    assert set(pairs) == {"AI_Node_1", "AI_Node_2"}
    assert oct(tokens_file.stat().st_mode & 0o777) == "0o600"

    listing = _hub_cli("token", "list", db=db)
    assert "AI_Node_1" in listing.stdout and "active" in listing.stdout
    assert pairs["AI_Node_1"] not in listing.stdout, "tokens are never shown again"
    assert pairs["AI_Node_1"] not in db.read_bytes().decode(errors="replace")

    server = await TestHub.subprocess(db, env={"KERNELHUB_LOG_LEVEL": "WARNING"}).start()
    try:
        line = server.stdout_path.read_text()
        assert line.startswith(f"kernelhub serving on 127.0.0.1:{server.port}\n"), line
        channel = server.channel()
        stub = server.stub()
        call = stub.Connect(metadata=auth(pairs["AI_Node_1"]))
        await call.write(pb.ConnectRequest(message_id="h", hello=hello("AI_Node_1")))
        assert (await asyncio.wait_for(call.read(), WAIT)).HasField("welcome")

        assert server.process is not None
        server.process.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                await asyncio.wait_for(call.read(), WAIT)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await asyncio.wait_for(server.process.wait(), WAIT * 3) == 0
        await channel.close(None)
    finally:
        await server.close()

    revoked = _hub_cli("token", "revoke", "AI_Node_2", db=db)
    assert revoked.returncode == 0 and "revoked 1" in revoked.stdout
    assert _hub_cli("token", "revoke", "AI_Node_2", db=db).returncode == 1  # nothing left to revoke


async def test_a_hub_that_cannot_listen_says_why_and_exits(tmp_path: Path) -> None:
    """A port in use: one line that says so and exit status 1. (With the writer process
    started and not closed, the hub used to wait for it forever at exit.)"""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        hub = TestHub.subprocess(tmp_path / "hub.db", port=port)
        with pytest.raises(HubStartError):
            await hub.start()
    assert hub.process is not None and hub.process.returncode == 1
    stderr = hub.stderr()
    await hub.close()
    assert f"could not start: Failed to bind to address 127.0.0.1:{port}" in stderr
    assert "Traceback" not in stderr


# In a private mount namespace: a 1 MiB tmpfs over the directory, a hub database on it (made
# by `token issue`), the rest of the tmpfs filled, then the hub started on it.
FULL_DISK = """
set -e
mount -t tmpfs -o size=1m tmpfs "$1"
"$2" -m hub_service token issue AI_Node_1 --db "$1/hub.db" > /dev/null
dd if=/dev/zero of="$1/fill" bs=4k 2> /dev/null || true
[ "$(df --output=avail "$1" | tail -1)" -eq 0 ] || { echo "the disk is not full" >&2; exit 99; }
exec "$2" -m hub_service serve --host 127.0.0.1 --port 0 --db "$1/hub.db"
"""


def test_a_hub_on_a_full_disk_says_why_and_exits(tmp_path: Path) -> None:
    """A start failure in the database (here a genuinely full disk) is one line and exit
    status 1, like a port in use, not a traceback."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to mount a small tmpfs in a private namespace")
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = subprocess.run(
        ["unshare", "-m", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace: {probe.stderr.strip()}")
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", FULL_DISK, "sh", str(disk), sys.executable],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "KERNELHUB_LOG_LEVEL": "WARNING"},
    )
    assert result.returncode == 1, result.stderr
    assert "kernelhub could not start: database unavailable:" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
