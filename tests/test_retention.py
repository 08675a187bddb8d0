"""Retention on a real hub with real clients, on SQLite (through the writer process) and the
memory store: pruning under load loses nothing a connected trainer is entitled to, a resume
below the low-water mark is refused with OUT_OF_RANGE naming the oldest seq and `HubClient`
recovers by itself, an old message_id is new again once the ledger forgot it, and where a
fresh agent starts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.config import HubConfig
from hub_service.server import HubServer
from hub_service.session import OLDEST_SEQ_KEY
from hub_service.settings import SettingsError, load_settings
from hub_service.testing import TestHub
from trainer_service import HubClient

from .conftest import WAIT, HubHarness, auth, code_component, hello, make_config, pattern, target
from .test_migrations import db_cli

# Rounds are driven by the tests (hub.retention.run()), not by the hub's own timer.
QUIET = {"retention_interval": 3600.0}


@pytest.fixture(params=["sqlite", "memory"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'hub.db'}" if request.param == "sqlite" else "memory://"


@pytest.fixture(params=["sqlite", "memory", "postgres"])
def every_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The stores, PostgreSQL too (its deletes through the writer process)."""
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path / 'hub.db'}" if request.param == "sqlite" else "memory://"


@contextlib.asynccontextmanager
async def running(config: HubConfig) -> AsyncIterator[tuple[HubServer, HubHarness]]:
    async with TestHub.in_process(config) as test_hub:
        harness = HubHarness(test_hub.server)
        try:
            yield test_hub.server, harness
        finally:
            await harness.close()


async def share_many(
    harness: HubHarness, agent_id: str, count: int, tag: str, per_message: int = 1
) -> list[int]:
    """`count` shares by one stream, five messages in flight, `per_message` shares in each
    (a batch); their seqs."""
    sharer = await harness.connect(agent_id, hello(agent_id, skip_history=True))

    async def send(i: int) -> list[str]:
        shares = [
            pb.ConnectRequest(
                message_id=f"{tag}{j}",
                share_pattern=pb.SharePattern(pattern=pattern(f"{tag}{j}")),
            )
            for j in range(i, min(i + per_message, count))
        ]
        if per_message == 1:
            await sharer.send(shares[0].message_id, share_pattern=shares[0].share_pattern)
        else:
            await sharer.send(f"{tag}-batch{i}", batch=pb.RequestBatch(requests=shares))
        return [r.message_id for r in shares]

    seqs: list[int] = []
    step = 5 * per_message
    for start in range(0, count, step):
        ids = [
            m for i in range(start, min(start + step, count), per_message) for m in await send(i)
        ]
        seqs += [(await sharer.receipt(m)).seq for m in ids]
    await sharer.close()
    return seqs


