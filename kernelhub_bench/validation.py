"""The validation scenario: components validated per second with 1 and 2 validators, the
sandbox's overhead per component (the same sources built and tested with and without
bubblewrap, alternating, in the same run), and the time from share to verdict at the
swarm's pace. A real hub (TestHub, SQLite) and real validators (validator_service), in
this process: their builds run in subprocesses, so the loop mostly waits."""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.config import HubConfig
from hub_service.roles import Role
from hub_service.testing import TestHub
from trainer_service import HubClient
from trainer_service.simulation import codegen
from trainer_service.simulation.capabilities import SPECIALIZATION_NAMES, parse_specialization
from validator_service.builder import Builder
from validator_service.sandbox import Sandbox
from validator_service.worker import Validator

SHARER = "bench_sharer"


def components(count: int, seed: int = 7) -> list[pb.CodeComponent]:
    """The simulated trainers' own C, each with its self-test."""
    rng = random.Random(seed)
    made = []
    for i in range(count):
        spec = parse_specialization(SPECIALIZATION_NAMES[i % len(SPECIALIZATION_NAMES)])
        unit = codegen.generate_module(spec, rng)
        made.append(
            pb.CodeComponent(
                component_id=f"bench_{i}",
                name=unit.name,
                language="c",
                code=unit.code,
                specialization=spec,
                test_entry_points=[unit.entry_point],
            )
        )
    return made


async def _validated(
    client: HubClient, expected: int, seen: dict[str, float], timeout: float
) -> None:
    """Record when each artifact_validated arrives, until `expected` of them."""

    async def collect() -> None:
        async for item in client.events():
            if isinstance(item, pb.HubEvent) and item.HasField("artifact_validated"):
                seen.setdefault(item.artifact_validated.artifact_id, time.monotonic())
                if len(seen) >= expected:
                    return

    await asyncio.wait_for(collect(), timeout)


async def throughput(validators: int, count: int, work: Path) -> float:
    """Components validated per second: `count` shared first, then `validators` drain them."""
    with tempfile.TemporaryDirectory(prefix="kh-bench-hub-") as directory:
        config = HubConfig(host="127.0.0.1", port=0, database_url=f"sqlite:///{directory}/hub.db")
        async with TestHub.in_process(config) as hub:
            token = await hub.issue_token(SHARER)
            ids = [f"bench_validator_{i}" for i in range(validators)]
            tokens = await hub.issue_tokens(*ids, role=Role.VALIDATOR)
            async with HubClient(
                hub.target, SHARER, token, specialization=pb.SPECIALIZATION_NETWORKING
            ) as client:
                for component in components(count):
                    await client.share_code_component(component)
                stop = asyncio.Event()
                seen: dict[str, float] = {}
                started = time.monotonic()
                running = [
                    asyncio.ensure_future(
                        Validator(hub.target, tokens[v], Builder(Sandbox(), work_dir=work), v).run(
                            stop
                        )
                    )
                    for v in ids
                ]
                try:
                    await _validated(client, count, seen, timeout=60 + count * 10)
                finally:
                    stop.set()
                    await asyncio.gather(*running, return_exceptions=True)
                return count / (max(seen.values()) - started)


async def sandbox_overhead(rounds: int, work: Path) -> dict[str, float]:
    """Median seconds per component, sandboxed and not, the same sources alternating."""
    sources = components(rounds, seed=11)
    jailed, bare = Builder(Sandbox(True), work_dir=work), Builder(Sandbox(False), work_dir=work)
    await jailed.start()
    await bare.start()
    times: dict[str, list[float]] = {"sandboxed": [], "unsandboxed": []}
    for component in sources:
        artifact = pb.Artifact(kind=pb.ARTIFACT_KIND_CODE_COMPONENT, code_component=component)
        for name, builder in (("sandboxed", jailed), ("unsandboxed", bare)):
            verdict = await builder.validate(artifact)
            assert verdict.state == pb.VALIDATION_STATE_PASSED, verdict
            times[name].append(verdict.run_seconds)
    sandboxed = statistics.median(times["sandboxed"])
    unsandboxed = statistics.median(times["unsandboxed"])
    return {
        "sandboxed_seconds": sandboxed,
        "unsandboxed_seconds": unsandboxed,
        "overhead_seconds": sandboxed - unsandboxed,
        "ratio": sandboxed / unsandboxed,
    }


