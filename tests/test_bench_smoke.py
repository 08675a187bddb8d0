"""The benchmark suite end to end: `kernelhub-bench run --quick` against a real hub and the
baselines, in their own processes. Checks that every figure is there and measured; it makes
no timing assertions (the targets are reported, never asserted)."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import POSTGRES_URL

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {
    "ingest",
    "ingest_batched",
    "ingest_batched_vs_oneway_batched",
    "ingest_vs_sqlite",
    "fanout_10",
    "latency_p50",
    "latency_p99",
    "rss_per_trainer",
    "connect_idle",
    "replay",
}


def bench_command() -> list[str]:
    """The installed console script, else the module."""
    script = Path(sys.executable).parent / "kernelhub-bench"
    if script.exists():
        return [str(script)]
    found = shutil.which("kernelhub-bench")
    return [found] if found else [sys.executable, "-m", "kernelhub_bench"]


def positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.timeout(240)
def test_quick_run_reports_every_figure_with_its_baseline(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    completed = subprocess.run(
        [*bench_command(), "run", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, (
        f"kernelhub-bench failed ({completed.returncode}):\n"
        f"{completed.stderr[-4000:]}\n{completed.stdout[-4000:]}"
    )
    assert "kernelhub" in completed.stdout and "ratio" in completed.stdout  # the table

    result = json.loads(out.read_text())
    assert result["quick"] is True and result["repeat"] == 1
    figures = {figure["key"]: figure for figure in result["figures"]}
    assert set(figures) == FIGURES
    for key, figure in figures.items():
        for field in ("kernelhub", "baseline", "ratio"):
            assert positive(figure[field]), f"{key}: {field} = {figure[field]!r}"
        assert figure["target"] and figure["baseline_name"]
        assert figure["met"] in (True, False, None)
        assert all(positive(v) for v in figure["runs"]["kernelhub"] + figure["runs"]["baseline"])
    for key in (
        "ingest",
        "ingest_batched",
        "fanout_10",
        "latency_p99",
        "rss_per_trainer",
        "replay",
    ):
        assert figures[key]["met"] in (True, False), f"{key} has a target"

    sweep = result["latency_sweep"]
    assert sweep["max_shares_per_s"] > 0
    assert [p["fraction"] for p in sweep["points"]] == [0.25, 0.5]
    for point in sweep["points"]:
        for field in (
            "offered_shares_per_s",
            "kernelhub_p50_ms",
            "kernelhub_p99_ms",
            "baseline_p50_ms",
            "baseline_p99_ms",
        ):
            assert positive(point[field]), f"{field} = {point[field]!r}"


async def test_the_replicas_benchmark_measures_each_replica_count(tmp_path: Path) -> None:
    """`kernelhub-bench replicas` in miniature: two replicas on a fresh database, every share
    delivered to every receiver, the database's cost per event measured."""
    out = tmp_path / "replicas.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kernelhub_bench",
        "replicas",
        "--database-url",
        POSTGRES_URL,
        "--replicas",
        "2",
        "--senders",
        "2",
        "--receivers",
        "2",
        "--shares",
        "20",
        "--json",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 240)
    assert process.returncode == 0, stdout.decode()[-2000:] + stderr.decode()[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["replicas"] == 2 and row["shares"] == 40
    assert row["ingest_per_s"] > 0 and row["deliveries_per_s"] > 0
    assert row["wal_bytes_per_event"] > 0  # every committed event is written ahead
