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
from typing import Any, cast

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
    "connect_storm",
    "connect_storm_welcome",
    "connect_storm_presence",
    "interest_cpu",
    "interest_rate",
    "interest_p50",
    "interest_p99",
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


# A hang guard only: ~30 s on a quiet machine, 115 s seen with the machine loaded ~5x.
@pytest.mark.timeout(600)
def test_quick_run_reports_every_figure_with_its_baseline(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    completed = subprocess.run(
        [*bench_command(), "run", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
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


def test_report_scale_measures_both_sizes_against_the_baseline() -> None:
    """`report-scale` at smoke size: both databases made and read, every ratio printed."""
    completed = subprocess.run(
        [*bench_command(), "report-scale", "--rows", "2000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = {line.split("  ")[0]: line for line in completed.stdout.splitlines()}
    assert set(lines) == {
        "rows",
        "report read",
        "baseline scan",
        "read / baseline",
        "peak Python memory",
    }
    assert "200" in lines["rows"] and "2,000" in lines["rows"]
    for key in ("report read", "baseline scan", "peak Python memory"):
        ratio = lines[key].split()[-1]
        assert ratio.endswith("x") and positive(float(ratio[:-1])), lines[key]


@pytest.mark.timeout(240)
def test_the_dashboard_benchmark_reports_its_figures(tmp_path: Path) -> None:
    """`kernelhub-bench dashboard` at toy sizes: every figure there and measured."""
    out = tmp_path / "dashboard.json"
    completed = subprocess.run(
        [
            *bench_command(),
            "dashboard",
            "--agents",
            "10",
            "--shares",
            "30",
            "--repeat",
            "1",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, f"{completed.stderr[-4000:]}\n{completed.stdout[-4000:]}"
    assert "ratio" in completed.stdout
    result = json.loads(out.read_text())
    assert len(result["fanout_without"]) == 2 and len(result["fanout_with"]) == 1
    for figure in ("ratio", "snapshot_bytes", "snapshot_ms", "dashboard_rss_mib"):
        assert positive(result[figure]), figure
    assert result["sse_snapshots_per_second"] > 0


@pytest.mark.timeout(120)
def test_join_reports_a_fresh_agent_going_live_beside_an_empty_hub(tmp_path: Path) -> None:
    """`kernelhub-bench join` with a small log: every figure measured, nothing asserted of
    its speed (docs/benchmarks.md has the 1,000,000-event run)."""
    out = tmp_path / "join.json"
    completed = subprocess.run(
        [*bench_command(), "join", "--events", "3000", "--joins", "2", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:] + completed.stdout[-4000:]
    assert "ratio" in completed.stdout
    result = json.loads(out.read_text())
    assert result["events"] == 3000
    for key in ("fill_seconds", "join_from_now_seconds", "baseline_empty_hub_seconds", "ratio"):
        assert positive(result[key]), (key, result[key])
    assert len(result["full"]["join_seconds"]) == len(result["empty"]["join_seconds"]) == 2
    assert positive(result["full"]["resume_seconds"])
    # The replays were timed until these many events had reached the client (its tags
    # as the hub writes them: a log filled without them would owe a resume nothing).
    assert result["full"]["resume_events"] == 900
    sparse = result["full"]["sparse_replays"]
    assert {name: replay["events"] for name, replay in sparse.items()} == {
        "one_sharer_of_50": 60,
        "nothing_matches": 0,
    }
    assert all(positive(replay["seconds"]) for replay in sparse.values())


@pytest.mark.timeout(180)
def test_the_validation_scenario_reports_its_figures(tmp_path: Path) -> None:
    out = tmp_path / "validation.json"
    completed = subprocess.run(
        [*bench_command(), "validation", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert completed.returncode == 0, f"{completed.stderr[-4000:]}\n{completed.stdout[-4000:]}"
    assert "validated/s, 2 validators" in completed.stdout
    result = json.loads(out.read_text())
    for figure in ("validated_per_second_1", "validated_per_second_2", "two_vs_one"):
        assert positive(result[figure]), (figure, result)
    assert positive(result["sandbox"]["ratio"]) and positive(result["sandbox"]["sandboxed_seconds"])
    assert positive(result["share_to_verdict"]["median_seconds"])


async def _replicas_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    """`kernelhub-bench replicas` in miniature (2 senders, 2 receivers, 20 shares each) with
    `args`; its one row."""
    out = tmp_path / "replicas.json"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kernelhub_bench",
        "replicas",
        "--database-url",
        POSTGRES_URL,
        *args,
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
    assert row["shares"] == 40
    assert row["ingest_per_s"] > 0 and row["deliveries_per_s"] > 0
    return cast("dict[str, Any]", row)


async def test_the_replicas_benchmark_measures_each_replica_count(tmp_path: Path) -> None:
    """Two replicas on a fresh database, every share delivered to every receiver, the
    database's cost per event measured."""
    row = await _replicas_bench(tmp_path, "--replicas", "2")
    assert row["replicas"] == 2
    assert row["wal_bytes_per_event"] > 0  # every committed event is written ahead


async def test_the_replicas_benchmark_measures_workers_on_one_port(tmp_path: Path) -> None:
    """One `serve --workers 2`, a connection per stream, every share delivered, each
    worker's streams counted."""
    row = await _replicas_bench(tmp_path, "--workers", "2")
    assert row["workers"] == 2
    # Both workers found, and between them every stream (2 senders, 2 receivers).
    assert len(row["streams_per_worker"]) == 2 and sum(row["streams_per_worker"]) == 4


PEER_FIGURES = {
    "peers_p50_20_vs_bare",
    "peers_p50_20_vs_jetstream",
    "peers_p99_20_vs_bare",
    "peers_p99_20_vs_jetstream",
    "peers_hub_cores_20",
    "peers_ingest_vs_bare",
    "peers_ingest_vs_jetstream",
    "peers_ingest_client_vs_jetstream",
    "peers_ingest_cpu_kernelhub",
    "peers_ingest_cpu_kernelhub_client",
    "peers_fanout_vs_bare",
    "peers_fanout_vs_jetstream",
}


# A hang guard only: ~35 s on a loaded machine.
@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    ("flag", "given", "why"),
    [
        ("--workers", "0", "each count must be 1 or more"),
        ("--workers", "1,-2", "each count must be 1 or more"),
        ("--replicas", "-1", "each count must be 0 or more"),
        ("--workers", "1,two", "not a list of counts"),
    ],
)
def test_the_replicas_benchmark_refuses_counts_it_cannot_run(
    flag: str, given: str, why: str
) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kernelhub_bench",
            "replicas",
            "--database-url",
            POSTGRES_URL,
            flag,
            given,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert why in done.stderr, done.stderr


def test_quick_peers_run_reports_every_system_at_its_rate(tmp_path: Path) -> None:
    """kernelhub, the bare server and our own nats-server -js, at 20 shares/s to 10 receivers
    for 1.5 s each, then ingest and fan-out: every figure measured, with its baseline."""
    from kernelhub_bench.runner import peers_missing

    if (reason := peers_missing()) is not None:
        pytest.skip(reason)
    out = tmp_path / "peers.json"
    scenarios = "peers_latency,peers_ingest,peers_fanout"
    completed = subprocess.run(
        [*bench_command(), "run", "--quick", "--scenarios", scenarios, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    assert completed.returncode == 0, (
        f"kernelhub-bench failed ({completed.returncode}):\n"
        f"{completed.stderr[-4000:]}\n{completed.stdout[-4000:]}"
    )
    assert "beside the peers" in completed.stdout  # the per-rate table

    result = json.loads(out.read_text())
    figures = {figure["key"]: figure for figure in result["figures"]}
    assert set(figures) == PEER_FIGURES
    for key, figure in figures.items():
        for field in ("kernelhub", "baseline", "ratio"):
            assert positive(figure[field]), f"{key}: {field} = {figure[field]!r}"
        assert figure["baseline_name"]
    # The quick rate (20/s) is below the targets' rates: only the rate-free targets judge.
    for key in ("peers_ingest_vs_bare", "peers_ingest_client_vs_jetstream", "peers_fanout_vs_bare"):
        assert figures[key]["met"] in (True, False), f"{key} has a target"

    peers = result["peers"]
    assert peers["skipped"] is None and peers["receivers"] == 10
    (point,) = peers["points"]
    assert point["offered_shares_per_s"] == 20
    for system in ("kernelhub", "bare", "jetstream"):
        for field in ("p50_ms", "p99_ms", "server_cores", "client_cores"):
            assert positive(point[f"{system}_{field}"]), f"{system} {field}"
    for field in ("p50_vs_bare", "p99_vs_bare", "p50_vs_jetstream", "p99_vs_jetstream"):
        assert positive(point[field]), field
    # Every system took its turn at the rate.
    (run,) = result["raw"]["peers"]["latency"]
    assert sorted(run["points"][0]["order"]) == ["bare", "jetstream", "kernelhub"]

    plot = tmp_path / "peers.png"
    drawn = subprocess.run(
        [*bench_command(), "plot", str(out), str(plot), "--peers"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_peers_are_skipped_with_the_reason_where_nats_server_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from kernelhub_bench import runner

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(runner, "NATS_SERVER_PATHS", ())
    lines: list[str] = []
    raw = asyncio.run(runner.run(runner.QUICK, 1, ["peers_latency"], tmp_path, log=lines.append))
    assert "nats-server not found" in raw["peers"]["skipped"]
    assert any("peers skipped" in line and "apt-get install nats-server" in line for line in lines)
    assert raw["peers"]["latency"] == [] and list(tmp_path.iterdir()) == []  # nothing started
