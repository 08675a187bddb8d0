"""A real hub on an ephemeral port with a fresh database, and raw protocol clients for it.

The hubs come from `hub_service.testing.TestHub`; the fixtures here are thin wrappers over it."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy

from generated.kernelhub.v1 import hub_pb2 as pb
from generated.kernelhub.v1 import hub_pb2_grpc
from hub_service.collaboration import Policy
from hub_service.config import HubConfig
from hub_service.roles import Role
from hub_service.server import HubServer
from hub_service.testing import TestHub

POSTGRES_URL = os.environ.get(
    "KERNELHUB_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
# Every message kind a trainer may send after Hello, in the contract's order (a batch is not a
# kind of its own but a carrier of them: tests/test_batch.py).
KINDS = [
    f.name
    for f in pb.ConnectRequest.DESCRIPTOR.oneofs_by_name["body"].fields
    if f.name not in ("hello", "batch")
]
EOF: Any = grpc.aio.EOF  # missing from grpc-stubs
WAIT = 10.0  # seconds any single expected message may take on a loaded 2-core machine


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hub.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A private schema in the shared PostgreSQL, dropped afterwards."""
    schema = f"kh_test_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(POSTGRES_URL)
    try:
        with admin.begin() as conn:
            conn.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    except sqlalchemy.exc.OperationalError as exc:
        pytest.fail(f"PostgreSQL at {POSTGRES_URL} is not reachable: {exc}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each database the store serves: a fresh SQLite file, a private PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def make_config(database_url: str, **overrides: Any) -> HubConfig:
    config = HubConfig(
        host="127.0.0.1", port=0, database_url=database_url, training_sync_interval=0
    )
    policy = overrides.pop("policy", None)
    if policy is not None:
        config.policy = policy
    return replace(config, **overrides)


@pytest.fixture
def hub_config(database_url: str) -> HubConfig:
    return make_config(database_url)


@pytest.fixture
async def hub(hub_config: HubConfig) -> AsyncIterator[HubServer]:
    async with TestHub.in_process(hub_config) as test_hub:
        yield test_hub.server


def async_stub(channel: grpc.aio.Channel) -> hub_pb2_grpc.HubServiceAsyncStub:
    """The stub, typed as the aio variant (grpc-stubs cannot tell the overloads apart)."""
    return hub_pb2_grpc.HubServiceStub(channel)  # type: ignore[return-value]


def target(hub: HubServer) -> str:
    return f"127.0.0.1:{hub.port}"


def auth(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def hello(agent_id: str, specialization: int = pb.SPECIALIZATION_NETWORKING, **kw: Any) -> pb.Hello:
    capabilities = kw.pop("capabilities", ["network_protocols", "communication"])
    return pb.Hello(
        agent_id=agent_id,
        specialization=specialization,  # type: ignore[arg-type]
        capabilities=capabilities,
        version="test",
        **kw,
    )


def pattern(pattern_id: str = "p1", confidence: float = 0.9) -> pb.Pattern:
    return pb.Pattern(
        pattern_id=pattern_id,
        pattern_type="networking_pattern",
        specialization=pb.SPECIALIZATION_NETWORKING,
        complexity=0.5,
        reusability=0.6,
        performance_impact=0.3,
        confidence=confidence,
    )


def code_component(
    component_id: str = "c1", code: str = "int ring_size(void) { return 64; }\n"
) -> pb.CodeComponent:
    return pb.CodeComponent(
        component_id=component_id,
        name="ring_buffer",
        language="c",
        code=code,
        dependencies=["libc"],
        test_coverage=0.9,
        performance_score=0.8,
        specialization=pb.SPECIALIZATION_NETWORKING,
    )


def os_component(name: str = "network_stack") -> pb.OsComponent:
    return pb.OsComponent(
        component_id=f"{name}_1",
        name=name,
        component_type="os_feature",
        specializations=[pb.SPECIALIZATION_NETWORKING],
        language="c",
        implementation="int add(int a, int b) { return a + b; }\n",
        test_cases=["test_basic"],
        performance_metrics=pb.PerformanceMetrics(
            cpu_usage=0.2, memory_kib=128, execution_time_seconds=0.001
        ),
        quality_score=0.9,
    )


@dataclass
class RawTrainer:
    """The wire protocol with nothing hidden: write requests, read what comes back."""

    agent_id: str
    call: grpc.aio.StreamStreamCall
    welcome: pb.Welcome
    receipts: dict[str, pb.Receipt] = field(default_factory=dict)
    errors: dict[str, pb.RequestError] = field(default_factory=dict)
    events: list[pb.HubEvent] = field(default_factory=list)
    syncs: list[pb.TrainingSync] = field(default_factory=list)
    presence: list[pb.PresenceUpdate] = field(default_factory=list)
    # Who is online as presence told it (roster, then changes), and whether the roster ended.
    online: dict[str, pb.AgentInfo] = field(default_factory=dict)
    roster_complete: bool = False
    replay_complete: int | None = None  # the seq of the hub's end-of-replay marker

    @classmethod
    async def welcomed(cls, agent_id: str, call: grpc.aio.StreamStreamCall) -> RawTrainer:
        """The trainer once its first response (the welcome, and whatever was ready beside
        it) is read from `call`, whose Hello is written."""
        first = await asyncio.wait_for(call.read(), WAIT)
        assert first is not EOF and first.HasField("welcome"), f"no welcome: {first}"
        assert isinstance(first, pb.ConnectResponse)
        trainer = cls(agent_id, call, first.welcome)
        trainer.take(first)
        return trainer

    async def send(self, message_id: str | None = None, **body: Any) -> str:
        message_id = message_id if message_id is not None else uuid.uuid4().hex
        await self.call.write(pb.ConnectRequest(message_id=message_id, **body))
        return message_id

    async def _read_one(self) -> None:
        response = await asyncio.wait_for(self.call.read(), WAIT)
        if response is EOF:
            raise EOFError(f"{self.agent_id}: stream ended")
        self.take(response)

    def take(self, response: pb.ConnectResponse) -> None:
        """What one response carries, in the contract's field order."""
        for receipt in response.receipts:
            self.receipts[receipt.message_id] = receipt
        for error in response.errors:
            self.errors[error.message_id] = error
        self.events.extend(response.events)
        if response.HasField("replay_complete"):
            self.replay_complete = response.replay_complete.seq
        if response.HasField("training_sync"):
            self.syncs.append(response.training_sync)
        if response.HasField("presence"):
            update = response.presence
            last = self.presence[-1] if self.presence else None
            if update.roster and (last is None or last.roster_complete or not last.roster):
                self.online.clear()  # a roster: a fresh view
            self.presence.append(update)
            for agent_id in update.offline:
                self.online.pop(agent_id, None)
            for agent in update.online:
                self.online[agent.agent_id] = agent
            self.roster_complete = self.roster_complete or update.roster_complete

    async def answer(self, message_id: str) -> pb.Receipt | pb.RequestError:
        """The receipt or error for `message_id` (waits for it)."""
        while message_id not in self.receipts and message_id not in self.errors:
            await self._read_one()
        return self.receipts.get(message_id) or self.errors[message_id]

    async def receipt(self, message_id: str) -> pb.Receipt:
        answer = await self.answer(message_id)
        assert isinstance(answer, pb.Receipt), f"expected a receipt, got error {answer}"
        return answer

    async def error(self, message_id: str) -> pb.RequestError:
        answer = await self.answer(message_id)
        assert isinstance(answer, pb.RequestError), f"expected an error, got receipt {answer}"
        return answer

    async def event(self, kind: str, **match: Any) -> pb.HubEvent:
        """The first event of `kind` whose body fields match, reading until it arrives."""
        seen = 0
        while True:
            for event in self.events[seen:]:
                if event.WhichOneof("body") == kind and all(
                    _field(getattr(event, kind), k) == v for k, v in match.items()
                ):
                    return event
            seen = len(self.events)
            await self._read_one()

    async def joined(self, agent_id: str) -> pb.AgentInfo:
        """`agent_id` as presence announced it online (reading until it is)."""
        while agent_id not in self.online:
            await self._read_one()
        return self.online[agent_id]

    async def left(self, agent_id: str) -> None:
        """Reads until presence says `agent_id` went offline (after it was online)."""
        seen = 0
        while True:
            for update in self.presence[seen:]:
                if agent_id in update.offline:
                    return
            seen = len(self.presence)
            await self._read_one()

    async def until_replayed(self) -> int:
        while self.replay_complete is None:
            await self._read_one()
        return self.replay_complete

    async def until_roster(self) -> None:
        while not self.roster_complete:
            await self._read_one()

    async def until_seq(self, seq: int) -> None:
        while not self.events or self.events[-1].seq < seq:
            await self._read_one()

    async def close(self) -> None:
        await self.call.done_writing()
        self.call.cancel()


def _field(message: Any, path: str) -> Any:
    for part in path.split("__"):
        message = getattr(message, part)
    return message


class HubHarness:
    """Issues tokens and opens raw streams against one hub."""

    def __init__(self, server: HubServer) -> None:
        self.server = server
        self.channel = grpc.aio.insecure_channel(target(server))
        self.stub = async_stub(self.channel)
        self.tokens: dict[str, str] = {}

    async def token(
        self, agent_id: str, ttl: timedelta | None = None, role: Role = Role.AGENT
    ) -> str:
        if agent_id not in self.tokens:
            self.tokens[agent_id] = await self.server.issue_token(agent_id, ttl, role)
        return self.tokens[agent_id]

    async def connect(self, agent_id: str, hello_message: pb.Hello | None = None) -> RawTrainer:
        call = self.stub.Connect(metadata=auth(await self.token(agent_id)))
        await call.write(
            pb.ConnectRequest(message_id="hello", hello=hello_message or hello(agent_id))
        )
        return await RawTrainer.welcomed(agent_id, call)

    async def query(self, method: str, request: Any, agent_id: str = "observer") -> Any:
        return await getattr(self.stub, method)(
            request, metadata=auth(await self.token(agent_id)), timeout=WAIT
        )

    async def close(self) -> None:
        await self.channel.close(None)


@pytest.fixture
async def harness(hub: HubServer) -> AsyncIterator[HubHarness]:
    h = HubHarness(hub)
    try:
        yield h
    finally:
        await h.close()


def short_policy(**kw: Any) -> Policy:
    defaults: dict[str, Any] = {
        "proposal_ttl": timedelta(seconds=60),
        "activity_ttl": timedelta(seconds=60),
        "partner_offline_grace": timedelta(seconds=60),
    }
    defaults.update(kw)
    return Policy(**defaults)


def free_ports(count: int) -> list[int]:
    """`count` distinct ports, free a moment ago. Each socket is held until all are bound:
    bind(0) after a close may give the same port again (two hubs were once handed one
    metrics port, and the second could not start)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


class HubProcess(TestHub):
    """`kernelhub-hub serve` in its own process (`TestHub.subprocess`), so a test can kill it."""

    def __init__(self, db: Path, port: int | None = None, **env: str) -> None:
        super().__init__(
            in_process=False,
            database=db,
            port=port or 0,
            env={"KERNELHUB_LOG_LEVEL": "WARNING", **env},
            stop_timeout=60.0,
        )


def varint(value: int) -> bytes:
    """A protobuf varint, for writing wire bytes by hand (unknown fields, hostile input)."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)