async def test_pruning_under_load_loses_nothing_a_connected_trainer_is_entitled_to(
    every_url: str,
) -> None:
    """A slow reader (its live queue overflows, so it reads the log) and a replay in progress
    pin what they have not yet received, while rounds prune hard (keep 8 events) beside a
    writer: each gets every event it is entitled to, exactly once, in order; and behind
    them the log is pruned."""
    config = make_config(
        every_url,
        event_retention=0,
        event_retention_max_events=8,
        retention_batch_size=16,
        outbound_queue_size=4,
        replay_page_size=8,
        max_events_per_response=4,
        # Fixed lingers: a test hub is too idle for lingers that follow the load.
        lingers_follow_load=False,
        **QUIET,
    )
    async with running(config) as (hub, harness):
        before = await share_many(harness, "AI_Node_9", 40, "old")
        slow = await harness.connect("AI_Node_1", hello("AI_Node_1", skip_history=True))
        # A replay from the mark: everything after it must still come.
        replaying = await harness.connect(
            "AI_Node_2", hello("AI_Node_2", resume_after_seq=before[0])
        )
        stop = asyncio.Event()

        async def prune() -> None:
            while not stop.is_set():
                await hub.retention.run()
                await asyncio.sleep(0)  # a round with nothing to do is only two reads

        pruner = asyncio.create_task(prune())
        try:
            # 12 shares a message: each batch is queued for one group commit at once, so a
            # commit hands the slow reader more events at once than its queue of 4 holds,
            # whatever the machine's timing.
            shares = await share_many(harness, "AI_Node_3", 120, "new", per_message=12)
            # The slow reader reads now and then, a response at a time.
            for _ in range(10):
                await slow._read_one()
            await asyncio.wait_for(slow.until_seq(shares[-1]), WAIT * 3)
            await asyncio.wait_for(replaying.until_seq(shares[-1]), WAIT * 3)

            async def past_their_start() -> None:  # the rounds go on beside us
                while hub.retention.oldest_seq <= slow.welcome.head_seq:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(past_their_start(), WAIT)
        finally:
            stop.set()
            await pruner
        # Pruning went past where both began while they read, and the slow one did read the
        # log (its live queue overflowed).
        assert hub.retention.oldest_seq > slow.welcome.head_seq > before[0]
        [slow_connection] = [c for c in hub.router.connections() if c.agent_id == "AI_Node_1"]
        assert slow_connection.fell_behind > 0
        for reader, start in ((slow, slow.welcome.head_seq), (replaying, before[0])):
            got = [e.seq for e in reader.events if e.seq <= shares[-1]]
            assert got == sorted(set(got)), f"{reader.agent_id}: duplicates or disorder"
            shared = [e.seq for e in reader.events if e.HasField("artifact_shared")]
            expected = [s for s in before + shares if s > start]
            assert shared == expected, f"{reader.agent_id}: lost {set(expected) - set(shared)}"

        # Once both have read everything, the log shrinks to the newest 8 (more may follow:
        # the sharer's agent_left).
        await hub.retention.run()
        head = hub.router.last_published_seq
        assert hub.retention.oldest_seq == head - 8 + 1 == await hub.store.oldest_seq()
        stats = await harness.query("GetHubStats", pb.GetHubStatsRequest())
        assert stats.oldest_seq == hub.retention.oldest_seq
        await slow.close()
        await replaying.close()


async def test_a_resume_racing_a_prune_is_either_refused_or_complete(url: str) -> None:
    """Trainers resume from the mark as they saw it a moment ago, while rounds prune hard
    beside a writer: each is refused with OUT_OF_RANGE, or replays every event after its
    seq that a live observer saw (other than its own): never a hole."""
    config = make_config(
        url, event_retention=0, event_retention_max_events=30, retention_batch_size=4, **QUIET
    )
    async with running(config) as (hub, harness):
        observer = await harness.connect("observer", hello("observer", skip_history=True))
        await share_many(harness, "sharer", 40, "old")
        await hub.retention.run()
        stop = asyncio.Event()

        async def prune() -> None:
            while not stop.is_set():
                await hub.retention.run()
                await asyncio.sleep(0)

        pruner = asyncio.create_task(prune())
        writer = asyncio.create_task(share_many(harness, "sharer", 40, "p"))
        outcomes: list[str] = []
        try:
            for i in range(10):
                agent = f"AI_Node_{i}"
                if i == 9:  # the writer done, the mark moves only a few (presence): it gets in
                    await writer
                # From the mark as seen a moment ago, or a little above it.
                resume = hub.retention.oldest_seq - 1 + (0, 5, 20)[i % 3 if i < 9 else 2]
                await asyncio.sleep(0)  # a round may move the mark past it meanwhile
                call = harness.stub.Connect(metadata=auth(await harness.token(agent)))
                await call.write(pb.ConnectRequest(hello=hello(agent, resume_after_seq=resume)))
                try:
                    first = await asyncio.wait_for(call.read(), WAIT)
                except grpc.aio.AioRpcError as refused:
                    assert refused.code() == grpc.StatusCode.OUT_OF_RANGE, refused
                    outcomes.append("refused")
                    continue
                assert resume > 0 and first.welcome.oldest_seq <= resume + 1
                head = first.welcome.head_seq
                seen: set[int] = set()
                response = first  # the welcome, with what was ready beside it
                while True:  # the replay, up to its marker
                    seen |= {e.seq for e in response.events}
                    if response.HasField("replay_complete"):
                        break
                    response = await asyncio.wait_for(call.read(), WAIT)
                call.cancel()
                await observer.until_seq(head)
                owed = {
                    e.seq
                    for e in observer.events
                    if resume < e.seq <= head and e.sender_id != agent
                }
                assert owed <= seen, f"{agent} after {resume}: lost {sorted(owed - seen)}"
                outcomes.append("replayed")
        finally:
            stop.set()
            await pruner
            await writer
        assert outcomes[-1] == "replayed", outcomes
        await observer.close()


