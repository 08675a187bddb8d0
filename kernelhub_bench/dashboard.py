"""`kernelhub-bench dashboard`: what a dashboard costs a hub with many agents, and what it
costs itself.

N idle agents stay connected (each reading its stream) while one sender shares a batch of
patterns, fanned out to all of them: timed without the dashboard, with it (its Watch stream
and one open page reading its server-sent events), and without it again. Prints the fan-out
rate with the dashboard as a ratio of the mean without it (the baseline, in the same run),
the dashboard's CPU per event and its memory, and the size and serving time of one snapshot
with N agents online.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import psutil

from hub_service.roles import Role
from hub_service.testing import TestHub
from trainer_service.simulation.dashboard import dashboard_beside

from .common import median, share
from .load import Context, Deadline, Swarm, connect_swarm, send_all
from .runner import child_env

SSE_WINDOW_SECONDS = 2.0


@dataclass
class DashboardResult:
    agents: int
    shares_per_run: int
    fanout_without: list[float]  # deliveries per second, each run without the dashboard
    fanout_with: list[float]  # each run with it
    hub_cpu_without: float  # hub CPU seconds per run, median
    hub_cpu_with: float
    dashboard_cpu_share: float  # of one core, while the shares fan out
    dashboard_rss_mib: float
    snapshot_bytes: int
    snapshot_ms: float  # median GET /api/snapshot
    sse_snapshots_per_second: float

    @property
    def ratio(self) -> float:
        """Median fan-out rate with the dashboard over the median without (the baseline)."""
        return median(self.fanout_with) / median(self.fanout_without)


async def _fanout(
    swarm: Swarm, shares: int, tag: str, deadline: Deadline, hub: psutil.Process
) -> tuple[float, float]:
    """Deliveries per second of `shares` shares to every receiver, and the hub's CPU seconds."""
    want = swarm.receivers[0].got + shares
    swarm.expect(want)
    requests = [share(f"{tag}-{i}", f"{tag}.{i}") for i in range(shares)]
    cpu = sum(hub.cpu_times()[:2])
    start = time.perf_counter()
    await send_all(swarm.sender, requests, deadline, tenths=False)
    await swarm.all_reached(deadline)
    seconds = time.perf_counter() - start
    return shares * len(swarm.receivers) / seconds, sum(hub.cpu_times()[:2]) - cpu


def _get(url: str) -> tuple[bytes, float]:
    start = time.perf_counter()
    with urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body, time.perf_counter() - start


async def _read_sse(url: str, counts: list[int]) -> None:
    """An open page: reads the event stream, counting the snapshots."""
    host, port = url.removeprefix("http://").rstrip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /api/stream HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    try:
        while line := await reader.readline():
            if line.startswith(b"data: "):
                counts[0] += 1
    finally:
        writer.close()


@dataclass
class _WithDashboard:
    rate: float
    hub_cpu: float
    board_share: float
    sse_rate: float
    snapshot_bytes: int
    snapshot_seconds: float
    rss_mib: float


async def _caught_up(url: str, agents: int, deadline: Deadline) -> dict[str, Any]:
    """The snapshot once every agent is online in it and the log's head seen."""
    while True:
        body, _ = await asyncio.to_thread(_get, url)
        snap: dict[str, Any] = json.loads(body)
        head = int(snap["hub"].get("head_seq", 0))
        if snap["online_count"] >= agents and head and snap["feed"]["last_seq"] >= head:
            return snap
        if deadline.left() <= 0:
            raise TimeoutError("the dashboard never caught up")
        await asyncio.sleep(0.2)


async def _run_with_dashboard(
    hub: TestHub, observer: str, swarm: Swarm, shares: int, tag: str, deadline: Deadline
) -> _WithDashboard:
    """One timed fan-out with a dashboard (started, caught up, a page open), then its figures."""
    hub_process = psutil.Process(hub.pid)
    async with dashboard_beside(hub.target, observer, 0) as dashboard:
        board = psutil.Process(dashboard.pid)
        url = dashboard.url + "api/snapshot"
        seen_before = (await _caught_up(url, len(swarm.receivers), deadline))["feed"]["events_seen"]
        counts = [0]
        page = asyncio.create_task(_read_sse(dashboard.url, counts))
        try:
            board_cpu = sum(board.cpu_times()[:2])
            start = time.perf_counter()
            rate, hub_cpu = await _fanout(swarm, shares, tag, deadline, hub_process)
            while True:  # until the dashboard has seen every share: its CPU covers them all
                body, _ = await asyncio.to_thread(_get, url)
                if json.loads(body)["feed"]["events_seen"] - seen_before >= shares:
                    break
                await asyncio.sleep(0.05)
            share_of_core = (sum(board.cpu_times()[:2]) - board_cpu) / (time.perf_counter() - start)
            first = counts[0]  # what an open page receives, over a window of its own
            await asyncio.sleep(SSE_WINDOW_SECONDS)
            sse_rate = (counts[0] - first) / SSE_WINDOW_SECONDS
            timings = [await asyncio.to_thread(_get, url) for _ in range(20)]
            rss = board.memory_info().rss / 2**20
        finally:
            page.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await page
    return _WithDashboard(
        rate,
        hub_cpu,
        share_of_core,
        sse_rate,
        len(timings[-1][0]),
        median([t for _, t in timings]),
        rss,
    )


