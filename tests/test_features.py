"""Feature requests are routed by capability, delivered to the requester only, and replayed."""

from __future__ import annotations

import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.collaboration import Policy
from hub_service.config import HubConfig
from hub_service.features import FEATURE_CAPABILITIES, capable_agents

from .conftest import HubHarness, RawTrainer, hello, make_config, os_component, pattern

ALREADY_EXISTS, PERMISSION_DENIED = 6, 7
NOT_FOUND, RESOURCE_EXHAUSTED, FAILED_PRECONDITION = 5, 8, 9


@pytest.fixture
def hub_config(request: pytest.FixtureRequest, database_url: str) -> HubConfig:
    """Default policy; a test passes Policy fields with an indirect parameter."""
    return make_config(database_url, policy=Policy(**getattr(request, "param", {})))


REQUIREMENTS = pb.FeatureRequirements(
    performance=pb.PERFORMANCE_LEVEL_HIGH,
    compatibility=pb.SPECIALIZATION_NETWORKING,
    priority=pb.PRIORITY_MEDIUM,
)


async def requester(harness: HubHarness) -> RawTrainer:
    return await harness.connect(
        "AI_Node_1",
        hello("AI_Node_1", pb.SPECIALIZATION_NETWORKING, capabilities=["network_protocols"]),
    )


async def memory_agent(harness: HubHarness, **kw: int) -> RawTrainer:
    return await harness.connect(
        "AI_Node_2",
        hello(
            "AI_Node_2",
            pb.SPECIALIZATION_PROCESS_MANAGER,
            capabilities=["memory_management", "process_scheduling"],
            **kw,
        ),
    )


async def file_agent(harness: HubHarness) -> RawTrainer:
    return await harness.connect(
        "AI_Node_3",
        hello("AI_Node_3", pb.SPECIALIZATION_FILE_SYSTEM, capabilities=["file_operations"]),
    )


async def request(
    trainer: RawTrainer, feature: str, description: str = "fast please"
) -> pb.Receipt:
    mid = await trainer.send(
        request_feature=pb.RequestFeature(
            feature=feature, requirements=REQUIREMENTS, description=description
        )
    )
    receipt = await trainer.receipt(mid)
    assert receipt.resource_id.startswith("feat_") and receipt.seq > 0
    return receipt


async def deliver(trainer: RawTrainer, request_id: str, name: str = "memory_allocator") -> str:
    return await trainer.send(
        deliver_feature=pb.DeliverFeature(request_id=request_id, component=os_component(name))
    )


async def barrier(sender: RawTrainer, *readers: RawTrainer) -> None:
    """A later broadcast from `sender`: once readers have it, they have everything before it."""
    receipt = await sender.receipt(
        await sender.send(share_pattern=pb.SharePattern(pattern=pattern()))
    )
    for reader in readers:
        await reader.until_seq(receipt.seq)


def kinds(trainer: RawTrainer, kind: str) -> list[pb.HubEvent]:
    return [e for e in trainer.events if e.WhichOneof("body") == kind]


async def test_request_goes_only_to_capable_agents(harness: HubHarness) -> None:
    r = await requester(harness)
    m = await memory_agent(harness)
    f = await file_agent(harness)
    receipt = await request(r, "memory_allocator")

    event = await m.event("feature_requested", request__request_id=receipt.resource_id)
    assert event.seq == receipt.seq and event.sender_id == "AI_Node_1"
    info = event.feature_requested.request
    assert info.requester_id == "AI_Node_1"
    assert info.feature == "memory_allocator"
    assert info.requirements == REQUIREMENTS
    assert info.description == "fast please"
    assert list(info.routed_to) == ["AI_Node_2"]
    assert info.delivery_count == 0

    await barrier(m, f, r)
    assert kinds(f, "feature_requested") == []
    assert kinds(r, "feature_requested") == []  # never back to the requester
    listed = await harness.query("ListFeatureRequests", pb.ListFeatureRequestsRequest())
    assert [(x.request_id, list(x.routed_to)) for x in listed.feature_requests] == [
        (receipt.resource_id, ["AI_Node_2"])
    ]


async def test_capable_requester_is_not_routed_its_own_request(harness: HubHarness) -> None:
    r = await requester(harness)  # announces network_protocols
    peer = await harness.connect(
        "AI_Node_4", hello("AI_Node_4", pb.SPECIALIZATION_SECURITY, capabilities=["communication"])
    )
    m = await memory_agent(harness)
    receipt = await request(r, "network_stack")
    event = await peer.event("feature_requested", request__request_id=receipt.resource_id)
    assert list(event.feature_requested.request.routed_to) == ["AI_Node_4"]
    await barrier(peer, r, m)
    assert kinds(r, "feature_requested") == [] and kinds(m, "feature_requested") == []


