"""The statements that run too often for the ORM: the group commit's append-only rows,
inserted with a few multi-row INSERTs per table; the idempotency ledger, read with one
statement; and the token re-check of every live stream.

Every share costs three rows (event, artifact, ledger). Through the ORM's bulk
insert they cost ~100 µs of writer-thread CPU per share. Handed to the driver
as multi-row INSERTs they cost a fraction of that, and the writer lets go of
the GIL once per statement instead of once per row (an executemany steps
SQLite row by row, and each step is a GIL hand-over with the event loop).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Dialect, Table
from sqlalchemy.exc import DBAPIError
from sqlmodel import SQLModel

from .models import ReceivedMessageRow, TokenRow

Processor = Callable[[Any], Any]
K = TypeVar("K")

# Rows per INSERT: a power of two up to this, so a table needs at most 6 distinct
# statements (the driver's statement cache keeps them prepared). Small enough that a
# cached statement's last bound values (SQLite keeps them until the next use) stay
# small, large enough to cut the statements per batch 32-fold: the writer's CPU per
# share measured the same at 32 as at 256 rows.
MAX_ROWS_PER_STATEMENT = 32


def _padded_chunks(keys: Sequence[K], most: int) -> Iterator[list[K]]:
    """`keys` in chunks of at most `most`, each padded to a power of two with its last key
    (a repeat matches nothing new): a few distinct statements, which the drivers' statement
    caches keep prepared."""
    for start in range(0, len(keys), most):
        chunk = list(keys[start : start + most])
        chunk += chunk[-1:] * ((1 << (len(chunk) - 1).bit_length()) - len(chunk))
        yield chunk


def _chunk_sizes(count: int) -> list[int]:
    """`count` as powers of two, largest first, none above MAX_ROWS_PER_STATEMENT."""
    sizes = [MAX_ROWS_PER_STATEMENT] * (count // MAX_ROWS_PER_STATEMENT)
    rest = count % MAX_ROWS_PER_STATEMENT
    bit = MAX_ROWS_PER_STATEMENT
    while rest:
        bit //= 2
        if rest >= bit:
            sizes.append(bit)
            rest -= bit
    return sizes


def run(
    connection: Connection, statement: str, params: Sequence[Any], fetch: bool = False
) -> list[Any]:
    """`statement` on the DB-API cursor of the connection's transaction (its rows, if `fetch`).

    Without SQLAlchemy's execution context, which cost ~10 µs a statement: a sixth of a
    one-share commit's CPU, in its four statements. Errors come out as SQLAlchemy's would
    (OperationalError, IntegrityError: the writer's retries tell them apart), and a lost
    connection is invalidated, as SQLAlchemy does, so the pool never hands it out again."""
    dbapi_connection = connection.connection.dbapi_connection
    assert dbapi_connection is not None  # the connection is live: its transaction began
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(statement, params)
        return list(cursor.fetchall()) if fetch else []
    except connection.dialect.loaded_dbapi.Error as exc:
        dialect = connection.dialect
        lost = dialect.is_disconnect(exc, dbapi_connection, cursor)
        if lost:
            connection.invalidate(exc)
        raise DBAPIError.instance(
            statement,
            params,
            exc,
            dialect.loaded_dbapi.Error,
            connection_invalidated=lost,
            dialect=dialect,
        ) from exc
    finally:
        with contextlib.suppress(Exception):  # a lost connection's cursor may refuse
            cursor.close()


class BulkInsert:
    """One table's INSERT of fixed columns, many rows per statement.

    Values go through the column types' own bind processors for the dialect (a
    datetime becomes what the ORM would have written), so the rows read back exactly
    as ORM-written ones.
    """

    def __init__(self, table: Table, columns: Sequence[str], dialect: Dialect, mark: str) -> None:
        self._columns = list(columns)
        self._prefix = f"INSERT INTO {table.name} ({', '.join(self._columns)}) VALUES "
        self._row = f"({', '.join([mark] * len(self._columns))})"
        self._processors: list[tuple[int, Processor]] = [
            (index, processor)
            for index, name in enumerate(self._columns)
            if (processor := table.c[name].type.dialect_impl(dialect).bind_processor(dialect))
            is not None
        ]
        self._statements: dict[int, str] = {}

    def sql(self, rows: int) -> str:
        statement = self._statements.get(rows)
        if statement is None:
            statement = self._statements[rows] = self._prefix + ", ".join([self._row] * rows)
        return statement

    def values(self, rows: Sequence[dict[str, Any]]) -> list[Any]:
        """The rows' values, flat and in column order, through the bind processors."""
        flat: list[Any] = []
        width = len(self._columns)
        for row in rows:
            if len(row) != width:
                raise ValueError(f"row has columns {sorted(row)}, expected {sorted(self._columns)}")
            flat.extend([row[name] for name in self._columns])
        for index, processor in self._processors:
            # A batch shares its clock: convert a value once while rows repeat it.
            last_in: Any = None
            last_out: Any = None
            for position in range(index, len(flat), width):
                value = flat[position]
                if value is None:
                    continue
                if value is not last_in:
                    last_in, last_out = value, processor(value)
                flat[position] = last_out
        return flat

    def execute(self, connection: Connection, rows: Sequence[dict[str, Any]]) -> None:
        flat = self.values(rows)
        width, start = len(self._columns), 0
        for size in _chunk_sizes(len(rows)):
            run(connection, self.sql(size), flat[start * width : (start + size) * width])
            start += size