async def test_a_reader_too_far_behind_is_ended_so_the_log_can_be_pruned(url: str) -> None:
    """A trainer that stops reading pins the log only up to the reader-lag limit: then its
    stream ends with RESOURCE_EXHAUSTED (after what it was sent) and pruning goes on."""
    config = make_config(
        url,
        event_retention=0,
        event_retention_max_events=5,
        retention_max_reader_lag=20,
        outbound_queue_size=2,
        replay_page_size=2,  # what it holds in memory: its cursor stays behind
        **QUIET,
    )
    async with running(config) as (hub, harness):
        stalled = await harness.connect("AI_Node_1", hello("AI_Node_1", skip_history=True))
        start = stalled.welcome.head_seq
        [connection] = [c for c in hub.router.connections() if c.agent_id == "AI_Node_1"]
        # Large shares, so the stalled stream's flow-control window and socket fill up.
        sharer = await harness.connect("AI_Node_3", hello("AI_Node_3", skip_history=True))
        code = "int f(void) { return 0; }\n" * 2400  # ~62 KB
        seqs: list[int] = []
        while hub.router.last_published_seq - connection.cursor <= 40:
            receipt = await sharer.receipt(
                await sharer.send(
                    share_code_component=pb.ShareCodeComponent(
                        code_component=code_component(f"c{len(seqs)}", code)
                    )
                )
            )
            seqs.append(receipt.seq)
            assert len(seqs) < 2000, "the stalled reader never fell behind"
        await hub.retention.run()
        assert connection.end_status is not None
        assert connection.end_status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "events behind" in connection.end_status[1]
        await hub.retention.run()  # without its pin
        assert hub.retention.oldest_seq > seqs[-1] - 5 > connection.cursor
        # It gets what was sent, then the status.
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while True:
                await stalled._read_one()
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        got = [e.seq for e in stalled.events]
        assert got == sorted(set(got)) and (not got or got[0] > start)