@pytest.mark.parametrize(
    "feature", ["quantum_teleporter", "audio_mixer"], ids=["unknown", "nobody-capable"]
)
async def test_unroutable_request_goes_to_every_other_agent(
    harness: HubHarness, feature: str
) -> None:
    r = await requester(harness)
    m = await memory_agent(harness)
    f = await file_agent(harness)
    receipt = await request(r, feature)
    for other in (m, f):
        event = await other.event("feature_requested", request__request_id=receipt.resource_id)
        assert list(event.feature_requested.request.routed_to) == []
        assert event.feature_requested.request.feature == feature
    await barrier(m, r)
    assert kinds(r, "feature_requested") == []
    listed = await harness.query("ListFeatureRequests", pb.ListFeatureRequestsRequest())
    assert list(listed.feature_requests[0].routed_to) == []


async def test_delivery_is_stored_and_sent_to_the_requester_only(harness: HubHarness) -> None:
    r = await requester(harness)
    m = await memory_agent(harness)
    f = await file_agent(harness)
    request_id = (await request(r, "memory_allocator")).resource_id

    receipt = await m.receipt(await deliver(m, request_id))
    artifact_id = receipt.resource_id
    assert artifact_id.startswith("art_") and receipt.seq > 0

    event = await r.event("feature_delivered", request_id=request_id)
    assert event.seq == receipt.seq and event.sender_id == "AI_Node_2"
    delivered = event.feature_delivered.artifact
    assert delivered.artifact_id == artifact_id
    assert delivered.kind == pb.ARTIFACT_KIND_OS_COMPONENT
    assert delivered.contributor_id == "AI_Node_2"
    assert delivered.os_component == os_component("memory_allocator")

    stored = await harness.query("GetArtifact", pb.GetArtifactRequest(artifact_id=artifact_id))
    assert stored.artifact == delivered
    listed = await harness.query(
        "ListArtifacts", pb.ListArtifactsRequest(kind=pb.ARTIFACT_KIND_OS_COMPONENT)
    )
    assert [a.artifact_id for a in listed.artifacts] == [artifact_id]

    await barrier(r, m, f)
    assert kinds(f, "feature_delivered") == [] and kinds(m, "feature_delivered") == []
    # A delivery is not a broadcast share (the barrier's pattern is the only share F saw).
    assert [e.artifact_shared.kind for e in kinds(f, "artifact_shared")] == [
        pb.ARTIFACT_KIND_PATTERN
    ]

    requests = await harness.query(
        "ListFeatureRequests", pb.ListFeatureRequestsRequest(requester_id="AI_Node_1")
    )
    assert [(x.request_id, x.delivery_count) for x in requests.feature_requests] == [
        (request_id, 1)
    ]
    stats = await harness.query("GetHubStats", pb.GetHubStatsRequest())
    assert stats.feature_delivery_count == 1
    assert stats.knowledge_base.feature_request_count == 1


async def test_each_delivery_counts(harness: HubHarness) -> None:
    r = await requester(harness)
    m = await memory_agent(harness)
    f = await file_agent(harness)
    request_id = (await request(r, "quantum_teleporter")).resource_id  # nobody fits: broadcast
    first = await m.receipt(await deliver(m, request_id))
    second = await f.receipt(await deliver(f, request_id, "slab_allocator"))
    assert first.resource_id != second.resource_id
    await r.until_seq(second.seq)
    assert [e.feature_delivered.artifact.artifact_id for e in kinds(r, "feature_delivered")] == [
        first.resource_id,
        second.resource_id,
    ]
    requests = await harness.query("ListFeatureRequests", pb.ListFeatureRequestsRequest())
    assert requests.feature_requests[0].delivery_count == 2


async def test_only_the_agents_a_request_was_routed_to_may_deliver_it(
    harness: HubHarness,
) -> None:
    r = await requester(harness)
    m = await memory_agent(harness)
    f = await file_agent(harness)
    request_id = (await request(r, "memory_allocator")).resource_id  # routed to AI_Node_2 only
    error = await f.error(await deliver(f, request_id))
    assert (error.code, error.code_name) == (PERMISSION_DENIED, "PERMISSION_DENIED")
    assert request_id in error.message and "AI_Node_2" in error.message
    # Nothing was stored, counted or sent; the one it was routed to still may deliver.
    delivered = await m.receipt(await deliver(m, request_id))
    event = await r.event("feature_delivered", request_id=request_id)
    assert event.seq == delivered.seq
    assert [e.sender_id for e in kinds(r, "feature_delivered")] == ["AI_Node_2"]
    requests = await harness.query("ListFeatureRequests", pb.ListFeatureRequestsRequest())
    assert requests.feature_requests[0].delivery_count == 1
    listed = await harness.query("ListArtifacts", pb.ListArtifactsRequest())
    assert [a.artifact_id for a in listed.artifacts] == [delivered.resource_id]


