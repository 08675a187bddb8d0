"""The SQL store: `HubStore` on SQLite (WAL) or PostgreSQL. This module is its read side
(the event log, tokens, the List queries, stats) and the owner of its writer.

Database work never runs on the event loop. Group commits go to one writer
(`sql_write.SqlWriter`, which also makes the event log's `seq` strictly increasing): a
thread, or in the hub a child process (`writer.py`) so that they neither hold nor wait for
the loop's GIL. Reads go to a small pool of reader threads.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import grpc
from sqlalchemy import (
    ColumnElement,
    and_,
    bindparam,
    exists,
    false,
    func,
    make_url,
    or_,
    text,
)
from sqlalchemy import select as core_select
from sqlalchemy.engine import Connection as DbConnection
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlmodel import Session, SQLModel, col, select

from generated.kernelhub.v1 import hub_pb2 as pb

from . import collaboration as collab
from . import paging, report_data
from .batched_lookup import BatchedLookup
from .bulk import BulkWriter
from .errors import StatusError, unavailable
from .models import (
    AgentRow,
    ArtifactRow,
    CollaborationRow,
    EventRecipientRow,
    EventRow,
    FeatureDeliveryRow,
    FeatureRequestRow,
    TokenRow,
    agent_to_proto,
    collaboration_to_proto,
    feature_request_to_proto,
    token_to_proto,
    utcnow,
)
from .outcomes import Outcome, RoutedEvent
from .roles import Role
from .sql_write import (
    LOCK_STATEMENT,
    PruneEvents,
    PruneLedger,
    SharedLog,
    SqlWriter,
    WriterJob,
    make_engine,
    session,
)
from .state import (
    REPLAY_SCAN_SEQS,
    Command,
    EventPage,
    IssuedToken,
    Page,
    Principal,
    decode_stored,
)
from .subscriptions import ARTIFACTS, EVERYTHING, Filter, Tags
from .tokens import hash_token, issue
from .writer import WriterProcess, WriterSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
# The token table's columns, for the reads every stream opens with (no ORM rows), and the
# statement of the first, built once.
_TOKENS = TokenRow.__table__.c  # type: ignore[attr-defined]
_AUTHENTICATE = core_select(
    _TOKENS.token_hash, _TOKENS.agent_id, _TOKENS.role, _TOKENS.revoked_at, _TOKENS.expires_at
).where(_TOKENS.token_hash.in_(bindparam("digests", expanding=True)))
# Rows a page query holds in memory at once: bodies are decoded one by one, and a page
# ends at its byte budget, so a table of huge rows is never read whole.
STREAM_ROWS = 16
WRITERS = ("thread", "process")
_REGISTER = text(
    "INSERT INTO replica (replica_id, expires_at, prunable_seq, started_at) "
    "VALUES (:id, now() + :lease * interval '1 second', :prunable, now()) "
    "ON CONFLICT (replica_id) DO UPDATE SET expires_at = excluded.expires_at, "
    "prunable_seq = excluded.prunable_seq"
)
_RENEW = text(
    "UPDATE replica SET expires_at = now() + :lease * interval '1 second', "
    "prunable_seq = greatest(prunable_seq, :prunable) "
    "WHERE replica_id = :id AND expires_at > now()"
)
_LEAD = text(
    "INSERT INTO leader (id, replica_id, expires_at) "
    "VALUES (1, :id, now() + :lease * interval '1 second') "
    "ON CONFLICT (id) DO UPDATE SET replica_id = excluded.replica_id, "
    "expires_at = excluded.expires_at "
    "WHERE leader.replica_id = excluded.replica_id OR leader.expires_at <= now() "
    "RETURNING replica_id"
)
_STATEMENT_TIMEOUT = text("SELECT set_config('statement_timeout', :ms, true)")
_RELEASE = (
    text("UPDATE replica SET expires_at = now() - interval '1 second' WHERE replica_id = :id"),
    text("UPDATE leader SET expires_at = now() - interval '1 second' WHERE replica_id = :id"),
)


class SqlStore:
    """`HubStore` on any SQLAlchemy database (SQLite WAL by default, PostgreSQL)."""

    def __init__(
        self,
        database_url: str,
        *,
        writer: str,
        policy: collab.Policy | None = None,
        reader_threads: int = 4,
        busy_timeout: float = 5.0,
        commit_timeout: float = 30.0,
        auto_upgrade: bool = True,
        shared: SharedLog | None = None,
    ) -> None:
        """`writer`: "thread", or "process" for commits in a child process (`HubConfig.writer`
        says which the hub uses), each answered within `commit_timeout` seconds or UNAVAILABLE.
        `shared`: one of several replicas on this PostgreSQL database (`HubConfig.replica`)."""
        if writer not in WRITERS:
            raise ValueError(f"writer must be 'thread' or 'process', not {writer!r}")
        if shared and not database_url.startswith("postgresql"):
            raise ValueError(
                "replica mode needs PostgreSQL (a postgresql+psycopg:// URL): replicas share "
                "its advisory locks and LISTEN/NOTIFY"
            )
        self.shared = shared
        self.database_url = database_url
        self.auto_upgrade = auto_upgrade  # at open: else a schema not this hub's is refused
        self.policy = policy or collab.Policy()
        self._engine = make_engine(database_url, int(busy_timeout * 1000))
        # The thread writer's commits, and the schema and head at open in either mode.
        self.sql_writer = SqlWriter(self._engine, self.policy, shared)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kernelhub-writer")
        self._readers = ThreadPoolExecutor(reader_threads, thread_name_prefix="kernelhub-reader")
        # Token reads that arrive together go in one statement (a connect storm's).
        self._tokens: BatchedLookup[str, Any] = BatchedLookup(self._token_rows)
        # The live streams' token re-check, below the ORM (`bulk.BulkWriter.valid_tokens`).
        self._bulk = BulkWriter(self._engine.dialect)
        # Replicas' leases: a thread and a connection of their own, so that a connect storm's
        # reads never queue a renewal past its lease; one thread, so a release runs after
        # any renewal still in flight, never before it.
        self._lease_engine = make_engine(database_url, pool_size=1) if shared else None
        self._leases = ThreadPoolExecutor(1, thread_name_prefix="kernelhub-lease")
        self.writer_process = (
            WriterProcess(
                WriterSettings(
                    database_url,
                    self.policy,
                    busy_timeout,
                    logging.getLogger().getEffectiveLevel(),
                    shared,
                ),
                commit_timeout,
            )
            if writer == "process"
            else None
        )

    # --- threads ------------------------------------------------------------

    def _session(self) -> Session:
        return session(self._engine)

    async def _read(self, fn: Callable[[Session], T]) -> T:
        def run() -> T:
            with self._session() as s:
                return fn(s)

        return await self._off_loop(self._readers, run)

    async def _read_core(self, fn: Callable[[DbConnection], T]) -> T:
        """`_read` for Core statements: a pooled connection, without the ORM session's
        transaction bookkeeping, which every stream's token read paid for in a storm."""

        def run() -> T:
            with self._engine.connect() as connection:
                return fn(connection)

        return await self._off_loop(self._readers, run)

    async def _lease(self, fn: Callable[[Session], T], timeout: float) -> T:
        """A lease statement on the lease thread, given up on (UNAVAILABLE) after `timeout`
        seconds: PostgreSQL cancels it then (statement_timeout), and the caller does not wait
        longer even if the connection itself is stuck."""
        assert self._lease_engine is not None, "leases are a replica's"
        engine = self._lease_engine

        def run() -> T:
            with session(engine) as s:
                # A little under the caller's wait, so PostgreSQL gives up first.
                s.execute(_STATEMENT_TIMEOUT, {"ms": str(max(1, int(timeout * 800)))})
                return fn(s)

        try:
            async with asyncio.timeout(timeout):
                return await self._off_loop(self._leases, run)
        except TimeoutError:
            raise unavailable(f"the lease statement took over {timeout:g} s") from None
        except DBAPIError as exc:  # canceled by statement_timeout, or the connection failed
            raise unavailable(f"database unavailable: {exc.orig}") from exc

    async def _write(self, fn: Callable[[], T]) -> T:
        return await self._off_loop(self._writer, fn)

    @staticmethod
    async def _off_loop(executor: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn)
        except OperationalError as exc:  # down, or locked (e.g. by the writer process)
            raise unavailable(f"database unavailable: {exc.orig}") from exc

    # --- lifecycle ----------------------------------------------------------

    async def open(self) -> None:
        def create() -> None:
            self._create_schema()
            self.sql_writer.load_head()

        await self._write(create)
        if self.writer_process is not None:
            await self.writer_process.start()

    def _create_schema(self) -> None:
        """Bring the database's schema up to this hub's, or refuse one this hub cannot use."""
        # Imported here: a writer child (which never migrates) starts without Alembic.
        from . import schema

        schema.ensure(self._engine, self.auto_upgrade)

    async def close(self) -> None:
        if self.writer_process is not None:
            await self.writer_process.close()
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self._leases.shutdown(wait=True)
        self.sql_writer.dispose()  # its kept connection (a writer thread's), then the pool
        if self._lease_engine is not None:
            self._lease_engine.dispose()

    # --- writes -------------------------------------------------------------

    async def commit(self, commands: Sequence[Command]) -> list[Outcome | StatusError]:
        """`HubStore.commit`, in the writer process or the writer thread."""
        if self.writer_process is not None:
            try:
                return await self.writer_process.commit(commands)
            except StatusError as error:  # the child died, wedged or could not start
                return [error] * len(commands)
        return await self._write(lambda: self.sql_writer.commit(commands))

    # --- the event log ------------------------------------------------------

    async def head_seq(self) -> int:
        return await self._read(lambda s: int(s.exec(select(func.max(EventRow.seq))).one() or 0))

    async def events_for(
        self,
        agent_id: str,
        after_seq: int,
        limit: int,
        max_bytes: int | None = None,
        subscription: Filter = EVERYTHING,
        scan_seqs: int = REPLAY_SCAN_SEQS,
    ) -> EventPage:
        """The events after `after_seq` that `agent_id` is entitled to, oldest first: at
        most `limit`, and no more than `max_bytes` of them beyond the first (an event too
        large for any response still comes, alone, for its reader to replace). The
        subscription is a WHERE on the event's tag columns, over at most `scan_seqs` seqs."""
        direct = exists().where(
            col(EventRecipientRow.seq) == col(EventRow.seq),
            col(EventRecipientRow.agent_id) == agent_id,
        )
        entitled = or_(_broadcast_for(agent_id, subscription), direct)
        return await self._log_page(after_seq, limit, max_bytes, after_seq + scan_seqs, entitled)

    async def events_after(
        self, after_seq: int, limit: int, max_bytes: int | None = None
    ) -> EventPage:
        return await self._log_page(after_seq, limit, max_bytes, None)

    async def _log_page(
        self,
        after_seq: int,
        limit: int,
        max_bytes: int | None,
        through: int | None,
        *where: ColumnElement[bool],
    ) -> EventPage:
        """The events after `after_seq` (and up to `through`) that `where` admits, oldest
        first, within `limit` and `max_bytes` (`paging.take`), and whether more follow."""
        bound = () if through is None else (col(EventRow.seq) <= through,)
        query = (
            select(EventRow.body)
            .where(EventRow.seq > after_seq, *bound, *where)
            .order_by(col(EventRow.seq))
            .limit(limit + 1)
            .execution_options(yield_per=STREAM_ROWS)
        )

        def read(s: Session) -> EventPage:
            # Whether the log goes on past the bound, asked BEFORE the page: seqs commit in
            # order, so once a row above `through` is seen, every row up to it that will
            # ever exist is committed, and the page (read after, on PostgreSQL a later
            # snapshot) sees them all; the reader may then skip to `through`.
            beyond = through is not None and (
                s.exec(select(EventRow.seq).where(EventRow.seq > through).limit(1)).first()
                is not None
            )
            page, more = paging.take(
                s.exec(query), partial(decode_stored, pb.HubEvent), limit, max_bytes
            )
            events = EventPage(event for _, event in page)
            events.more = more
            if through is not None and beyond and not more:
                # The bound, not the log's end, ended this page.
                events.more, events.through = True, through
            if self.shared is not None:
                # Replicas' seqs are dense (`sql_write`): a log that now begins above
                # `after_seq + 1` lost events this reader may be owed (the replica's lease
                # ran out and the leader pruned past its readers), read or not.
                first = s.exec(select(func.min(EventRow.seq))).one()
                if first is not None and first > after_seq + 1:
                    raise StatusError(
                        grpc.StatusCode.OUT_OF_RANGE,
                        f"events after seq {after_seq} were pruned while this stream still "
                        f"needed them (the log now begins at seq {first}); resume to get "
                        "what is left, or start afresh with skip_history",
                    )
            return events

        return await self._read(read)

    # --- retention ----------------------------------------------------------

    async def oldest_seq(self) -> int:
        return await self._read(lambda s: int(s.exec(select(func.min(EventRow.seq))).one() or 1))

    async def prunable_through(
        self, through_seq: int, older_than: datetime | None, limit: int
    ) -> int:
        query = (
            select(EventRow.seq, EventRow.created_at)
            .where(EventRow.seq <= through_seq)
            .order_by(col(EventRow.seq))
            .limit(limit)
        )

        def scan(s: Session) -> int:
            last = 0
            for seq, created in s.exec(query):
                # SQLite and PostgreSQL's plain timestamps come back naive: they are UTC.
                if older_than is not None and created.replace(tzinfo=UTC) >= older_than:
                    break
                last = seq
            return last

        return await self._read(scan)

    async def prune_events(self, through_seq: int, limit: int = 0) -> int:
        return await self._run(PruneEvents(through_seq, limit))

    async def prune_ledger(self, older_than: datetime, limit: int) -> int:
        return await self._run(PruneLedger(older_than, limit))

    async def _run(self, job: WriterJob) -> int:
        """A retention job where commits run: in the writer process or the writer thread."""
        if self.writer_process is not None:
            return await self.writer_process.run(job)
        return await self._write(lambda: self.sql_writer.run(job))

    async def log_after(
        self, after_seq: int, limit: int, max_bytes: int
    ) -> tuple[list[RoutedEvent], bool]:
        """Every event after `after_seq` with its audience and tags, oldest first: at most
        `limit`, and no more than `max_bytes` of them beyond the first (what a replica reads
        of the others' commits, to route them); and whether more follow."""
        query = (
            core_select(  # seven columns: more than sqlmodel's select types
                col(EventRow.seq),
                col(EventRow.broadcast),
                col(EventRow.body),
                col(EventRow.kind),
                col(EventRow.artifact_kind),
                col(EventRow.spec_mask),
                col(EventRow.sender_id),
            )
            .where(col(EventRow.seq) > after_seq)
            .order_by(col(EventRow.seq))
            .limit(limit + 1)
            .execution_options(yield_per=STREAM_ROWS)
        )

        def read(s: Session) -> tuple[list[RoutedEvent], bool]:
            page, more = paging.take(
                s.execute(query), lambda row: decode_stored(pb.HubEvent, row[2]), limit, max_bytes
            )
            if not page:
                return [], False
            audience: dict[int, set[str]] = {}
            last = page[-1][1].seq
            # Directed events' audiences, and broadcasts' `also_to` (their recipient rows).
            for seq, agent_id in s.exec(
                select(EventRecipientRow.seq, EventRecipientRow.agent_id).where(
                    col(EventRecipientRow.seq) > after_seq, col(EventRecipientRow.seq) <= last
                )
            ):
                audience.setdefault(seq, set()).add(agent_id)
            return [
                RoutedEvent(
                    event,
                    None if row[1] else frozenset(audience.get(event.seq, ())),
                    Tags(
                        row[3],
                        row[4],
                        row[5],
                        row[6],
                        frozenset(audience.get(event.seq, ())) if row[1] else frozenset(),
                    ),
                )
                for row, event in page
            ], more

        return await self._read(read)

    async def presence_after(self, rev: int, limit: int) -> list[tuple[int, str, pb.AgentInfo]]:
        """The agent rows changed after presence revision `rev`, oldest change first, at
        most `limit`: (revision, the replica carrying it, the agent as stored)."""
        query = (
            select(AgentRow)
            .where(col(AgentRow.presence_rev) > rev)
            .order_by(col(AgentRow.presence_rev))
            .limit(limit)
        )
        return await self._read(
            lambda s: [(r.presence_rev, r.replica_id, agent_to_proto(r)) for r in s.exec(query)]
        )

    # --- replica leases (by the database's clock) ------------------------------

    async def register_replica(self, replica_id: str, lease: float, timeout: float) -> int:
        """This replica's lease, taken (again); returns where the log begins, read under the
        log's lock (so retention's prune is wholly before or after), which is also how far
        it lets the log be pruned until its retention says more."""

        def register(s: Session) -> int:
            s.connection().execute(LOCK_STATEMENT, self.sql_writer.lock_params)
            oldest = int(s.exec(select(func.coalesce(func.min(EventRow.seq), 0))).one())
            oldest = (
                oldest or int(s.exec(select(func.coalesce(func.max(EventRow.seq), 0))).one()) + 1
            )
            s.execute(_REGISTER, {"id": replica_id, "lease": lease, "prunable": oldest - 1})
            s.commit()
            return oldest

        return await self._lease(register, timeout)

    async def renew_leases(
        self, replica_id: str, lease: float, prunable: int, timeout: float
    ) -> tuple[bool, bool]:
        """Renew this replica's lease, publishing how far the log may be pruned for its
        readers, and the leader lease if it holds it (or take it if it expired), in one
        transaction: (whether its own lease was still live, whether it leads). Not live: the
        others may have marked its agents offline, and it does not lead."""

        def renew(s: Session) -> tuple[bool, bool]:
            done = s.execute(_RENEW, {"id": replica_id, "lease": lease, "prunable": prunable})
            if not done.rowcount:  # type: ignore[attr-defined]
                s.commit()
                return False, False
            holder = s.execute(_LEAD, {"id": replica_id, "lease": lease}).scalar()
            s.commit()
            return True, holder == replica_id

        return await self._lease(renew, timeout)

    async def release_leases(self, replica_id: str, timeout: float) -> None:
        """A replica stopping: its leases end now, so the leader marks whatever it still
        carries offline and another replica leads at once."""

        def release(s: Session) -> None:
            for statement in _RELEASE:
                s.execute(statement, {"id": replica_id})
            s.commit()

        await self._lease(release, timeout)

    def listen_conninfo(self) -> str:
        """The database URL as libpq takes it (for a LISTEN connection of psycopg's own)."""
        return (
            make_url(self.database_url)
            .set(drivername="postgresql")
            .render_as_string(hide_password=False)
        )

    # --- tokens -------------------------------------------------------------

    async def issue_token(
        self, agent_id: str, ttl: timedelta | None = None, role: Role = Role.AGENT
    ) -> IssuedToken:
        """A new token for `agent_id`; INVALID_ARGUMENT for an id Hello would refuse."""
        row, issued = issue(agent_id, ttl, role)

        def insert() -> None:
            with self._session() as s:
                s.add(row)
                s.commit()

        await self._write(insert)
        return issued

    async def authenticate(self, token: str) -> Principal | None:
        """Whom the token speaks for, if it is valid, unrevoked and unexpired."""
        digest = hash_token(token)
        row = await self._tokens.get(digest)
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        if row.revoked_at is not None or (row.expires_at and row.expires_at <= utcnow()):
            return None
        return Principal(row.agent_id, Role(row.role))

    async def _token_rows(self, digests: list[str]) -> dict[str, Any]:
        """The token rows of these hashes, by hash: columns, not ORM rows, in one statement
        for all (every stream opens with this read)."""
        rows = await self._read_core(lambda c: c.execute(_AUTHENTICATE, {"digests": digests}).all())
        return {row.token_hash: row for row in rows}

    async def valid_token_hashes(self, hashes: Collection[str]) -> set[str]:
        """Which of these token hashes are still valid (not revoked, not expired)."""
        if not hashes:
            return set()
        digests, now = list(hashes), utcnow()
        return await self._read_core(lambda c: self._bulk.valid_tokens(c, digests, now))

    async def list_tokens(self) -> list[TokenRow]:
        return await self._read(
            lambda s: list(s.exec(select(TokenRow).order_by(col(TokenRow.created_at))).all())
        )

    async def revoke_tokens(self, agent_or_token_id: str) -> int:
        """Revoke one token by id, or every token of an agent; returns how many."""

        def revoke() -> int:
            with self._session() as s:
                rows = s.exec(
                    select(TokenRow).where(
                        or_(
                            col(TokenRow.token_id) == agent_or_token_id,
                            col(TokenRow.agent_id) == agent_or_token_id,
                        ),
                        col(TokenRow.revoked_at).is_(None),
                    )
                ).all()
                for row in rows:
                    row.revoked_at = utcnow()
                    s.add(row)
                s.commit()
                return len(rows)

        return await self._write(revoke)

    async def list_tokens_page(self, limit: int, cursor: str, max_bytes: int | None = None) -> Page:
        query = (
            select(TokenRow)
            .where(col(TokenRow.token_id) > cursor)
            .order_by(col(TokenRow.token_id))
            .limit(limit + 1)
        )
        page, more = await self._read(
            lambda s: paging.take(s.exec(query), token_to_proto, limit, max_bytes)
        )
        return Page([info for _, info in page], page[-1][1].token_id if more else "")

    # --- queries ------------------------------------------------------------

    async def list_agents(
        self, online_only: bool, limit: int, cursor: str, max_bytes: int | None = None
    ) -> Page:
        offset = int(cursor or 0)
        query = select(AgentRow).order_by(col(AgentRow.online).desc(), col(AgentRow.agent_id))
        if online_only:
            query = query.where(col(AgentRow.online))
        query = query.offset(offset).limit(limit + 1).execution_options(yield_per=STREAM_ROWS)
        page, more = await self._read(
            lambda s: paging.take(s.exec(query), agent_to_proto, limit, max_bytes, paging.stub)
        )
        return Page([info for _, info in page], str(offset + len(page)) if more else "")

    async def list_artifacts(
        self,
        kind: int,
        specialization: int,
        contributor_id: str,
        limit: int,
        cursor: str,
        max_bytes: int | None = None,
        validation_state: int = 0,
    ) -> Page:
        query = select(ArtifactRow.seq, ArtifactRow.body).order_by(col(ArtifactRow.seq).desc())
        if validation_state:
            query = query.where(ArtifactRow.validation_state == validation_state)
        if kind:
            query = query.where(ArtifactRow.kind == kind)
        if specialization:
            query = query.where(ArtifactRow.specialization == specialization)
        if contributor_id:
            query = query.where(ArtifactRow.contributor_id == contributor_id)
        if cursor:
            query = query.where(ArtifactRow.seq < int(cursor))
        query = query.limit(limit + 1).execution_options(yield_per=STREAM_ROWS)
        page, more = await self._read(
            lambda s: paging.take(
                s.exec(query),
                lambda row: decode_stored(pb.Artifact, row[1]),
                limit,
                max_bytes,
                paging.stub,
            )
        )
        return Page([artifact for _, artifact in page], str(page[-1][0][0]) if more else "")

    async def get_artifact(self, artifact_id: str) -> pb.Artifact | None:
        row = await self._read(lambda s: s.get(ArtifactRow, artifact_id))
        return decode_stored(pb.Artifact, row.body) if row else None

    async def list_collaborations(
        self, agent_id: str, state: int, limit: int, cursor: str, max_bytes: int | None = None
    ) -> Page:
        query = select(CollaborationRow).order_by(col(CollaborationRow.session_id).desc())
        if agent_id:
            query = query.where(
                or_(
                    col(CollaborationRow.initiator_id) == agent_id,
                    col(CollaborationRow.target_id) == agent_id,
                )
            )
        if state:
            query = query.where(CollaborationRow.state == state)
        if cursor:
            query = query.where(CollaborationRow.session_id < cursor)
        query = query.limit(limit + 1).execution_options(yield_per=STREAM_ROWS)
        page, more = await self._read(
            lambda s: paging.take(
                s.exec(query), collaboration_to_proto, limit, max_bytes, paging.stub
            )
        )
        return Page([c for _, c in page], page[-1][0].session_id if more else "")

    async def list_feature_requests(
        self, requester_id: str, limit: int, cursor: str, max_bytes: int | None = None
    ) -> Page:
        query = select(FeatureRequestRow).order_by(col(FeatureRequestRow.seq).desc())
        if requester_id:
            query = query.where(FeatureRequestRow.requester_id == requester_id)
        if cursor:
            query = query.where(FeatureRequestRow.seq < int(cursor))
        query = query.limit(limit + 1).execution_options(yield_per=STREAM_ROWS)

        def decode(row: FeatureRequestRow) -> pb.FeatureRequestInfo:
            info = feature_request_to_proto(row)
            info.DiscardUnknownFields()  # as _decode does
            return info

        page, more = await self._read(
            lambda s: paging.take(s.exec(query), decode, limit, max_bytes, paging.stub)
        )
        return Page([info for _, info in page], str(page[-1][0].seq) if more else "")

    async def knowledge_base(self, recent: int) -> pb.KnowledgeBaseSummary:
        def summary(s: Session) -> pb.KnowledgeBaseSummary:
            counts = dict(
                s.exec(select(ArtifactRow.kind, func.count()).group_by(col(ArtifactRow.kind))).all()
            )
            newest = s.exec(
                select(ArtifactRow.body).order_by(col(ArtifactRow.seq).desc()).limit(recent)
            ).all()
            return pb.KnowledgeBaseSummary(
                pattern_count=counts.get(pb.ARTIFACT_KIND_PATTERN, 0),
                code_component_count=counts.get(pb.ARTIFACT_KIND_CODE_COMPONENT, 0),
                os_component_count=counts.get(pb.ARTIFACT_KIND_OS_COMPONENT, 0),
                feature_request_count=s.exec(
                    select(func.count()).select_from(FeatureRequestRow)
                ).one(),
                recent_artifacts=[decode_stored(pb.Artifact, b) for b in newest],
            )

        return await self._read(summary)

    async def stats(self) -> pb.GetHubStatsResponse:
        def count(s: Session, model: type[SQLModel], *where: Any) -> int:
            return int(s.exec(select(func.count()).select_from(model).where(*where)).one())

        def gather(s: Session) -> pb.GetHubStatsResponse:
            by_state = s.exec(
                select(CollaborationRow.state, func.count()).group_by(col(CollaborationRow.state))
            ).all()
            return pb.GetHubStatsResponse(
                agents_known=count(s, AgentRow),
                agents_online=count(s, AgentRow, col(AgentRow.online)),
                feature_delivery_count=count(s, FeatureDeliveryRow),
                collaborations_by_state={
                    pb.CollaborationState.Name(state): n  # type: ignore[arg-type]
                    for state, n in by_state
                },
                head_seq=int(s.exec(select(func.max(EventRow.seq))).one() or 0),
            )

        def validation(s: Session) -> dict[str, int]:
            return {
                pb.ValidationState.Name(state): n  # type: ignore[arg-type]
                for state, n in s.exec(
                    select(ArtifactRow.validation_state, func.count())
                    .where(ArtifactRow.validation_state != 0)
                    .group_by(col(ArtifactRow.validation_state))
                ).all()
            }

        response = await self._read(gather)
        response.artifacts_by_validation_state.update(await self._read(validation))
        response.knowledge_base.CopyFrom(await self.knowledge_base(recent=0))
        return response

    async def report_data(self, window: report_data.Window) -> report_data.ReportData:
        """The run report's numbers for the rows created in `window` (`report_data.py`)."""
        return await self._read(partial(report_data.gather, window=window))

    async def integrity_check(self) -> str:
        """SQLite's own consistency check ('ok' when sound); other databases answer 'ok'."""
        if not self.database_url.startswith("sqlite"):
            return "ok"
        return await self._read(lambda s: str(s.execute(text("PRAGMA integrity_check")).scalar()))


def _broadcast_for(agent_id: str, subscription: Filter) -> ColumnElement[bool]:
    """The broadcast events by others that `subscription` matches, on the tag columns (as
    `Filter.matches`; rows of kind 0 or presence, which older hubs logged, never match)."""
    kinds = subscription.broadcast_kinds()
    if not kinds:
        return false()
    terms: list[ColumnElement[bool]] = [
        col(EventRow.broadcast).is_(True),
        col(EventRow.sender_id) != agent_id,
        col(EventRow.kind).in_(kinds),
    ]
    if subscription.artifact_kinds:
        terms.append(
            or_(
                col(EventRow.kind) != ARTIFACTS,
                col(EventRow.artifact_kind).in_(sorted(subscription.artifact_kinds)),
            )
        )
    if subscription.spec_mask:
        terms.append(col(EventRow.spec_mask).op("&")(subscription.spec_mask) != 0)
    if subscription.contributors:
        terms.append(col(EventRow.sender_id).in_(sorted(subscription.contributors)))
    return and_(*terms)
