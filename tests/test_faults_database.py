"""The database locks up or goes away: the hub answers UNAVAILABLE, sends no receipt without a
commit, does not crash, and carries on when the database is back."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.server import HubServer

from .conftest import WAIT, HubHarness, free_port, make_config, pattern

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)


def as_postgres(tool: str, *args: str, check: bool = True) -> None:
    """Run a PostgreSQL server tool as the postgres user (the server refuses root)."""
    assert PG_BIN is not None
    subprocess.run(
        ["runuser", "-u", "postgres", "--", str(PG_BIN / tool), *args],
        check=check,
        capture_output=True,
        timeout=120,
    )


@dataclass
class PrivateCluster:
    """A PostgreSQL cluster of the test's own (never the machine's shared one)."""

    data: Path
    port: int

    def _ctl(self, *args: str) -> None:
        as_postgres("pg_ctl", "-D", str(self.data), *args)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c fsync=off"
        # -l: the server must not inherit our pipes, or waiting for pg_ctl never ends.
        self._ctl("-o", options, "-l", str(self.data.parent / "server.log"), "-w", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture
def private_cluster() -> Iterator[PrivateCluster]:
    if PG_BIN is None or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL server binaries are not installed (scripts/setup installs them)")
    # Its own directory (pytest's tmp_path is root-only): PostgreSQL refuses to run as root.
    root = Path(tempfile.mkdtemp(prefix="kernelhub-pg-"))
    data = root / "pgdata"
    data.mkdir()
    shutil.chown(root, "postgres")
    shutil.chown(data, "postgres")
    as_postgres("initdb", "-D", str(data), "-A", "trust", "-U", "postgres")
    cluster = PrivateCluster(data, free_port())
    cluster.start()
    try:
        yield cluster
    finally:
        as_postgres("pg_ctl", "-D", str(data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


async def test_postgres_goes_away_and_comes_back(private_cluster: PrivateCluster) -> None:
    hub = HubServer(
        make_config(private_cluster.url, reaper_interval=0.2, token_recheck_interval=0.2)
    )
    await hub.start()
    harness = HubHarness(hub)
    try:
        sender = await harness.connect("AI_Node_1")
        peer = await harness.connect("AI_Node_2")
        before = await sender.receipt(
            await sender.send(share_pattern=pb.SharePattern(pattern=pattern("before")))
        )

        await harness.token("observer")  # issued while the database is up
        private_cluster.stop()
        error = await sender.error(
            await sender.send("while-down", share_pattern=pb.SharePattern(pattern=pattern("down")))
        )
        assert error.code_name == "UNAVAILABLE" and "database unavailable" in error.message
        assert "while-down" not in sender.receipts  # no receipt without a commit
        with pytest.raises(grpc.aio.AioRpcError) as query:
            await harness.query("GetHubStats", pb.GetHubStatsRequest())
        assert query.value.code() == grpc.StatusCode.UNAVAILABLE

        private_cluster.start()
        # The same message_id, resent, is committed once now; live streams survived the outage.
        del sender.errors["while-down"]
        await sender.send("while-down", share_pattern=pb.SharePattern(pattern=pattern("down")))
        after = await sender.receipt("while-down")
        assert after.seq > before.seq and not after.duplicate
        shared = await peer.event("artifact_shared", artifact_id=after.resource_id)
        assert shared.artifact_shared.pattern.pattern_id == "down"
        listed = await harness.query("ListArtifacts", pb.ListArtifactsRequest())
        assert sorted(a.pattern.pattern_id for a in listed.artifacts) == ["before", "down"]
    finally:
        await harness.close()
        await hub.stop()


async def health_becomes(
    health: health_pb2_grpc.HealthStub, want: health_pb2.HealthCheckResponse.ServingStatus.ValueType
) -> None:
    """Watch the hub's overall health until it reports `want`, within WAIT seconds."""
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=WAIT)
    try:
        async for answer in watch:
            if answer.status == want:
                return
    except grpc.aio.AioRpcError as error:
        assert error.code() != grpc.StatusCode.DEADLINE_EXCEEDED, f"health never became {want}"
        raise
    finally:
        watch.cancel()
    raise AssertionError(f"the health watch ended before {want}")


async def test_health_is_not_serving_while_the_database_is_down(
    private_cluster: PrivateCluster,
) -> None:
    """Health/Watch follows the database: NOT_SERVING while it is down, SERVING once it is back,
    with no traffic from clients (the hub's own periodic commit notices both)."""
    hub = HubServer(make_config(private_cluster.url, reaper_interval=0.2))
    await hub.start()
    harness = HubHarness(hub)
    health = health_pb2_grpc.HealthStub(harness.channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        await health_becomes(health, serving)
        private_cluster.stop()
        await health_becomes(health, health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", "kernelhub.v1.HubService"):
            answer = await health.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=WAIT
            )
            assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING, service
        private_cluster.start()
        await health_becomes(health, serving)
        answer = await health.Check(
            health_pb2.HealthCheckRequest(service="kernelhub.v1.HubService"), timeout=WAIT
        )
        assert answer.status == serving
    finally:
        await harness.close()
        await hub.stop()


async def test_sqlite_locked_by_another_writer(database_url: str, tmp_path: Path) -> None:
    hub = HubServer(make_config(database_url, sqlite_busy_timeout=0.3))
    await hub.start()
    harness = HubHarness(hub)
    try:
        sender = await harness.connect("AI_Node_1")
        await sender.receipt(
            await sender.send(share_pattern=pb.SharePattern(pattern=pattern("first")))
        )
        intruder = sqlite3.connect(str(tmp_path / "hub.db"), isolation_level=None)
        intruder.execute("BEGIN EXCLUSIVE")  # another process's writer holds the lock
        try:
            error = await sender.error(
                await sender.send(
                    "locked", share_pattern=pb.SharePattern(pattern=pattern("locked"))
                )
            )
            assert error.code_name == "UNAVAILABLE" and "locked" in error.message
        finally:
            intruder.execute("ROLLBACK")
            intruder.close()
        del sender.errors["locked"]
        await sender.send("locked", share_pattern=pb.SharePattern(pattern=pattern("locked")))
        assert (await sender.receipt("locked")).seq > 0
        assert await hub.store.integrity_check() == "ok"  # type: ignore[attr-defined]
    finally:
        await harness.close()
        await hub.stop()
