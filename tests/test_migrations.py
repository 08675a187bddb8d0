"""The schema is versioned with Alembic: a database written by kernelhub 0.1.0 (the
committed fixture) upgrades keeping every row and is served as before; the migrations
build exactly the tables the models describe; a newer database, or an older one with
automatic upgrade off, is refused with a sentence saying what to do."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, text
from sqlmodel import SQLModel

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service import schema
from hub_service.config import HubConfig
from hub_service.server import HubServer
from hub_service.sql_write import make_engine

from .conftest import EOF, WAIT, async_stub, auth, make_config, pattern, target

FIXTURE = Path(__file__).parent / "fixtures" / "kernelhub-0.1.0.db"
FIXTURE_TOKEN = Path(__file__).parent / "fixtures" / "kernelhub-0.1.0.token"
TABLES = [
    "agent",
    "token",
    "event",
    "event_recipient",
    "received_message",
    "artifact",
    "feature_request",
    "feature_delivery",
    "collaboration",
]


# Columns migrations added after 0.1.0, with what each holds for the rows from before.
ADDED_COLUMNS: dict[str, dict[str, str | int | None]] = {
    "received_message": {"fingerprint": None},
    "token": {"role": "agent"},
    "artifact": {"validation_state": 0},
    "agent": {"replica_id": "", "presence_rev": 0},
}
# Columns 0004 added to the event log: tags derived from each event's body (checked below).
EVENT_TAGS = {"kind", "artifact_kind", "spec_mask"}


@pytest.fixture
def fixture_db(tmp_path: Path) -> Path:
    copy = tmp_path / "old.db"
    shutil.copyfile(FIXTURE, copy)
    return copy


async def db_cli(*args: str) -> tuple[int, str, str]:
    """`kernelhub-hub db ARGS` in its own process: exit code, stdout, stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub_service",
        "db",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def rows(path: Path, table: str) -> list[tuple[Any, ...]]:
    """Every row of `table` in the columns kernelhub 0.1.0 had, in a stable order."""
    with sqlite3.connect(path) as connection:
        columns = [r[1] for r in connection.execute(f"PRAGMA table_info({table})")]
        old = [c for c in columns if c not in ADDED_COLUMNS.get(table, ()) and c not in EVENT_TAGS]
        found = connection.execute(f"SELECT {', '.join(old)} FROM {table} ORDER BY 1, 2").fetchall()
    connection.close()
    return found


