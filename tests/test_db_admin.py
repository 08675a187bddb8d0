"""`kernelhub-hub db backup` and `db check` against real databases: a backup taken while
a hub serves and writes is consistent, and check names each problem of a database
damaged on purpose (and exits non-zero)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import text

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service import schema
from hub_service.server import HubServer
from hub_service.sql_write import make_engine

from .conftest import HubHarness, make_config, pattern
from .test_migrations import db_cli

SHARES_BEFORE_BACKUP = 20
MAX_SHARES = 100_000  # a bound on the writer, far beyond what a backup lasts


async def test_a_backup_while_the_hub_writes_is_consistent(tmp_path: Path) -> None:
    database = tmp_path / "hub.db"
    hub = HubServer(make_config(f"sqlite:///{database}"))  # the writer in its own process
    await hub.start()
    harness = HubHarness(hub)
    backing_up = asyncio.Event()
    done = asyncio.Event()
    shares: list[int] = []

    async def write() -> None:
        trainer = await harness.connect("writer")
        while not done.is_set() and len(shares) < MAX_SHARES:
            message_id = await trainer.send(share_pattern=pb.SharePattern(pattern=pattern()))
            shares.append((await trainer.receipt(message_id)).seq)
            if len(shares) >= SHARES_BEFORE_BACKUP:
                backing_up.set()
        await trainer.close()

    writer = asyncio.create_task(write())
    try:
        await asyncio.wait_for(backing_up.wait(), 60)
        head_before = shares[-1]
        code, out, err = await db_cli("backup", str(tmp_path / "copy.db"), "--db", str(database))
        assert not writer.done(), "the hub stopped writing before the backup ended"
        done.set()
        await asyncio.wait_for(writer, 60)
    finally:
        done.set()
        await harness.close()
        await hub.stop()
    assert code == 0, err
    assert out.startswith(f"backed up {database} to {tmp_path / 'copy.db'}"), out
    with sqlite3.connect(tmp_path / "copy.db") as copy:
        assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        (head,) = copy.execute("SELECT max(seq) FROM event").fetchone()
        (artifacts,) = copy.execute("SELECT count(*) FROM artifact").fetchone()
    copy.close()
    assert head_before <= head <= shares[-1]
    assert artifacts >= SHARES_BEFORE_BACKUP
    code, out, err = await db_cli("check", "--db", str(tmp_path / "copy.db"))
    assert code == 0 and out.startswith("ok: no problems found"), out + err
    # A backup never overwrites.
    code, _, err = await db_cli("backup", str(tmp_path / "copy.db"), "--db", str(database))
    assert code == 1 and f"{tmp_path / 'copy.db'} exists" in err, err


async def test_backup_of_postgresql_is_pg_dumps_job(postgres_url: str, tmp_path: Path) -> None:
    code, out, err = await db_cli("backup", str(tmp_path / "copy"), "--database-url", postgres_url)
    assert code == 1 and not out, out
    assert "a PostgreSQL database is backed up with pg_dump" in err, err
    assert not (tmp_path / "copy").exists()


async def test_check_names_each_problem_of_a_damaged_database(store_url: str) -> None:
    hub = HubServer(make_config(store_url))
    await hub.start()
    harness = HubHarness(hub)
    try:
        sharer = await harness.connect("sharer")
        seqs = []
        for n in range(5):
            share = pb.SharePattern(pattern=pattern(f"p{n}"))
            seqs.append((await sharer.receipt(await sharer.send(share_pattern=share))).seq)
        proposer = await harness.connect("proposer")
        proposal = pb.ProposeCollaboration(
            target_agent_id="sharer", type=pb.COLLABORATION_TYPE_CODE_REVIEW
        )
        proposed = await proposer.receipt(await proposer.send(propose_collaboration=proposal))
        await sharer.close()
        await proposer.close()
    finally:
        await harness.close()
        await hub.stop()
    url = ["--database-url", store_url]
    code, out, err = await db_cli("check", *url)
    assert code == 0 and out.startswith("ok: no problems found"), out + err

    engine = make_engine(store_url)
    try:
        with engine.begin() as connection:  # a share's event, and the proposal's (with recipients)
            connection.execute(text(f"DELETE FROM event WHERE seq IN ({seqs[2]}, {proposed.seq})"))
    finally:
        engine.dispose()
    code, out, err = await db_cli("check", *url)
    assert code == 1, out + err
    *problems, summary = out.splitlines()
    gap = "missing (the log must run to the head without a gap)"
    expected = {
        f"event log: seq {seqs[2]} {gap}",
        f"artifact: artifact of events not in the log: seq {seqs[2]}",
        f"event_recipient: recipient rows of events not in the log: seq {proposed.seq}",
    }
    assert expected <= set(problems), out
    # The proposal's seq is a gap too unless it was the head.
    assert set(problems) - expected <= {f"event log: seq {proposed.seq} {gap}"}, out
    assert summary == f"{len(problems)} problem(s) found (schema revision {schema.head()})", out


@pytest.mark.parametrize("command", ["current", "upgrade"])
async def test_current_and_upgrade_on_an_empty_database(command: str, tmp_path: Path) -> None:
    code, out, err = await db_cli(command, "--db", str(tmp_path / "new.db"))
    assert code == 0, err
    expected = {
        "current": f"none (empty database) (this hub's: {schema.head()})",
        "upgrade": f"schema at {schema.head()} (was empty)",
    }
    assert out.strip() == expected[command]