async def share_to_verdict(count: int, interval: float, work: Path) -> dict[str, float]:
    """Seconds from a share's receipt to its verdict's event, one validator, one share every
    `interval` seconds (a 10-trainer swarm at tempo 10 shares a component every ~0.3 s)."""
    with tempfile.TemporaryDirectory(prefix="kh-bench-hub-") as directory:
        config = HubConfig(host="127.0.0.1", port=0, database_url=f"sqlite:///{directory}/hub.db")
        async with TestHub.in_process(config) as hub:
            token = await hub.issue_token(SHARER)
            validator_token = await hub.issue_token("bench_validator", role=Role.VALIDATOR)
            stop = asyncio.Event()
            running = asyncio.ensure_future(
                Validator(
                    hub.target, validator_token, Builder(Sandbox(), work_dir=work), "bench"
                ).run(stop)
            )
            shared: dict[str, float] = {}
            seen: dict[str, float] = {}
            try:
                async with HubClient(
                    hub.target, SHARER, token, specialization=pb.SPECIALIZATION_NETWORKING
                ) as client:
                    collecting = asyncio.ensure_future(
                        _validated(client, count, seen, timeout=60 + count * 10)
                    )
                    for component in components(count, seed=13):
                        receipt = await client.share_code_component(component)
                        shared[receipt.resource_id] = time.monotonic()
                        await asyncio.sleep(interval)  # the pace, not a wait for a condition
                    await collecting
            finally:
                stop.set()
                await asyncio.gather(running, return_exceptions=True)
    delays = sorted(seen[a] - shared[a] for a in shared)
    return {
        "median_seconds": statistics.median(delays),
        "p90_seconds": delays[int(0.9 * (len(delays) - 1))],
        "interval_seconds": interval,
    }


async def run_validation(quick: bool) -> dict[str, Any]:
    count = 3 if quick else 40
    with tempfile.TemporaryDirectory(prefix="kh-bench-work-") as directory:
        work = Path(directory)
        os.chmod(work, 0o711)  # the sandbox's uids reach their scratch dirs (setup, no I/O wait)
        one = await throughput(1, count, work)
        two = await throughput(2, count, work)
        overhead = await sandbox_overhead(2 if quick else 20, work)
        latency = await share_to_verdict(3 if quick else 30, 0.5 if quick else 1.0, work)
    return {
        "components": count,
        "validated_per_second_1": one,
        "validated_per_second_2": two,
        "two_vs_one": two / one,
        "sandbox": overhead,
        "share_to_verdict": latency,
    }


def print_validation(result: dict[str, Any]) -> None:
    sandbox, latency = result["sandbox"], result["share_to_verdict"]
    print(f"validation ({result['components']} simulated C components, gcc + gcov + bwrap)")
    print(f"  validated/s, 1 validator   {result['validated_per_second_1']:8.2f}")
    print(
        f"  validated/s, 2 validators  {result['validated_per_second_2']:8.2f}"
        f"   ratio to 1: {result['two_vs_one']:.2f}"
    )
    print(
        f"  per component, sandboxed   {sandbox['sandboxed_seconds']:8.3f} s"
        f"   unsandboxed {sandbox['unsandboxed_seconds']:.3f} s"
        f"   ratio {sandbox['ratio']:.2f} (+{sandbox['overhead_seconds'] * 1000:.0f} ms)"
    )
    print(
        f"  share -> verdict           {latency['median_seconds']:8.3f} s median"
        f"   p90 {latency['p90_seconds']:.3f} s (one share per {latency['interval_seconds']:g} s)"
    )