async def test_an_agent_delivers_a_request_at_most_once(harness: HubHarness) -> None:
    r = await requester(harness)
    m = await memory_agent(harness)
    request_id = (await request(r, "memory_allocator")).resource_id
    first = await m.receipt(await deliver(m, request_id))
    error = await m.error(await deliver(m, request_id, "slab_allocator"))
    assert (error.code, error.code_name) == (ALREADY_EXISTS, "ALREADY_EXISTS")
    assert request_id in error.message and first.resource_id in error.message
    await barrier(m, r)
    assert len(kinds(r, "feature_delivered")) == 1
    requests = await harness.query("ListFeatureRequests", pb.ListFeatureRequestsRequest())
    assert requests.feature_requests[0].delivery_count == 1


@pytest.mark.parametrize("hub_config", [{"max_deliveries_per_request": 1}], indirect=True)
async def test_deliveries_per_request_are_limited(harness: HubHarness) -> None:
    r = await requester(harness)
    m = await memory_agent(harness)
    f = await file_agent(harness)
    request_id = (await request(r, "quantum_teleporter")).resource_id
    await m.receipt(await deliver(m, request_id))
    error = await f.error(await deliver(f, request_id))
    assert (error.code, error.code_name) == (RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED")
    assert request_id in error.message and "1 deliveries" in error.message
    requests = await harness.query("ListFeatureRequests", pb.ListFeatureRequestsRequest())
    assert requests.feature_requests[0].delivery_count == 1


async def test_delivering_your_own_request_is_failed_precondition(harness: HubHarness) -> None:
    r = await requester(harness)
    request_id = (await request(r, "memory_allocator")).resource_id
    error = await r.error(await deliver(r, request_id))
    assert (error.code, error.code_name) == (FAILED_PRECONDITION, "FAILED_PRECONDITION")
    assert request_id in error.message and "your own" in error.message
    # The stream still works, and nothing was stored or counted.
    await request(r, "file_cache")
    requests = await harness.query("ListFeatureRequests", pb.ListFeatureRequestsRequest())
    assert [x.delivery_count for x in requests.feature_requests] == [0, 0]
    listed = await harness.query("ListArtifacts", pb.ListArtifactsRequest())
    assert list(listed.artifacts) == []


async def test_delivering_an_unknown_request_is_not_found(harness: HubHarness) -> None:
    m = await memory_agent(harness)
    error = await m.error(await deliver(m, "feat_does_not_exist"))
    assert (error.code, error.code_name) == (NOT_FOUND, "NOT_FOUND")
    assert "feat_does_not_exist" in error.message
    share = await m.receipt(await m.send(share_pattern=pb.SharePattern(pattern=pattern())))
    assert share.seq > 0
    listed = await harness.query("ListArtifacts", pb.ListArtifactsRequest())
    assert [a.artifact_id for a in listed.artifacts] == [share.resource_id]
    stats = await harness.query("GetHubStats", pb.GetHubStatsRequest())
    assert stats.feature_delivery_count == 0


async def test_offline_capable_agent_gets_the_request_on_reconnect(harness: HubHarness) -> None:
    m = await memory_agent(harness)
    r = await requester(harness)
    # Presence is not in the log: the memory agent has seen no event, and resumes after
    # the log's head when it left.
    await m.joined("AI_Node_1")
    await m.close()
    await r.left("AI_Node_2")
    head = (await harness.query("GetHubStats", pb.GetHubStatsRequest())).head_seq
    f = await file_agent(harness)

    receipt = await request(r, "memory_allocator")
    back = await memory_agent(harness, resume_after_seq=head)
    event = await back.event("feature_requested", request__request_id=receipt.resource_id)
    assert event.seq == receipt.seq
    assert list(event.feature_requested.request.routed_to) == ["AI_Node_2"]
    # The online agent that cannot build it was not sent it.
    await barrier(back, f)
    assert kinds(f, "feature_requested") == []
    # The reconnected agent can deliver it.
    delivery = await back.receipt(await deliver(back, receipt.resource_id))
    await r.event("feature_delivered", request_id=receipt.resource_id)
    assert delivery.resource_id.startswith("art_")


# --- the routing table itself ----------------------------------------------------


def test_capable_agents_matches_any_capability_sorted_without_requester() -> None:
    agents = [
        ("zeta", ["storage_management"]),
        ("alpha", ["file_operations", "x"]),
        ("me", ["file_operations"]),
        ("beta", ["memory_management"]),
    ]
    assert capable_agents("file_cache", "me", agents) == ["alpha", "zeta"]
    assert capable_agents("memory_allocator", "me", agents) == ["beta"]
    assert capable_agents("graphics_driver", "me", agents) == []
    assert capable_agents("not_a_feature", "me", agents) == []


@pytest.mark.parametrize("feature", sorted(FEATURE_CAPABILITIES))
def test_every_known_feature_routes_to_each_of_its_capabilities(feature: str) -> None:
    capabilities = FEATURE_CAPABILITIES[feature]
    assert capabilities
    agents = [(f"agent_{c}", [c]) for c in sorted(capabilities)] + [("other", ["unrelated"])]
    assert capable_agents(feature, "other", agents) == sorted(f"agent_{c}" for c in capabilities)
