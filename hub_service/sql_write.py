"""The SQL write side: the engine, and the group commit that the writer (a thread of the
hub, or the writer process) runs: one transaction per batch, append-only rows in bulk; and,
between batches, retention's bounded deletes (`WriterJob`).

Replicas on one PostgreSQL (`shared`): each batch takes one transaction-level advisory lock
before anything else and holds it to COMMIT, and allocates `seq` after the log's head it then
reads, so seq order is commit order hub-wide (docs/scaling.md, "One log, one order")."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
from sqlalchemy import Connection, Engine, delete, event, func, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session, col, create_engine, select

from . import collaboration as collab
from .bulk import BulkWriter
from .commands import apply_command, presence_changes
from .errors import StatusError, unavailable
from .models import EventRecipientRow, EventRow, ReceivedMessageRow, utcnow
from .outcomes import Outcome
from .sql_tx import Specializations, SqlTx
from .state import Command, Receipt

log = logging.getLogger(__name__)

# The advisory lock every replica's batch holds from its first statement to COMMIT: an
# arbitrary 64-bit key ("kernelhub" in ASCII, folded), the same in every replica.
LOG_LOCK_KEY = 0x6B65726E656C6875
# The channel each committed batch NOTIFYs (payload: the last seq it committed).
LOG_CHANNEL = "kernelhub_log"
# The channel a batch that changed presence NOTIFYs (payload: its last presence revision).
PRESENCE_CHANNEL = "kernelhub_presence"
LOCK_STATEMENT = text(
    "SELECT set_config('idle_in_transaction_session_timeout', :idle, true), "
    "pg_advisory_xact_lock(:key)"
)
_HEAD = text("SELECT coalesce(max(seq), 0) FROM event")
_NOTIFY = text("SELECT pg_notify(:channel, :payload)")
_FIRST = text("SELECT coalesce(min(seq), 0) FROM event")
# Seqs one prune deletes (with their recipients) while it holds the log's lock.
LOCKED_PRUNE = 500
# How far the live replicas' readers let the log be pruned (0: not at all).
_PRUNABLE = text("SELECT coalesce(min(prunable_seq), 0) FROM replica WHERE expires_at > now()")


def _sqlite_pragmas(busy_timeout_ms: int) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()

    return on_connect


def make_engine(database_url: str, busy_timeout_ms: int = 5000, pool_size: int = 8) -> Engine:
    if database_url.startswith("sqlite"):
        engine = create_engine(
            database_url,
            connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
            pool_size=8,
        )
        event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_ms))
        return engine
    connect_args = {"connect_timeout": 5} if database_url.startswith("postgresql") else {}
    engine = create_engine(
        database_url, pool_size=pool_size, pool_pre_ping=True, connect_args=connect_args
    )
    if database_url.startswith("postgresql"):
        event.listen(engine, "connect", _utc_session)
    return engine


def _utc_session(connection: Any, _record: Any) -> None:
    """Timestamps are stored as naive UTC: a PostgreSQL session in another time zone would
    convert the hub's aware UTC values to its local time on the way in. (A SET, not the
    `options` connect argument, which would replace a URL's own options.)"""
    autocommit = connection.autocommit
    connection.autocommit = True
    connection.execute("SET TIME ZONE 'UTC'")
    connection.autocommit = autocommit


def session(engine: Engine) -> Session:
    # Rows outlive their session (they are returned to the event loop).
    return Session(engine, expire_on_commit=False)


@dataclass(frozen=True)
class PruneEvents:
    """A writer job: delete the events at or below `through_seq` and their recipients."""

    through_seq: int
    limit: int = 0  # replicas: at most this many seqs from the log's start (0: no bound)


@dataclass(frozen=True)
class PruneLedger:
    """A writer job: forget about `limit` of the message ids remembered before `older_than`."""

    older_than: datetime
    limit: int


WriterJob = PruneEvents | PruneLedger


@dataclass(frozen=True)
class SharedLog:
    """This hub is one of several replicas on one PostgreSQL log (`HubConfig.replica`)."""

    # Names this replica in its NOTIFYs, so that it ignores its own (it routes its own
    # commits from their outcomes).
    origin: str
    # A batch's statements follow each other within milliseconds. One whose replica
    # vanished mid-batch (its host gone, no TCP reset) would hold the lock, and stall every
    # replica, until PostgreSQL ended its session: this bounds that (the transaction rolls
    # back; nothing was answered, so nothing is lost).
    lock_idle_timeout: float = 10.0


def notify_payload(seq: int, origin: str) -> str:
    return f"{seq} {origin}"


