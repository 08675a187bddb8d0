"""`kernelhub-hub db ...`: the operator's database work, outside a running hub: upgrade the
schema, say its revision, take a consistent backup, and check the database for damage."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection, Engine, make_url, text

from . import schema
from .sql_write import make_engine

# Lines of one kind of problem `check` prints before summing up the rest: a damaged
# database of millions of rows must not print millions of lines.
SHOWN = 20

# An event-log gap: each (first, last) run of seqs missing between the oldest held (retention
# prunes from the start) and the head.
_GAPS = text(
    "SELECT prev + 1, seq - 1 FROM ("
    " SELECT seq, LAG(seq, 1, seq - 1) OVER (ORDER BY seq) AS prev FROM event"
    ") AS log WHERE seq - prev > 1 ORDER BY seq"
)
# Knowledge-base rows outlive their events (retention keeps them): only those at or after the
# oldest event held must find theirs.
_KEPT = {"artifact", "feature_request"}
# Rows that name an event the log does not hold: (table, what the row is).
_POINTERS = {
    "event_recipient": "recipient rows",
    "artifact": "artifact",
    "feature_request": "feature request",
}


def _say_error(message: str) -> int:
    print(f"kernelhub-hub: {message}", file=sys.stderr)
    return 1


def upgrade(engine: Engine) -> int:
    was, head = schema.current(engine), schema.head()
    schema.upgrade(engine)
    print(f"schema at {head}" + ("" if was == head else f" (was {was or 'empty'})"))
    return 0


def current(engine: Engine) -> int:
    revision = schema.current(engine)
    print(f"{revision or 'none (empty database)'} (this hub's: {schema.head()})")
    return 0


def _sqlite_path(database_url: str) -> str | None:
    url = make_url(database_url)
    return url.database if url.get_backend_name() == "sqlite" and url.database else None


def backup(database_url: str, destination: Path, busy_timeout: float = 30.0) -> int:
    """SQLite's VACUUM INTO: one read transaction, so a hub committing meanwhile is seen
    at one point in time, and the copy is compact and self-contained (no -wal file)."""
    source = _sqlite_path(database_url)
    if source is None:
        return _say_error(
            "backup copies SQLite databases only; a PostgreSQL database is backed up with "
            "pg_dump (e.g. pg_dump --format=custom --file=kernelhub.dump DBNAME)"
        )
    if destination.exists():
        return _say_error(f"{destination} exists; back up to a new file")
    with sqlite3.connect(source, timeout=busy_timeout) as connection:
        connection.execute("VACUUM INTO ?", (str(destination),))
    connection.close()
    problems = list(_integrity(destination))
    if problems:
        return _say_error(f"the backup {destination} fails its integrity check: {problems[0]}")
    print(f"backed up {source} to {destination} ({destination.stat().st_size} bytes)")
    return 0


def _integrity(path: Path | str) -> Iterator[str]:
    with sqlite3.connect(path) as connection:
        rows = connection.execute(f"PRAGMA integrity_check({SHOWN})").fetchall()
    connection.close()
    if [tuple(r) for r in rows] != [("ok",)]:
        yield from (f"integrity: {r[0]}" for r in rows)


def _event_log(connection: Connection) -> Iterator[str]:
    gaps = connection.execute(_GAPS).fetchmany(SHOWN + 1)
    for first, last in gaps[:SHOWN]:
        seqs = f"seq {first}" if first == last else f"seqs {first}..{last}"
        yield f"event log: {seqs} missing (the log must run to the head without a gap)"
    if len(gaps) > SHOWN:
        yield f"event log: more gaps after seq {gaps[SHOWN - 1][1]}"
    for table, what in _POINTERS.items():
        orphans = connection.execute(
            text(
                f"SELECT DISTINCT t.seq FROM {table} t LEFT JOIN event e ON e.seq = t.seq "
                "WHERE e.seq IS NULL"
                + (" AND t.seq >= (SELECT min(seq) FROM event)" if table in _KEPT else "")
                + " ORDER BY t.seq"
            )
        ).fetchmany(SHOWN + 1)
        seqs = ", ".join(str(seq) for (seq,) in orphans[:SHOWN])
        more = " and more" if len(orphans) > SHOWN else ""
        if orphans:
            yield f"{table}: {what} of events not in the log: seq {seqs}{more}"


def problems(engine: Engine, database_url: str) -> list[str]:
    """Everything wrong with the database, a line each (empty: healthy)."""
    found: list[str] = []
    path = _sqlite_path(database_url)
    if path is not None:
        found.extend(_integrity(path))
    with engine.connect() as connection:
        found.extend(_event_log(connection))
    return found


def check(engine: Engine, database_url: str) -> int:
    found = problems(engine, database_url)
    for problem in found:
        print(problem)
    revision = schema.current(engine)
    if found:
        print(f"{len(found)} problem(s) found (schema revision {revision})")
        return 1
    print(f"ok: no problems found (schema revision {revision}, this hub's: {schema.head()})")
    return 0


def run(command: str, database_url: str, path: Path | None = None) -> int:
    """One `db` subcommand; the process's exit code."""
    if command == "backup":
        assert path is not None
        return backup(database_url, path)
    engine = make_engine(database_url)
    try:
        if command == "upgrade":
            return upgrade(engine)
        if command == "current":
            return current(engine)
        return check(engine, database_url)
    except schema.SchemaError as error:
        return _say_error(str(error))
    finally:
        engine.dispose()