async def test_hub_client_ended_for_lag_then_refused_starts_afresh_by_itself(url: str) -> None:
    """The whole path with a real client: a HubClient whose user stops consuming falls
    behind, is ended for holding pruning back, reconnects, is refused OUT_OF_RANGE (the
    rounds went on) and starts afresh from now; what it yielded is in order, once each."""
    config = make_config(
        url,
        event_retention=0,
        event_retention_max_events=5,
        retention_max_reader_lag=20,
        outbound_queue_size=2,
        replay_page_size=2,
        **QUIET,
    )
    async with running(config) as (hub, harness):
        client = HubClient(
            target(hub),
            "AI_Node_1",
            await harness.token("AI_Node_1"),
            specialization=pb.SPECIALIZATION_NETWORKING,
            inbound_buffer=2,
            backoff_base=0.05,
        )
        async with client:
            [connection] = [c for c in hub.router.connections() if c.agent_id == "AI_Node_1"]
            sharer = await harness.connect("AI_Node_3", hello("AI_Node_3", skip_history=True))
            code = "int f(void) { return 0; }\n" * 2400  # ~62 KB
            shared = 0
            while hub.router.last_published_seq - connection.cursor <= 40:
                await sharer.receipt(
                    await sharer.send(
                        share_code_component=pb.ShareCodeComponent(
                            code_component=code_component(f"c{shared}", code)
                        )
                    )
                )
                shared += 1
                assert shared < 2000, "the client never fell behind"
            await hub.retention.run()
            assert connection.end_status is not None
            assert connection.end_status[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
            await hub.retention.run()  # the mark moves past what the client has
            got: list[int] = []

            async def consume() -> None:
                async for item in client.events():
                    if isinstance(item, pb.HubEvent):
                        got.append(item.seq)

            consumer = asyncio.create_task(consume())
            try:

                async def restarted() -> None:
                    while client.history_gap is None or not client.history_gap.restart_seq:
                        await hub.retention.run()  # while it reconnects, prune on
                        await asyncio.sleep(0.02)

                await asyncio.wait_for(restarted(), WAIT * 2)
            finally:
                consumer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await consumer
            gap = client.history_gap
            assert gap is not None and gap.oldest_seq > gap.after_seq + 1
            assert gap.restart_seq >= hub.retention.oldest_seq - 1
            assert got == sorted(set(got)) and all(seq <= gap.after_seq for seq in got)
            assert client.reconnects >= 1
            await sharer.close()


async def test_a_resume_below_the_low_water_mark_is_out_of_range_naming_the_oldest_seq(
    url: str,
) -> None:
    config = make_config(url, event_retention=0, event_retention_max_events=5, **QUIET)
    async with running(config) as (hub, harness):
        seqs = await share_many(harness, "AI_Node_3", 20, "p")
        watcher = await harness.connect("AI_Node_4", hello("AI_Node_4", skip_history=True))
        await hub.retention.run()
        oldest = hub.retention.oldest_seq
        assert oldest > seqs[0] + 1

        call = harness.stub.Connect(metadata=auth(await harness.token("AI_Node_1")))
        await call.write(pb.ConnectRequest(hello=hello("AI_Node_1", resume_after_seq=seqs[0])))
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # no Welcome
            await asyncio.wait_for(call.read(), WAIT)
        assert refused.value.code() == grpc.StatusCode.OUT_OF_RANGE
        details = await call.details()
        assert f"the oldest seq still held is {oldest}" in details, details
        assert (OLDEST_SEQ_KEY, str(oldest)) in tuple(await call.trailing_metadata())

        # A resume from the mark is not refused: it replays from the oldest held.
        fine = await harness.connect("AI_Node_1", hello("AI_Node_1", resume_after_seq=oldest - 1))
        assert fine.welcome.oldest_seq == oldest
        await fine.until_seq(seqs[-1])
        assert fine.events[0].seq == oldest
        # The refusal made no presence change: the watcher heard of AI_Node_1 once, online.
        await watcher.joined("AI_Node_1")
        about_it = [
            ("online" if any(a.agent_id == "AI_Node_1" for a in u.online) else "offline")
            for u in watcher.presence
            if "AI_Node_1" in u.offline or any(a.agent_id == "AI_Node_1" for a in u.online)
        ]
        assert about_it == ["online"]
        await fine.close()
        await watcher.close()


async def test_hub_client_restarts_from_now_after_out_of_range_and_says_what_it_skipped(
    url: str,
) -> None:
    config = make_config(url, event_retention=0, event_retention_max_events=5, **QUIET)
    async with running(config) as (hub, harness):
        seqs = await share_many(harness, "AI_Node_3", 20, "p")
        await hub.retention.run()
        oldest = hub.retention.oldest_seq
        client = HubClient(
            target(hub),
            "AI_Node_1",
            await harness.token("AI_Node_1"),
            specialization=pb.SPECIALIZATION_NETWORKING,
            resume_after_seq=seqs[0],  # a trainer back after the log moved on
        )
        async with client:
            gap = client.history_gap
            assert gap is not None
            assert (gap.after_seq, gap.oldest_seq) == (seqs[0], oldest)
            assert client.welcome is not None
            assert gap.restart_seq == client.welcome.head_seq == client.last_seq >= seqs[-1]
            await asyncio.wait_for(client.replayed.wait(), WAIT)
            # Live from there: a new share arrives, nothing older does.
            [new] = await share_many(harness, "AI_Node_3", 1, "live")

            async def first_event() -> pb.HubEvent:
                async for item in client.events():
                    if isinstance(item, pb.HubEvent):
                        return item
                raise AssertionError("the stream ended")

            event = await asyncio.wait_for(first_event(), WAIT)
            assert event.seq > gap.restart_seq
            assert event.HasField("agent_joined") or event.seq == new


async def test_an_old_message_id_is_new_again_once_the_ledger_forgot_it(url: str) -> None:
    """The idempotency window: a resend within it is a duplicate, one after it a new message
    (the README's guarantees say so). HubConfig takes a window the settings would refuse."""
    config = make_config(url, event_retention=0, ledger_retention=0.05, **QUIET)
    async with running(config) as (hub, harness):
        sharer = await harness.connect("AI_Node_1")
        body = pb.SharePattern(pattern=pattern("again"))
        first = await sharer.receipt(await sharer.send("m1", share_pattern=body))
        del sharer.receipts["m1"]  # each answer to m1 in its turn
        again = await sharer.receipt(await sharer.send("m1", share_pattern=body))
        del sharer.receipts["m1"]
        assert again.duplicate and again.seq == first.seq

        async def forgotten() -> None:
            while hub.retention.ledger_pruned == 0:
                await hub.retention.run()
                await asyncio.sleep(0.05)  # a poll: the window's age must pass

        await asyncio.wait_for(forgotten(), WAIT)
        later = await sharer.receipt(await sharer.send("m1", share_pattern=body))
        assert not later.duplicate and later.seq > first.seq
        assert later.resource_id != first.resource_id, "stored again, as a new message"
        stats = await harness.query("GetHubStats", pb.GetHubStatsRequest())
        assert stats.idempotency_window_seconds == pytest.approx(0.05)
        await sharer.close()


async def test_a_fresh_hub_client_starts_from_now_unless_asked_for_the_beginning(
    url: str,
) -> None:
    """The SDK's default for a fresh agent is from now; `skip_history=False` starts from the
    oldest event held, and names what was pruned before it."""
    config = make_config(url, event_retention=0, event_retention_max_events=5, **QUIET)
    async with running(config) as (hub, harness):
        seqs = await share_many(harness, "AI_Node_3", 12, "p")
        await hub.retention.run()
        oldest = hub.retention.oldest_seq
        networking = pb.SPECIALIZATION_NETWORKING
        async with HubClient(
            target(hub), "AI_Node_1", await harness.token("AI_Node_1"), specialization=networking
        ) as fresh:
            await asyncio.wait_for(fresh.replayed.wait(), WAIT)
            assert fresh.last_seq >= seqs[-1] and fresh.history_gap is None
            assert fresh.replay_seq == fresh.last_seq, "nothing replayed"
        async with HubClient(
            target(hub),
            "AI_Node_2",
            await harness.token("AI_Node_2"),
            specialization=networking,
            skip_history=False,
        ) as beginning:
            await asyncio.wait_for(beginning.replayed.wait(), WAIT)
            gap = beginning.history_gap
            assert gap is not None and (gap.after_seq, gap.oldest_seq) == (0, oldest)
            replayed: list[int] = []
            async for item in beginning.events():
                if isinstance(item, pb.HubEvent):
                    replayed.append(item.seq)
                    if item.seq >= seqs[-1]:
                        break
            assert replayed[0] == oldest and replayed == sorted(set(replayed))


async def test_the_retention_loop_prunes_by_age_by_itself(url: str) -> None:
    """The hub's own timer, by age alone: old events go, the newest stays."""
    config = make_config(
        url, event_retention=0.05, event_retention_max_events=0, retention_interval=0.05
    )
    async with running(config) as (hub, harness):
        seqs = await share_many(harness, "AI_Node_3", 10, "p")

        async def pruned() -> None:
            # The hub's timer signals nothing to wait on: poll what the store holds.
            while await hub.store.oldest_seq() <= seqs[-2]:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        await asyncio.wait_for(pruned(), WAIT)
        assert hub.retention.oldest_seq > seqs[-2]
        assert await hub.store.head_seq() == hub.router.last_published_seq, "the newest stays"


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"KERNELHUB_LEDGER_RETENTION": "30s"}, "at least 60 s"),
        ({"KERNELHUB_EVENT_RETENTION": "-1"}, "not negative"),
        ({"KERNELHUB_EVENT_RETENTION": "forever"}, "invalid duration"),
        ({"KERNELHUB_EVENT_RETENTION_MAX_EVENTS": "-5"}, "greater than or equal to 0"),
        ({"KERNELHUB_RETENTION_INTERVAL": "0"}, "greater than 0"),
        ({"KERNELHUB_RETENTION_BATCH_SIZE": "0"}, "greater than 0"),
        ({"KERNELHUB_RETENTION_BATCH_SIZE": "200000"}, "less than or equal to 100000"),
    ],
)
def test_bad_retention_settings_are_refused_naming_the_setting(
    env: dict[str, str], problem: str
) -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings(env)
    [name] = env
    assert name in str(refused.value) and problem in str(refused.value), str(refused.value)


