"""Persistence: the `HubStore` interface and its SQL implementation (SQLite or PostgreSQL).

Database work never runs on the event loop. Group commits go to one writer (which
also makes the event log's `seq` strictly increasing): a thread, or in the hub a
child process (`writer.py`) so that they neither hold nor wait for the loop's GIL.
Reads go to a small pool of reader threads.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Protocol, TypeVar

import grpc
from google.protobuf.message import Message
from sqlalchemy import Connection, Engine, event, exists, func, or_, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session, SQLModel, col, create_engine, select

from generated.kernelhub.v1 import hub_pb2 as pb

from . import collaboration as collab
from . import paging
from .bulk import BulkWriter
from .commands import Command, Outcome, Tx
from .errors import HubError, unavailable
from .models import (
    AgentRow,
    ArtifactRow,
    CollaborationRow,
    EventRecipientRow,
    EventRow,
    FeatureDeliveryRow,
    FeatureRequestRow,
    ReceivedMessageRow,
    TokenRow,
    agent_to_proto,
    collaboration_to_proto,
    feature_request_to_proto,
    utcnow,
)
from .tokens import hash_token, new_token
from .validation import Limits, validate_agent_id
from .writer import WriterProcess, WriterSettings

log = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=Message)
# Rows a page query holds in memory at once: bodies are decoded one by one, and a page
# ends at its byte budget, so a table of huge rows is never read whole.
STREAM_ROWS = 16


def _decode(kind: type[M], body: bytes) -> M:
    """A stored body without the fields the contract does not define: older hubs stored
    whatever clients sent, and those bytes must go nowhere."""
    message = kind.FromString(body)
    message.DiscardUnknownFields()
    return message


@dataclass(frozen=True)
class IssuedToken:
    token_id: str
    agent_id: str
    token: str  # plaintext: shown once, never stored
    expires_at: datetime | None


class EventPage(list[pb.HubEvent]):
    """Events in seq order; `more` says whether the log holds more after the last one."""

    more: bool = False


@dataclass(frozen=True)
class Page:
    """One page of a List query: the rows as protos and the cursor of the next page.
    A page ends after `limit` items or before `max_bytes` of them, whichever comes first;
    an item larger than `max_bytes` alone is refused (RESOURCE_EXHAUSTED naming it)."""

    items: list[Any]
    next_cursor: str


class HubStore(Protocol):
    """Everything the hub persists. SQLite and PostgreSQL both serve it (`SqlStore`)."""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def commit(self, commands: Sequence[Command]) -> list[Outcome | HubError]: ...
    async def events_for(
        self, agent_id: str, after_seq: int, limit: int, max_bytes: int | None = None
    ) -> EventPage: ...
    async def head_seq(self) -> int: ...
    async def authenticate(self, token: str) -> str | None: ...
    async def issue_token(self, agent_id: str, ttl: timedelta | None = None) -> IssuedToken: ...
    async def valid_token_hashes(self, hashes: Collection[str]) -> set[str]: ...
    async def list_tokens(self) -> list[TokenRow]: ...
    async def revoke_tokens(self, agent_or_token_id: str) -> int: ...
    async def list_agents(
        self, online_only: bool, limit: int, cursor: str, max_bytes: int | None = None
    ) -> Page: ...
    async def list_artifacts(
        self,
        kind: int,
        specialization: int,
        contributor_id: str,
        limit: int,
        cursor: str,
        max_bytes: int | None = None,
    ) -> Page: ...
    async def get_artifact(self, artifact_id: str) -> pb.Artifact | None: ...
    async def list_collaborations(
        self, agent_id: str, state: int, limit: int, cursor: str, max_bytes: int | None = None
    ) -> Page: ...
    async def list_feature_requests(
        self, requester_id: str, limit: int, cursor: str, max_bytes: int | None = None
    ) -> Page: ...
    async def knowledge_base(self, recent: int) -> pb.KnowledgeBaseSummary: ...
    async def stats(self) -> pb.GetHubStatsResponse: ...


def _sqlite_pragmas(busy_timeout_ms: int) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()

    return on_connect


def make_engine(database_url: str, busy_timeout_ms: int = 5000) -> Engine:
    if database_url.startswith("sqlite"):
        engine = create_engine(
            database_url,
            connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
            pool_size=8,
        )
        event.listen(engine, "connect", _sqlite_pragmas(busy_timeout_ms))
        return engine
    connect_args = {"connect_timeout": 5} if database_url.startswith("postgresql") else {}
    return create_engine(database_url, pool_size=8, pool_pre_ping=True, connect_args=connect_args)


class SqlStore:
    """`HubStore` on any SQLAlchemy database (SQLite WAL by default, PostgreSQL)."""

    def __init__(
        self,
        database_url: str,
        policy: collab.Policy | None = None,
        reader_threads: int = 4,
        busy_timeout: float = 5.0,
        writer: str = "thread",
        commit_timeout: float = 30.0,
        auto_upgrade: bool = True,
    ) -> None:
        """`writer`: "thread", or "process" for commits in a child process (the hub's
        default), each answered within `commit_timeout` seconds or UNAVAILABLE."""
        if writer not in ("thread", "process"):
            raise ValueError(f"writer must be 'thread' or 'process', not {writer!r}")
        self.database_url = database_url
        self.auto_upgrade = auto_upgrade  # at open: else a schema not this hub's is refused
        self.policy = policy or collab.Policy()
        self._engine = make_engine(database_url, int(busy_timeout * 1000))
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="kernelhub-writer")
        self._readers = ThreadPoolExecutor(reader_threads, thread_name_prefix="kernelhub-reader")
        self._seq = 0
        self.writer_process = (
            WriterProcess(
                WriterSettings(
                    database_url,
                    self.policy,
                    busy_timeout,
                    logging.getLogger().getEffectiveLevel(),
                ),
                commit_timeout,
            )
            if writer == "process"
            else None
        )
        self._bulk = BulkWriter(self._engine.dialect)

    # --- threads ------------------------------------------------------------

    def _session(self) -> Session:
        # Rows outlive their session (they are returned to the event loop).
        return Session(self._engine, expire_on_commit=False)

    async def _read(self, fn: Callable[[Session], T]) -> T:
        def run() -> T:
            with self._session() as session:
                return fn(session)

        return await self._off_loop(self._readers, run)

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
            # Imported here: a writer child (which never migrates) starts without Alembic.
            from . import schema

            schema.ensure(self._engine, self.auto_upgrade)
            self.load_head()

        await self._write(create)
        if self.writer_process is not None:
            await self.writer_process.start()

    def load_head(self) -> int:
        """Continue the event log after its last `seq` (in the thread that commits)."""
        with self._session() as session:
            self._seq = int(session.exec(select(func.max(EventRow.seq))).one() or 0)
        return self._seq

    async def close(self) -> None:
        if self.writer_process is not None:
            await self.writer_process.close()
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self.dispose()

    def dispose(self) -> None:
        self._engine.dispose()

    # --- writes -------------------------------------------------------------

    async def commit(self, commands: Sequence[Command]) -> list[Outcome | HubError]:
        """Apply the commands in order in one transaction (group commit).

        A refused command yields its HubError and the others still commit. If
        the transaction itself fails, each command is retried alone so one
        poisoned command cannot sink its batch-mates; a database that is down
        yields UNAVAILABLE for all (nothing was committed, so no receipt).
        """
        if self.writer_process is not None:
            try:
                return await self.writer_process.commit(commands)
            except HubError as error:  # the child died, wedged or could not start
                return [error] * len(commands)
        return await self._write(lambda: self.commit_sync(commands))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def commit_sync(
        self, commands: Sequence[Command], head_checked: bool = False
    ) -> list[Outcome | HubError]:
        """`commit` in the calling thread: the writer thread's or the writer process's."""
        try:
            return self._transaction(commands)
        except OperationalError as exc:
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
                return self.commit_sync(commands, head_checked=True)
            if len(commands) == 1:
                log.exception("command %s failed", type(commands[0]).__name__)
                return [HubError(grpc.StatusCode.INTERNAL, "the hub failed to apply this message")]
        return [self.commit_sync([command], head_checked=True)[0] for command in commands]

    def _transaction(self, commands: Sequence[Command]) -> list[Outcome | HubError]:
        results: list[Outcome | HubError] = []
        with self._session() as session:
            tx = Tx(session, utcnow(), self._next_seq, self.policy)
            connection = session.connection()
            tx.received = self._received(connection, commands)
            for command in commands:
                try:
                    results.append(self._apply(tx, command))
                except HubError as error:
                    results.append(error)
            session.flush()  # rows the commands changed through the ORM, before the appends
            for model, rows in tx.appends.items():
                self._bulk.insert(connection, model, rows)
            session.commit()
        return results

    def _received(
        self, connection: Connection, commands: Sequence[Command]
    ) -> dict[tuple[str, str], tuple[Outcome, bytes | None]]:
        """The receipts already given for this batch's message ids, in one query."""
        keys = sorted({(c.agent_id, c.message_id) for c in commands if c.message_id})
        return {
            (agent_id, message_id): (Outcome(seq=seq, resource_id=resource_id), fingerprint)
            for agent_id, message_id, seq, resource_id, fingerprint in self._bulk.received(
                connection, keys
            )
        }

    @staticmethod
    def _apply(tx: Tx, command: Command) -> Outcome:
        key = (command.agent_id, command.message_id)
        if command.message_id and (seen := tx.received.get(key)) is not None:
            first, fingerprint = seen
            if fingerprint and command.fingerprint and fingerprint != command.fingerprint:
                raise HubError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    f"message_id {command.message_id} was already used for a different message "
                    f"(seq {first.seq}); use a new message_id",
                )
            return Outcome(seq=first.seq, resource_id=first.resource_id, duplicate=True)
        outcome = command.apply(tx)
        if command.message_id:
            tx.received[key] = (outcome, command.fingerprint or None)
            tx.append(
                ReceivedMessageRow,
                agent_id=command.agent_id,
                message_id=command.message_id,
                seq=outcome.seq,
                resource_id=outcome.resource_id,
                created_at=tx.now,
                fingerprint=command.fingerprint or None,
            )
        return outcome

    # --- the event log ------------------------------------------------------

    async def head_seq(self) -> int:
        return await self._read(lambda s: int(s.exec(select(func.max(EventRow.seq))).one() or 0))

    async def events_for(
        self, agent_id: str, after_seq: int, limit: int, max_bytes: int | None = None
    ) -> EventPage:
        """The events after `after_seq` that `agent_id` is entitled to, oldest first: at
        most `limit`, and no more than `max_bytes` of them beyond the first (an event too
        large for any response still comes, alone, for its reader to replace)."""
        direct = exists().where(
            col(EventRecipientRow.seq) == col(EventRow.seq),
            col(EventRecipientRow.agent_id) == agent_id,
        )
        query = (
            select(EventRow.body)
            .where(
                EventRow.seq > after_seq,
                or_(col(EventRow.broadcast) & (EventRow.sender_id != agent_id), direct),
            )
            .order_by(col(EventRow.seq))
            .limit(limit + 1)
            .execution_options(yield_per=STREAM_ROWS)
        )
        page, more = await self._read(
            lambda s: paging.take(s.exec(query), partial(_decode, pb.HubEvent), limit, max_bytes)
        )
        events = EventPage(event for _, event in page)
        events.more = more
        return events

    # --- tokens -------------------------------------------------------------

    async def issue_token(self, agent_id: str, ttl: timedelta | None = None) -> IssuedToken:
        """A new token for `agent_id`; INVALID_ARGUMENT for an id Hello would refuse."""
        validate_agent_id(agent_id, Limits())
        token = new_token()
        row = TokenRow(
            token_id="tok_" + secrets.token_hex(6),
            agent_id=agent_id,
            token_hash=hash_token(token),
            expires_at=utcnow() + ttl if ttl else None,
        )

        def insert() -> None:
            with self._session() as session:
                session.add(row)
                session.commit()

        await self._write(insert)
        return IssuedToken(row.token_id, agent_id, token, row.expires_at)

    async def authenticate(self, token: str) -> str | None:
        """The agent the token belongs to, if it is valid, unrevoked and unexpired."""
        digest = hash_token(token)
        row = await self._read(
            lambda s: s.exec(select(TokenRow).where(TokenRow.token_hash == digest)).first()
        )
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        if row.revoked_at is not None or (row.expires_at and row.expires_at <= utcnow()):
            return None
        return row.agent_id

    async def valid_token_hashes(self, hashes: Collection[str]) -> set[str]:
        """Which of these token hashes are still valid (not revoked, not expired)."""
        if not hashes:
            return set()
        now = utcnow()
        rows = await self._read(
            lambda s: s.exec(
                select(TokenRow).where(
                    col(TokenRow.token_hash).in_(list(hashes)), col(TokenRow.revoked_at).is_(None)
                )
            ).all()
        )
        return {r.token_hash for r in rows if r.expires_at is None or r.expires_at > now}

    async def list_tokens(self) -> list[TokenRow]:
        return await self._read(
            lambda s: list(s.exec(select(TokenRow).order_by(col(TokenRow.created_at))).all())
        )

    async def revoke_tokens(self, agent_or_token_id: str) -> int:
        """Revoke one token by id, or every token of an agent; returns how many."""

        def revoke() -> int:
            with self._session() as session:
                rows = session.exec(
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
                    session.add(row)
                session.commit()
                return len(rows)

        return await self._write(revoke)

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
            lambda s: paging.take(
                s.exec(query),
                agent_to_proto,
                limit,
                max_bytes,
                _oversized("agent", "agent_id", max_bytes),
            )
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
    ) -> Page:
        query = select(ArtifactRow.seq, ArtifactRow.body).order_by(col(ArtifactRow.seq).desc())
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
                lambda row: _decode(pb.Artifact, row[1]),
                limit,
                max_bytes,
                _oversized("artifact", "artifact_id", max_bytes),
            )
        )
        return Page([artifact for _, artifact in page], str(page[-1][0][0]) if more else "")

    async def get_artifact(self, artifact_id: str) -> pb.Artifact | None:
        row = await self._read(lambda s: s.get(ArtifactRow, artifact_id))
        return _decode(pb.Artifact, row.body) if row else None

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
                s.exec(query),
                collaboration_to_proto,
                limit,
                max_bytes,
                _oversized("collaboration", "session_id", max_bytes),
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
            lambda s: paging.take(
                s.exec(query),
                decode,
                limit,
                max_bytes,
                _oversized("feature request", "request_id", max_bytes),
            )
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
                recent_artifacts=[_decode(pb.Artifact, b) for b in newest],
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

        response = await self._read(gather)
        response.knowledge_base.CopyFrom(await self.knowledge_base(recent=0))
        return response

    async def integrity_check(self) -> str:
        """SQLite's own consistency check ('ok' when sound); other databases answer 'ok'."""
        if not self.database_url.startswith("sqlite"):
            return "ok"
        return await self._read(lambda s: str(s.execute(text("PRAGMA integrity_check")).scalar()))


def _oversized(what: str, id_field: str, max_bytes: int | None) -> Callable[[Message], HubError]:
    """The refusal of a page whose first item alone exceeds `max_bytes`, naming the item."""

    def refuse(item: Message) -> HubError:
        name = getattr(item, id_field)
        return paging.too_large(f"{what} {name}", item.ByteSize(), max_bytes or 0)

    return refuse
