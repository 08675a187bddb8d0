"""Subscriptions over real streams: a filtered trainer gets exactly the events it asked for
(and those addressed to it), live and in the replay after a reconnect, in seq order; a
Subscribe switches at the seq its receipt names; bad filters are refused naming the field."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.complementarity import complements
from hub_service.testing import TestHub
from trainer_service.sdk.client import HubClient
from trainer_service.simulation.trainer import interests

from .conftest import EOF, WAIT, HubHarness, RawTrainer, auth, hello, make_config, pattern

NET, SEC, FS = (
    pb.SPECIALIZATION_NETWORKING,
    pb.SPECIALIZATION_SECURITY,
    pb.SPECIALIZATION_FILE_SYSTEM,
)


def pattern_of(spec: int, pattern_id: str) -> pb.SharePattern:
    content = pattern(pattern_id)
    content.specialization = spec  # type: ignore[assignment]
    return pb.SharePattern(pattern=content)


async def share(trainer: RawTrainer, spec: int, pattern_id: str) -> int:
    """Shares a pattern of `spec`; its seq."""
    return (
        await trainer.receipt(await trainer.send(share_pattern=pattern_of(spec, pattern_id)))
    ).seq


def watching(agent_id: str, resume: int = 0, **subscription: Any) -> pb.Hello:
    return hello(
        agent_id,
        FS,
        resume_after_seq=resume,
        subscription=pb.Subscription(**subscription),
    )


async def test_a_filtered_subscriber_gets_exactly_what_matches_live_and_after_reconnect(
    harness: HubHarness,
) -> None:
    wanted: dict[str, Any] = {"event_kinds": [pb.EVENT_KIND_ARTIFACTS], "specializations": [SEC]}
    watcher = await harness.connect("watcher", watching("watcher", **wanted))
    assert watcher.welcome.roster_size == 0  # not following presence
    sec = await harness.connect("sec", hello("sec", SEC))
    net = await harness.connect("net", hello("net", NET))

    async def traffic(tag: str) -> list[int]:
        """Shares and requests, some matching; the seqs the watcher is entitled to."""
        expected = [await share(sec, NET, f"{tag}1")]  # contributor is security: matches
        await share(net, NET, f"{tag}2")  # neither: no
        expected.append(await share(net, SEC, f"{tag}3"))  # content is security: matches
        not_wanted = await net.send(
            request_feature=pb.RequestFeature(
                feature="not_known",
                requirements=pb.FeatureRequirements(
                    performance=pb.PERFORMANCE_LEVEL_LOW,
                    priority=pb.PRIORITY_LOW,
                    compatibility=SEC,
                ),
            )
        )
        await net.receipt(not_wanted)  # a broadcast feature request: not subscribed to
        # Addressed to the watcher: comes whatever the filter says.
        proposal = await net.send(
            propose_collaboration=pb.ProposeCollaboration(
                target_agent_id="watcher", type=pb.COLLABORATION_TYPE_CODE_REVIEW
            )
        )
        expected.append((await net.receipt(proposal)).seq)
        expected.append(await share(sec, SEC, f"{tag}4"))  # the last: a marker
        return expected

    live = await traffic("a")
    await watcher.until_seq(live[-1])
    assert [e.seq for e in watcher.events] == live
    assert watcher.presence == []

    await watcher.close()
    missed = await traffic("b")
    back = await harness.connect("watcher", watching("watcher", resume=live[-1], **wanted))
    await back.until_seq(missed[-1])
    assert [e.seq for e in back.events] == missed
    kinds = [e.WhichOneof("body") for e in back.events]
    assert kinds == [
        "artifact_shared",
        "artifact_shared",
        "collaboration_updated",
        "artifact_shared",
    ]


async def test_a_sparse_replay_reads_the_log_in_bounded_steps_and_misses_nothing(
    store_url: str,
) -> None:
    """With each read of the log bounded to 4 seqs, a replay from the beginning whose filter
    matches one event in five reads on past the stretches where nothing matches (each read
    cut short by the bound), and gets every match once, in order, then its end marker
    (test_replay_bound.py checks the interleavings a real hub cannot be made to show)."""
    config = make_config(store_url, replay_scan_seqs=4)
    async with TestHub.in_process(config) as test_hub:
        harness = HubHarness(test_hub.server)
        try:
            sharers = [
                await harness.connect(f"sharer{i}", hello(f"sharer{i}", NET)) for i in range(5)
            ]
            wanted = []
            for round_ in range(6):
                for i, sharer in enumerate(sharers):
                    seq = await share(sharer, NET, f"p{round_}_{i}")
                    if i == 3:
                        wanted.append(seq)
            head = seq
            reader = await harness.connect("reader", watching("reader", contributors=["sharer3"]))
            assert await reader.until_replayed() == head
            assert [e.seq for e in reader.events] == wanted
            assert {e.sender_id for e in reader.events} == {"sharer3"}
        finally:
            await harness.close()


async def _switch_while_sharing(harness: HubHarness, watcher: RawTrainer) -> None:
    """Two sharers alternate while the watcher switches from security to networking; every
    event at or below the receipt's seq is chosen by the old filter, every later one by
    the new, with nothing lost or doubled."""
    sec = await harness.connect("sec", hello("sec", SEC))
    net = await harness.connect("net", hello("net", NET))
    spec_of: dict[int, int] = {}
    switched = asyncio.Event()
    under_way = asyncio.Event()

    async def produce(trainer: RawTrainer, spec: int) -> None:
        for i in range(30):
            spec_of[await share(trainer, spec, f"{trainer.agent_id}{i}")] = spec
            if len(spec_of) >= 10:
                under_way.set()
            if i == 10:
                await switched.wait()  # some shares after the switch, whatever the timing

    producers = [asyncio.create_task(produce(t, s)) for t, s in ((sec, SEC), (net, NET))]
    await asyncio.wait_for(under_way.wait(), WAIT)
    new = pb.Subscription(specializations=[NET])
    receipt = await watcher.receipt(await watcher.send(subscribe=pb.Subscribe(subscription=new)))
    switched.set()
    await asyncio.wait_for(asyncio.gather(*producers), WAIT)
    at = receipt.seq
    assert receipt.resource_id == "" and not receipt.duplicate
    assert min(spec_of) <= at < max(spec_of)
    expected = sorted(s for s, spec in spec_of.items() if (spec == SEC if s <= at else spec == NET))
    # The last networking share is after the switch: once it is here, all is.
    await watcher.until_seq(max(s for s, spec in spec_of.items() if spec == NET))
    assert [e.seq for e in watcher.events] == expected


async def test_subscribe_on_a_live_stream_switches_at_the_seq_it_names(
    harness: HubHarness,
) -> None:
    watcher = await harness.connect("watcher", watching("watcher", specializations=[SEC]))
    await _switch_while_sharing(harness, watcher)


async def test_subscribe_during_the_replay_switches_at_the_seq_it_names(
    harness: HubHarness,
) -> None:
    """History first, so the switch may come while the watcher still reads the log."""
    # A contributor of neither specialization: the content alone decides.
    old = await harness.connect("old", hello("old", pb.SPECIALIZATION_PERFORMANCE))
    sent = [
        await old.send(share_pattern=pattern_of(SEC if i % 2 else NET, f"h{i}")) for i in range(200)
    ]
    spec_by_seq = {(await old.receipt(m)).seq: (SEC if i % 2 else NET) for i, m in enumerate(sent)}
    watcher = await harness.connect("watcher", watching("watcher", specializations=[SEC]))
    new = pb.Subscription(specializations=[NET])
    receipt = await watcher.receipt(await watcher.send(subscribe=pb.Subscribe(subscription=new)))
    at = receipt.seq
    sec = await harness.connect("sec", hello("sec", SEC))
    net = await harness.connect("net", hello("net", NET))
    after = {await share(sec, SEC, "x1"): SEC, await share(net, NET, "x2"): NET}
    await watcher.until_seq(max(after))
    expected = sorted(
        s
        for s, spec in {**spec_by_seq, **after}.items()
        if (spec == SEC if s <= at else spec == NET)
    )
    assert [e.seq for e in watcher.events] == expected


@pytest.mark.parametrize(
    ("subscription", "field"),
    [
        (pb.Subscription(event_kinds=[7]), "hello.subscription.event_kinds[0]"),  # type: ignore[list-item]
        (pb.Subscription(event_kinds=[0]), "hello.subscription.event_kinds[0]"),  # type: ignore[list-item]
        (
            pb.Subscription(specializations=list(range(1, 9)) * 2),  # type: ignore[arg-type]
            "hello.subscription.specializations",
        ),
        (pb.Subscription(contributors=["bad id"]), "hello.subscription.contributors[0]"),
    ],
)
async def test_a_bad_subscription_in_hello_ends_the_call_naming_the_field(
    harness: HubHarness, subscription: pb.Subscription, field: str
) -> None:
    call = harness.stub.Connect(metadata=auth(await harness.token("AI_Node_1")))
    bad = hello("AI_Node_1", subscription=subscription)
    await call.write(pb.ConnectRequest(message_id="hello", hello=bad))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        while (await asyncio.wait_for(call.read(), WAIT)) is not EOF:
            pass
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (refused.value.details() or "")


async def test_a_bad_subscribe_is_refused_and_the_old_subscription_stays(
    harness: HubHarness,
) -> None:
    watcher = await harness.connect("watcher", watching("watcher", specializations=[SEC]))
    bad = pb.Subscribe(subscription=pb.Subscription(artifact_kinds=[9]))  # type: ignore[list-item]
    error = await watcher.error(await watcher.send(subscribe=bad))
    assert error.code_name == "INVALID_ARGUMENT"
    assert [v.field for v in error.field_violations] == ["subscribe.subscription.artifact_kinds[0]"]
    assert "9 is not a known ArtifactKind" in error.message
    sharer = await harness.connect("sharer", hello("sharer", NET))
    skipped = await share(sharer, NET, "n1")
    kept = await share(sharer, SEC, "s1")
    await watcher.until_seq(kept)
    assert [e.seq for e in watcher.events] == [kept] and skipped < kept


# --- HubClient and the reference trainer -------------------------------------------------


async def test_hub_client_subscribes_switches_live_and_keeps_the_roster(
    harness: HubHarness,
) -> None:
    address = f"127.0.0.1:{harness.server.port}"
    sharer = await harness.connect("sharer", hello("sharer", pb.SPECIALIZATION_PERFORMANCE))
    async with HubClient(
        address,
        "watcher",
        await harness.token("watcher"),
        specialization=FS,
        subscription=pb.Subscription(specializations=[SEC]),
    ) as client:
        await asyncio.wait_for(client.roster_complete.wait(), WAIT)
        assert list(client.online) == ["sharer"]
        skipped = await share(sharer, NET, "n1")
        kept = await share(sharer, SEC, "s1")
        at = await client.subscribe(pb.Subscription(specializations=[NET]))
        assert at >= kept
        assert client.subscription == pb.Subscription(specializations=[NET])
        after = [await share(sharer, SEC, "s2"), await share(sharer, NET, "n2")]
        seen: list[int] = []
        async with asyncio.timeout(WAIT):
            async for item in client.events():
                if isinstance(item, pb.HubEvent):
                    seen.append(item.seq)
                    if item.seq >= after[-1]:
                        break
        assert seen == [kept, after[1]] and skipped not in seen
    # The reference trainer's interests: its own specialization and its complements.
    wanted = interests(pb.SPECIALIZATION_NETWORKING)
    assert list(wanted.specializations) == [
        pb.SPECIALIZATION_NETWORKING,
        *complements(pb.SPECIALIZATION_NETWORKING),
    ]
    assert pb.SPECIALIZATION_SECURITY in wanted.specializations  # networking-security 0.9
    assert list(wanted.event_kinds) == []  # every kind, presence too