def test_retention_settings_take_durations_and_zero_for_forever() -> None:
    settings = load_settings(
        {
            "KERNELHUB_EVENT_RETENTION": "30d",
            "KERNELHUB_LEDGER_RETENTION": "0",
            "KERNELHUB_EVENT_RETENTION_MAX_EVENTS": "0",
        }
    ).settings
    assert settings.event_retention == 30 * 86400
    assert settings.ledger_retention == 0 and settings.event_retention_max_events == 0
    defaults = load_settings({}).settings
    assert defaults.event_retention == defaults.ledger_retention == 7 * 86400


async def test_db_check_finds_a_pruned_log_healthy(tmp_path: Path) -> None:
    """A log that starts above 1, and artifacts whose events were pruned, are no problems."""
    db = tmp_path / "hub.db"
    config = make_config(
        f"sqlite:///{db}", event_retention=0, event_retention_max_events=3, **QUIET
    )
    async with running(config) as (hub, harness):
        await share_many(harness, "AI_Node_3", 10, "p")
        await hub.retention.run()
        assert hub.retention.oldest_seq > 5
    code, out, err = await db_cli("check", "--db", str(db))
    assert code == 0 and out.startswith("ok: no problems found"), out + err


async def test_a_filtered_stream_s_cursor_reaches_the_head_it_read_to(url: str) -> None:
    """A stream whose filter matched nothing in the log still ends its read at the head: it
    pins no old seq and resumes from there, not from its last match (which retention may
    prune while nothing it wants was)."""
    config = make_config(url, **QUIET)
    async with running(config) as (hub, harness):
        seqs = await share_many(harness, "AI_Node_3", 10, "p")
        quiet = pb.Subscription(contributors=["nobody"])
        trainer = await harness.connect("AI_Node_2", hello("AI_Node_2", subscription=quiet))
        assert await trainer.until_replayed() >= seqs[-1]
        connection = hub.router.connection("AI_Node_2")
        assert connection is not None and connection.cursor >= seqs[-1]
        assert trainer.events == [], "the filter let nothing through"
        await trainer.close()