async def bench_dashboard(
    agents: int, shares: int, repeat: int = 2, deadline_seconds: float = 1800
) -> DashboardResult:
    """`repeat` times: a fan-out without the dashboard, then one with it; then one more
    without, so the baseline brackets every run with the dashboard."""
    deadline = Deadline(deadline_seconds)
    with tempfile.TemporaryDirectory(prefix="kernelhub-bench-dashboard-") as directory:
        work = Path(directory)
        async with TestHub.subprocess(work / "hub.db", env=child_env(), output_dir=work) as hub:
            ids = [f"bench_{i:05d}" for i in range(agents + 1)]
            tokens = await hub.issue_tokens(*ids)
            observer = await hub.issue_token("bench_dashboard", role=Role.OBSERVER)
            token_file = work / "tokens.txt"
            token_file.write_text("".join(f"{a} {t}\n" for a, t in tokens.items()))
            context = Context(hub.target, {"per_channel": 50}, hub.pid, token_file)
            hub_process = psutil.Process(hub.pid)
            swarm = await connect_swarm(context, agents, False, deadline)
            without: list[tuple[float, float]] = []
            with_board: list[_WithDashboard] = []
            try:
                await _fanout(swarm, min(shares, 50), "warm", deadline, hub_process)
                for r in range(repeat):
                    without.append(await _fanout(swarm, shares, f"a{r}", deadline, hub_process))
                    with_board.append(
                        await _run_with_dashboard(hub, observer, swarm, shares, f"b{r}", deadline)
                    )
                without.append(await _fanout(swarm, shares, "c", deadline, hub_process))
            finally:
                await swarm.close()
    return DashboardResult(
        agents=agents,
        shares_per_run=shares,
        fanout_without=[rate for rate, _ in without],
        fanout_with=[w.rate for w in with_board],
        hub_cpu_without=median([cpu for _, cpu in without]),
        hub_cpu_with=median([w.hub_cpu for w in with_board]),
        dashboard_cpu_share=median([w.board_share for w in with_board]),
        dashboard_rss_mib=max(w.rss_mib for w in with_board),
        snapshot_bytes=with_board[-1].snapshot_bytes,
        snapshot_ms=median([w.snapshot_seconds for w in with_board]) * 1000,
        sse_snapshots_per_second=median([w.sse_rate for w in with_board]),
    )


def report(result: DashboardResult) -> str:
    without = ", ".join(f"{r:,.0f}" for r in result.fanout_without)
    with_board = ", ".join(f"{r:,.0f}" for r in result.fanout_with)
    return "\n".join(
        [
            f"dashboard beside a hub with {result.agents} agents online, "
            f"{result.shares_per_run} shares fanned out to all per run",
            f"  fan-out without the dashboard (the baseline): {without} deliveries/s",
            f"  fan-out with it:  {with_board} deliveries/s; "
            f"median ratio {result.ratio:.2f} of the baseline",
            f"  hub CPU per run (median): {result.hub_cpu_with:.2f} s with, "
            f"{result.hub_cpu_without:.2f} s without"
            + (
                f" (ratio {result.hub_cpu_with / result.hub_cpu_without:.2f})"
                if result.hub_cpu_without >= 0.1
                else " (runs too short to compare)"
            ),
            f"  dashboard: {result.dashboard_cpu_share:.0%} of a core meanwhile, "
            f"{result.dashboard_rss_mib:.0f} MiB RSS",
            f"  snapshot: {result.snapshot_bytes:,} bytes, served in {result.snapshot_ms:.1f} ms "
            f"(median); {result.sse_snapshots_per_second:.1f} snapshots/s to an open page",
        ]
    )


def as_json(result: DashboardResult) -> dict[str, Any]:
    return {**asdict(result), "ratio": result.ratio}