def differences(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(compare_metadata(MigrationContext.configure(connection), SQLModel.metadata))


def test_the_fixture_upgrades_keeping_every_row(fixture_db: Path) -> None:
    before = {table: rows(fixture_db, table) for table in TABLES}
    assert all(before.values()), {t: len(r) for t, r in before.items()}  # the fixture is full
    engine = make_engine(f"sqlite:///{fixture_db}")
    try:
        assert schema.current(engine) == schema.BASELINE  # made by create_all, no version table
        assert schema.upgrade(engine) == schema.BASELINE
        assert schema.current(engine) == schema.head()
        assert differences(engine) == []  # now exactly the models' schema
        with engine.connect() as connection:
            for table, added in ADDED_COLUMNS.items():
                for column, value in added.items():
                    held = connection.execute(text(f"SELECT DISTINCT {column} FROM {table}"))
                    assert [v for (v,) in held] == [value], (table, column)
            # 0004 tagged every event from its body: presence, artifacts, feature requests.
            tagged = connection.execute(text("SELECT kind, body FROM event")).all()
            kinds = {pb.HubEvent.FromString(body).WhichOneof("body"): kind for kind, body in tagged}
            assert kinds["agent_joined"] == pb.EVENT_KIND_PRESENCE
            assert kinds["artifact_shared"] == pb.EVENT_KIND_ARTIFACTS
            assert 0 not in {kind for kind, _ in tagged}
    finally:
        engine.dispose()
    after = {table: rows(fixture_db, table) for table in TABLES}
    assert after == before


async def test_the_upgraded_fixture_is_served_as_before(fixture_db: Path) -> None:
    agent_id, token = FIXTURE_TOKEN.read_text().split()
    with sqlite3.connect(fixture_db) as connection:
        recipients = set(
            connection.execute("SELECT seq FROM event_recipient WHERE agent_id = ?", (agent_id,))
        )
        log = connection.execute(
            "SELECT seq, sender_id, broadcast, body FROM event ORDER BY seq"
        ).fetchall()
    connection.close()
    # What the log owes this agent: broadcasts by others and events addressed to it, but
    # not the presence events 0.1.0 logged (presence is state now, never replayed).
    owed = [
        event
        for seq, sender, broadcast, body in log
        if (broadcast and sender != agent_id) or (seq,) in recipients
        if (event := pb.HubEvent.FromString(body)).WhichOneof("body")
        not in ("agent_joined", "agent_left")
    ]
    assert len(owed) >= 5, owed
    hub = HubServer(make_config(f"sqlite:///{fixture_db}"))  # upgrades on start
    await hub.start()
    try:
        async with grpc.aio.insecure_channel(target(hub)) as channel:
            call = async_stub(channel).Connect(metadata=auth(token))  # the 0.1.0 token
            hello = pb.Hello(
                agent_id=agent_id,
                specialization=pb.SPECIALIZATION_FILE_SYSTEM,
                capabilities=["memory_management"],
                version="test",
                resume_after_seq=0,
            )
            await call.write(pb.ConnectRequest(message_id="hello", hello=hello))
            replayed: list[pb.HubEvent] = []
            welcomed = False
            while not replayed or replayed[-1].seq < owed[-1].seq:
                response = await asyncio.wait_for(call.read(), WAIT)
                assert response is not EOF, "the stream ended"
                welcomed = welcomed or response.HasField("welcome")
                replayed.extend(response.events)
            assert welcomed
            assert [e for e in replayed if e.seq <= owed[-1].seq] == owed

            # An id from before the fingerprints: reused with another body, still a duplicate.
            share = pb.SharePattern(pattern=pattern("other"))
            await call.write(pb.ConnectRequest(message_id="m-pattern", share_pattern=share))
            receipts: list[pb.Receipt] = []
            while not receipts:
                response = await asyncio.wait_for(call.read(), WAIT)
                assert response is not EOF and not response.errors, response
                receipts.extend(response.receipts)
            assert receipts[0].message_id == "m-pattern" and receipts[0].duplicate, receipts
            assert receipts[0].seq == 3, receipts  # the fixture's first share
            call.cancel()
    finally:
        await hub.stop()


@pytest.fixture
def store_engine(store_url: str) -> Iterator[Engine]:
    engine = make_engine(store_url)
    yield engine
    engine.dispose()


def test_migrations_build_the_models_schema(store_engine: Engine) -> None:
    assert schema.current(store_engine) is None
    assert schema.upgrade(store_engine) == "none"
    assert schema.current(store_engine) == schema.head()
    assert differences(store_engine) == []


def test_a_database_made_by_create_all_is_recognised_and_upgraded(store_engine: Engine) -> None:
    """What 0.1.0 left on either database: revision 0001's tables, no alembic_version."""
    with store_engine.begin() as connection:
        config = schema._config(connection)
        command.upgrade(config, schema.BASELINE)
        connection.execute(text("DROP TABLE alembic_version"))
        connection.execute(
            text(
                "INSERT INTO received_message (agent_id, message_id, seq, resource_id, created_at) "
                "VALUES ('a', 'm1', 7, 'art_1', CURRENT_TIMESTAMP)"
            )
        )
    assert schema.current(store_engine) == schema.BASELINE
    schema.upgrade(store_engine)
    assert schema.current(store_engine) == schema.head()
    assert differences(store_engine) == []
    with store_engine.connect() as connection:
        kept = connection.execute(
            text("SELECT agent_id, message_id, seq, fingerprint FROM received_message")
        )
        assert kept.all() == [("a", "m1", 7, None)]


async def test_a_database_newer_than_the_hub_is_refused(store_url: str) -> None:
    engine = make_engine(store_url)
    try:
        schema.upgrade(engine)
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        engine.dispose()
    for auto_upgrade in (True, False):
        hub = HubServer(make_config(store_url, auto_upgrade=auto_upgrade))
        with pytest.raises(schema.SchemaError) as refused:
            await hub.start()
        assert str(refused.value) == (
            f"the database is at schema revision 9999, newer than this hub's {schema.head()}: "
            "upgrade kernelhub"
        )
        await hub.store.close()


async def test_with_auto_upgrade_off_an_old_schema_is_refused_until_upgraded(
    fixture_db: Path,
) -> None:
    url = f"sqlite:///{fixture_db}"
    config = make_config(url, auto_upgrade=False)
    hub = HubServer(config)
    with pytest.raises(schema.SchemaError, match=r"run `kernelhub-hub db upgrade` first"):
        await hub.start()
    await hub.store.close()
    engine = make_engine(url)
    try:
        assert schema.current(engine) == schema.BASELINE  # refused, and untouched
        code, out, err = await db_cli("upgrade", "--db", str(fixture_db))
        assert code == 0, err
        assert out.strip() == f"schema at {schema.head()} (was {schema.BASELINE})"
        assert schema.current(engine) == schema.head()
    finally:
        engine.dispose()
    hub = HubServer(config)
    await hub.start()
    await hub.stop()


def test_auto_upgrade_is_read_from_the_environment() -> None:
    assert HubConfig.from_env({}).auto_upgrade is True
    assert HubConfig.from_env({"KERNELHUB_AUTO_UPGRADE": "false"}).auto_upgrade is False
    assert HubConfig.from_env({"KERNELHUB_AUTO_UPGRADE": "1"}).auto_upgrade is True
    with pytest.raises(ValueError, match="KERNELHUB_AUTO_UPGRADE='maybe'"):
        HubConfig.from_env({"KERNELHUB_AUTO_UPGRADE": "maybe"})


async def hub_cli(*args: str, **env: str) -> tuple[int, str]:
    """`kernelhub-hub ARGS` in its own process: exit code and stderr."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "hub_service",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **env},
    )
    _, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, err.decode()


async def test_token_commands_keep_to_auto_upgrade_and_refuse_memory(tmp_path: Path) -> None:
    """With auto-upgrade off, `token` commands refuse an old schema in one line (they used to
    migrate it anyway); an in-memory hub's tokens cannot be issued from another process."""
    database = tmp_path / "empty.db"
    code, err = await hub_cli("token", "list", "--db", str(database), KERNELHUB_AUTO_UPGRADE="0")
    assert code == 1 and "kernelhub-hub db upgrade" in err and "Traceback" not in err
    assert (await db_cli("current", "--db", str(database)))[1].startswith("none")
    code, err = await hub_cli("token", "issue", "AI_Node_1", "--database-url", "memory://")
    assert code == 2 and "in-memory hub" in err and "Traceback" not in err
