"""What the load, the baselines and the orchestrator share: channels, messages, helpers."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc

from generated.kernelhub.v1 import hub_pb2 as pb
from generated.kernelhub.v1 import hub_pb2_grpc

if TYPE_CHECKING:
    from generated.kernelhub.v1.hub_pb2_grpc import HubServiceAsyncStub

# All benchmark traffic stays on the loopback interface.
LOOPBACK = "127.0.0.1"
EOF: Any = grpc.aio.EOF
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# A stream's window of unanswered messages: the hub reads at most 256 ahead of its receipts.
SEND_WINDOW = 256
# Events per ConnectResponse, as the hub coalesces them.
EVENTS_PER_RESPONSE = 64

# grpc.aio.StreamStreamCall; grpcio ships no type hints.
Call: TypeAlias = Any


def channel_options(local_pool: bool = True) -> list[tuple[str, int | str]]:
    """Client channel options: no BDP probing (a ping per data burst costs more than it
    gains on loopback), a stream window that admits a whole response, as `HubClient`'s
    does, and, with `local_pool`, a TCP connection of its own per channel (grpc otherwise
    shares one connection between channels with the same arguments)."""
    options: list[tuple[str, int | str]] = [
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.primary_user_agent", "kernelhub-bench"),
    ]
    if local_pool:
        options.append(("grpc.use_local_subchannel_pool", 1))
    return options


def server_options() -> list[tuple[str, int | str]]:
    """The baselines' server options: the hub's transport settings, nothing else."""
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.http2.bdp_probe", 0),
    ]


def make_channel(target: str) -> grpc.aio.Channel:
    host = target.rsplit(":", 1)[0]
    if host not in (LOOPBACK, "localhost", "[::1]"):
        raise ValueError(f"benchmark traffic stays on loopback; refusing target {target}")
    return grpc.aio.insecure_channel(target, options=channel_options())


def async_stub(channel: grpc.aio.Channel) -> HubServiceAsyncStub:
    """The generated stub, typed as its aio variant."""
    return cast("HubServiceAsyncStub", hub_pb2_grpc.HubServiceStub(channel))


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def hello(agent_id: str, resume_after_seq: int = 0) -> pb.ConnectRequest:
    return pb.ConnectRequest(
        message_id="hello",
        hello=pb.Hello(
            agent_id=agent_id,
            specialization=pb.SPECIALIZATION_NETWORKING,
            capabilities=["network_protocols", "communication"],
            version="bench",
            resume_after_seq=resume_after_seq,
        ),
    )


def pattern(pattern_id: str, pattern_type: str = "networking_pattern") -> pb.Pattern:
    """A valid pattern of about 100 bytes serialized, like a small real one."""
    return pb.Pattern(
        pattern_id=pattern_id,
        pattern_type=pattern_type,
        specialization=pb.SPECIALIZATION_NETWORKING,
        complexity=0.5,
        reusability=0.6,
        performance_impact=0.3,
        confidence=0.9,
    )


def share(
    message_id: str,
    pattern_id: str,
    specialization: pb.Specialization.ValueType = pb.SPECIALIZATION_NETWORKING,
) -> pb.ConnectRequest:
    """A valid share_pattern of `pattern(pattern_id)` (of `specialization`)."""
    content = pattern(pattern_id)
    content.specialization = specialization
    return pb.ConnectRequest(message_id=message_id, share_pattern=pb.SharePattern(pattern=content))


def read_tokens(path: Path) -> list[tuple[str, str]]:
    """`agent token` lines, as `kernelhub-hub token issue --out` writes them."""
    pairs = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            pairs.append((parts[0], parts[1]))
    return pairs


def fake_tokens(count: int) -> list[tuple[str, str]]:
    """Agent ids and placeholder tokens for the baselines, which check no token."""
    return [(f"bench_{i:05d}", f"kh_baseline_{i}") for i in range(count)]


def timed_id(point: int, index: int, due_ns: int) -> str:
    """A latency probe's pattern id: which load point, which share, when it was due."""
    return f"p.{point}.{index}.{due_ns}"


async def paced(rate: float, count: int) -> AsyncIterator[tuple[int, int]]:
    """`count` sends at `rate` a second, open loop: each index with the time it is due
    (`perf_counter_ns`), yielded at that time, or at once when late (the lateness then
    counts in the latency measured from the due time)."""
    period_ns = int(1e9 / rate)
    origin = time.perf_counter_ns() + 10_000_000
    for i in range(count):
        due = origin + i * period_ns
        delay = (due - time.perf_counter_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)
        yield i, due


def record_latency(
    latencies: dict[int, list[int]], pattern_id: str, warmup: int, now_ns: int
) -> None:
    """The share -> delivery time of a probe (`timed_id`) past its point's warm-up."""
    if not pattern_id.startswith("p."):
        return
    _, point, index, due = pattern_id.split(".")
    if int(index) >= warmup:
        latencies.setdefault(int(point), []).append(now_ns - int(due))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)