def parse_notify(payload: str) -> tuple[int, str]:
    """(seq, origin) of a NOTIFY's payload; ValueError if it is not one of ours."""
    seq, origin = payload.split(" ", 1)
    return int(seq), origin


class SqlWriter:
    """Group commits on one engine, from one thread at a time: it owns the event log's
    head, so each commit's `seq`s follow the last one's. `shared` (replicas on one
    PostgreSQL): the head is read again in each batch, under the log's advisory lock."""

    def __init__(
        self, engine: Engine, policy: collab.Policy, shared: SharedLog | None = None
    ) -> None:
        if shared and engine.dialect.name != "postgresql":
            raise ValueError(
                "replicas share one PostgreSQL database; this is " + engine.url.drivername
            )
        self.engine = engine
        self.policy = policy
        self.shared = shared
        idle = shared.lock_idle_timeout if shared else 0.0
        self.lock_params = {"key": LOG_LOCK_KEY, "idle": str(int(idle * 1000))}
        self._bulk = BulkWriter(engine.dialect)
        self._seq = 0
        # Only on SQLite, where this writer is the agent table's one writer. Not for replicas
        # (other writers change agents beneath this one), nor on PostgreSQL at all: the
        # COMMIT of a writer process killed mid-commit may land after its successor has read
        # (and kept) the rows it changes.
        self._specializations = (
            Specializations() if engine.dialect.name == "sqlite" and not shared else None
        )
        # SQLite: the connection the commits run on, kept between them (`_session`), and
        # the database's data_version on it as of the last commit: another connection's
        # commit changes it (another process writing the same file).
        self._connection: Connection | None = None
        self._data_version = -1

    def load_head(self) -> int:
        """Continue the event log after its last `seq` (and forget what another writer may
        have changed since)."""
        if self._specializations is not None:
            self._specializations.clear()
        with session(self.engine) as s:
            self._seq = int(s.exec(select(func.max(EventRow.seq))).one() or 0)
        return self._seq

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def commit(
        self, commands: Sequence[Command], head_checked: bool = False
    ) -> list[Outcome | StatusError]:
        """Apply the commands in order in one transaction (group commit).

        A refused command yields its StatusError and the others still commit. If
        the transaction itself fails, each command is retried alone so one
        poisoned command cannot sink its batch-mates; a database that is down
        yields UNAVAILABLE for all (nothing was committed, so no receipt).
        """
        start = self._seq
        try:
            return self._transaction(commands)
        except OperationalError as exc:
            # Nothing was committed: its seqs go to the next commit, so the log has no gap
            # (a COMMIT that did land after all makes the next one meet IntegrityError below).
            self._seq = start
            log.warning(
                "database unavailable, %d commands not committed: %s", len(commands), exc.orig
            )
            return [unavailable(f"database unavailable, retry later: {exc.orig}")] * len(commands)
        except Exception as exc:
            if isinstance(exc, IntegrityError) and not head_checked:
                # A commit that landed after this writer read the log's head (a replaced
                # writer process's last one, which PostgreSQL finished after its client was
                # killed) took the seqs this one allocated: read the head again and retry.
                log.warning("the event log moved past this writer's head; reading it again")
                self.load_head()
                return self.commit(commands, head_checked=True)
            self._seq = start  # rolled back: the seqs it took are free again
            if len(commands) == 1:
                log.exception("command %s failed", type(commands[0]).__name__)
                return [
                    StatusError(grpc.StatusCode.INTERNAL, "the hub failed to apply this message")
                ]
        return [self.commit([command], head_checked=True)[0] for command in commands]

    def _session(self) -> Session:
        """The commit's session. On SQLite, on a connection kept from one commit to the next:
        a checkout from the pool and its reset cost ~25 µs, an eighth of a one-share commit.
        On PostgreSQL, from the pool each time, pinged first: a connection the server
        dropped while the hub was idle is replaced, not failed on."""
        if self.engine.dialect.name != "sqlite":
            return session(self.engine)
        if self._connection is not None and self._connection.in_transaction():
            # A session on it would join that transaction, and its commit would COMMIT
            # nothing: acknowledged, never stored. Nothing here leaves one open; never trust it.
            log.warning("the writer's connection was left in a transaction; replacing it")
            self._drop_connection()
        if self._connection is None or self._connection.invalidated:
            self._connection = self.engine.connect()
            self._data_version = -1
        self._follow_other_writers(self._connection)
        return Session(self._connection, expire_on_commit=False)

    def _follow_other_writers(self, connection: Connection) -> None:
        """Forget the cached specializations if anyone else committed to the file since
        this writer's last commit (a second hub on the same SQLite file is not refused).
        On the DB-API connection: through SQLAlchemy the PRAGMA would begin a transaction."""
        if self._specializations is None:
            return
        raw = connection.connection.driver_connection
        assert raw is not None
        version = int(raw.execute("PRAGMA data_version").fetchone()[0])
        if version != self._data_version:
            self._specializations.clear()
            self._data_version = version

    def _drop_connection(self) -> None:
        """After a failed commit: the next one starts on a connection from the pool."""
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def _transaction(self, commands: Sequence[Command]) -> list[Outcome | StatusError]:
        try:
            return self._apply(commands)
        except BaseException:
            self._drop_connection()
            raise

    def _apply(self, commands: Sequence[Command]) -> list[Outcome | StatusError]:
        results: list[Outcome | StatusError] = []
        with self._session() as s:
            connection = s.connection()
            if self.shared:
                # First, before any read: the ledger and the rows the rules read are then
                # those every earlier batch hub-wide committed.
                connection.execute(LOCK_STATEMENT, self.lock_params)
                self._seq = int(connection.execute(_HEAD).scalar_one())
            head = self._seq
            received = self._received(connection, commands)
            origin = self.shared.origin if self.shared else ""
            tx = SqlTx(
                s, utcnow(), self._next_seq, self.policy, received, origin, self._specializations
            )
            tx.prefetch_agents(presence_changes(commands))
            for command in commands:
                try:
                    results.append(apply_command(tx, command))
                except StatusError as error:
                    results.append(error)
            s.flush()  # rows the commands changed through the ORM, before the appends
            for model, rows in tx.appends.items():
                self._bulk.insert(connection, model, rows)
            if self.shared and self._seq > head:
                # Delivered at COMMIT, to every replica's listener.
                payload = notify_payload(self._seq, self.shared.origin)
                connection.execute(_NOTIFY, {"channel": LOG_CHANNEL, "payload": payload})
            if self.shared and tx.presence_rev is not None:
                payload = notify_payload(tx.presence_rev, self.shared.origin)
                connection.execute(_NOTIFY, {"channel": PRESENCE_CHANNEL, "payload": payload})
            s.commit()
        return results

    def _received(
        self, connection: Connection, commands: Sequence[Command]
    ) -> dict[tuple[str, str], Receipt]:
        """The receipts already given for this batch's message ids, in one query."""
        keys = sorted({(c.agent_id, c.message_id) for c in commands if c.message_id})
        return {
            (agent_id, message_id): (Outcome(seq=seq, resource_id=resource_id), fingerprint)
            for agent_id, message_id, seq, resource_id, fingerprint in self._bulk.received(
                connection, keys
            )
        }

    def run(self, job: WriterJob) -> int:
        """A retention job, in a transaction of its own between group commits (the writer
        runs one thing at a time); returns how many rows it deleted."""
        with session(self.engine) as s:
            if isinstance(job, PruneEvents):
                # Never the newest event: the next writer continues the log after it.
                through = min(job.through_seq, self._seq - 1)
                if self.shared:
                    # Under the log's lock, so a replica registering (which reads where the
                    # log begins under it too) sees the log before or after this, never
                    # half-way; and no further than every live replica's readers allow.
                    s.connection().execute(LOCK_STATEMENT, self.lock_params)
                    through = min(through, int(s.execute(_PRUNABLE).scalar_one()))
                    # Every replica's commits wait while this holds the lock: a short
                    # batch (the retention round calls again), so theirs go in between.
                    first = int(s.execute(_FIRST).scalar_one())
                    limit = min(job.limit or LOCKED_PRUNE, LOCKED_PRUNE)
                    through = min(through, first + limit - 1)
                s.execute(delete(EventRecipientRow).where(col(EventRecipientRow.seq) <= through))
                deleted = s.execute(delete(EventRow).where(col(EventRow.seq) <= through))
            else:
                created = col(ReceivedMessageRow.created_at)
                # The `limit`-th oldest row's time: the batch ends there (by the index).
                cut = s.execute(
                    select(created)
                    .where(created < job.older_than)
                    .order_by(created)
                    .offset(job.limit - 1)
                    .limit(1)
                ).scalar()
                bound = created <= cut if cut is not None else created < job.older_than
                deleted = s.execute(delete(ReceivedMessageRow).where(bound))
            s.commit()
        return int(deleted.rowcount)  # type: ignore[attr-defined]

    def dispose(self) -> None:
        self._drop_connection()
        self.engine.dispose()