class BulkWriter:
    """The append-only tables' INSERTs, the ledger lookup and the token re-check, for one
    database dialect."""

    # Pairs per ledger lookup: two parameters each, well under every driver's limit.
    LOOKUP_CHUNK = 256
    # Token hashes per re-check statement: one parameter each.
    TOKEN_CHUNK = 512

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        self._inserts: dict[tuple[type[SQLModel], tuple[str, ...]], BulkInsert] = {}
        if dialect.paramstyle == "qmark":
            self._mark = "?"
        elif dialect.paramstyle in ("format", "pyformat"):
            self._mark = "%s"
        else:
            raise ValueError(f"unsupported DB-API paramstyle {dialect.paramstyle}")
        ledger: Table = ReceivedMessageRow.__table__  # type: ignore[attr-defined]
        self._ledger_sql = (
            f"SELECT agent_id, message_id, seq, resource_id, fingerprint FROM {ledger.name} WHERE "
        )
        tokens: Table = TokenRow.__table__  # type: ignore[attr-defined]
        # The clock goes in as the column stores it (SQLite: text), so the database compares.
        self._expiry = tokens.c.expires_at.type.dialect_impl(dialect).bind_processor(dialect)
        self._tokens_sql = (
            f"SELECT token_hash FROM {tokens.name} WHERE revoked_at IS NULL AND "
            f"(expires_at IS NULL OR expires_at > {self._mark}) AND token_hash IN "
        )

    def insert(
        self, connection: Connection, model: type[SQLModel], rows: Sequence[dict[str, Any]]
    ) -> None:
        columns = tuple(rows[0])
        statement = self._inserts.get((model, columns))
        if statement is None:
            table: Table = model.__table__  # type: ignore[attr-defined]
            statement = BulkInsert(table, columns, self._dialect, self._mark)
            self._inserts[(model, columns)] = statement
        statement.execute(connection, rows)

    def ledger_query(self, keys: int) -> str:
        """The lookup of `keys` (agent_id, message_id) pairs, two parameters each."""
        pair = f"(agent_id = {self._mark} AND message_id = {self._mark})"
        return self._ledger_sql + " OR ".join([pair] * keys)

    def received(
        self, connection: Connection, keys: Sequence[tuple[str, str]]
    ) -> list[tuple[str, str, int, str, bytes | None]]:
        """The ledger rows for these (agent_id, message_id) keys: one primary-key lookup
        per key however big the ledger grows. (A row-value IN reads the same but SQLite
        scans the whole table for it: 200 µs per key at 200k rows.)"""
        found: list[tuple[str, str, int, str, bytes | None]] = []
        for chunk in _padded_chunks(keys, self.LOOKUP_CHUNK):
            params = tuple(value for key in chunk for value in key)
            rows = run(connection, self.ledger_query(len(chunk)), params, fetch=True)
            found.extend(
                (str(a), str(m), int(s), str(r), None if f is None else bytes(f))
                for a, m, s, r, f in rows
            )
        return found

    def valid_tokens(
        self, connection: Connection, hashes: Sequence[str], now: datetime
    ) -> set[str]:
        """Which of these token hashes are unrevoked and unexpired at `now`, each a
        unique-index lookup. Below the ORM because SQLAlchemy's expanding IN processed each
        parameter and row in Python: at ten thousand live streams that held a reader thread
        for a tenth of a second every re-check (docs/benchmarks.md)."""
        at = now if self._expiry is None else self._expiry(now)
        valid: set[str] = set()
        for chunk in _padded_chunks(hashes, self.TOKEN_CHUNK):
            marks = ", ".join([self._mark] * len(chunk))
            rows = run(connection, f"{self._tokens_sql}({marks})", (at, *chunk), fetch=True)
            valid.update(str(digest) for (digest,) in rows)
        return valid
