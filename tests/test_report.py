"""The run report: built from a database a real hub wrote for real trainers, its numbers equal
what the rows say (on SQLite and PostgreSQL), and it opens in a browser with no network."""

from __future__ import annotations

import asyncio
import calendar
import sqlite3
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from playwright.async_api import Browser, Route

from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service import cli, report
from hub_service.report_data import (
    DURATION_BINS,
    MAX_BUCKETS,
    TOP_CONTRIBUTORS,
    TOP_PAIRS,
    Window,
    bin_index,
)
from hub_service.testing import TestHub
from kernelhub_bench.report_scale import synthesize

from .browser import SCREENSHOTS, browser
from .conftest import HubHarness, make_config
from .workload import run_workload

__all__ = ["browser"]  # the fixture, imported to be used by name
HUB = [sys.executable, "-m", "hub_service"]


def rows(url: str, query: str) -> list[Any]:
    """The rows themselves, read with plain SQL beside the report's own queries."""
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.execute(sqlalchemy.text(query)))
    finally:
        engine.dispose()


def name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix).lower()


def expected_from_rows(url: str, width: int = 1) -> dict[str, Any]:
    """Each figure's numbers, computed here in Python from every row."""
    artifacts = rows(url, "SELECT kind, specialization, contributor_id, created_at FROM artifact")
    components = rows(url, "SELECT validation_state FROM artifact WHERE validation_state != 0")
    collaborations = rows(
        url, "SELECT initiator_id, target_id, state, created_at, updated_at FROM collaboration"
    )
    requests = rows(url, "SELECT request_id, created_at FROM feature_request")
    deliveries = rows(url, "SELECT request_id, created_at FROM feature_delivery")

    def moment(value: Any) -> datetime:
        return value if isinstance(value, datetime) else datetime.fromisoformat(value)

    seconds = [calendar.timegm(moment(a.created_at).utctimetuple()) for a in artifacts]
    start = min(seconds)
    by_bucket: dict[str, Counter[int]] = defaultdict(Counter)
    for artifact, second in zip(artifacts, seconds, strict=True):
        spec = name(pb.Specialization, artifact.specialization, "SPECIALIZATION_")
        by_bucket[spec][(second - start) // width] += 1
    durations: dict[str, list[int]] = {}
    for c in collaborations:
        state = name(pb.CollaborationState, c.state, "COLLABORATION_STATE_")
        if state in ("completed", "declined", "expired"):
            bins = durations.setdefault(state, [0] * (len(DURATION_BINS) + 1))
            took = (moment(c.updated_at) - moment(c.created_at)).total_seconds()
            bins[bin_index(took)] += 1
    first_delivery: dict[str, datetime] = {}
    for d in deliveries:
        at = moment(d.created_at)
        first_delivery[d.request_id] = min(first_delivery.get(d.request_id, at), at)
    latency = [0] * (len(DURATION_BINS) + 1)
    for r in requests:
        if r.request_id in first_delivery:
            latency[
                bin_index((first_delivery[r.request_id] - moment(r.created_at)).total_seconds())
            ] += 1
    validated = Counter(
        name(pb.ValidationState, c.validation_state, "VALIDATION_STATE_") for c in components
    )
    return {
        "validation": dict(validated) or None,
        "artifacts": Counter(name(pb.ArtifactKind, a.kind, "ARTIFACT_KIND_") for a in artifacts),
        "states": Counter(
            name(pb.CollaborationState, c.state, "COLLABORATION_STATE_") for c in collaborations
        ),
        "start": start,
        "buckets": (max(seconds) - start) // width + 1,
        "width": width,
        "shares": by_bucket,
        "pairs": Counter(frozenset((c.initiator_id, c.target_id)) for c in collaborations),
        "durations": durations,
        "latency": latency,
        "undelivered": sum(1 for r in requests if r.request_id not in first_delivery),
        "contributions": Counter(
            (a.contributor_id, name(pb.ArtifactKind, a.kind, "ARTIFACT_KIND_")) for a in artifacts
        ),
        "requests": len(requests),
        "deliveries": len(deliveries),
    }


async def written_by_a_real_hub(url: str) -> None:
    async with TestHub.in_process(make_config(url)) as hub:
        harness = HubHarness(hub.server)
        try:
            await run_workload(harness)
        finally:
            await harness.close()


def check_against_rows(data: dict[str, Any], expected: dict[str, Any]) -> None:
    totals = data["totals"]
    assert totals["artifacts"] == dict(expected["artifacts"])
    assert totals["collaborations"] == dict(expected["states"])
    assert (totals["feature_requests"], totals["feature_deliveries"]) == (
        expected["requests"],
        expected["deliveries"],
    )
    shares = data["shares"]
    assert (shares["start_epoch"], shares["bucket_seconds"]) == (
        expected["start"],
        expected["width"],
    )
    assert shares["buckets"] == expected["buckets"]
    assert shares["series"] == {
        spec: [counts[i] for i in range(expected["buckets"])]
        for spec, counts in expected["shares"].items()
    }
    # The busiest pairs (all of them in a small run): each with its own count. Which of
    # equally busy pairs make the cut is the database's collation's business.
    pairs = expected["pairs"]
    edges = {frozenset((e["a"], e["b"])): e["count"] for e in data["graph"]["edges"]}
    assert all(pairs[pair] == n for pair, n in edges.items())
    assert sorted(edges.values(), reverse=True) == sorted(pairs.values(), reverse=True)[:TOP_PAIRS]
    assert data["graph"]["pairs_total"] == len(pairs)
    assert {n["id"] for n in data["graph"]["nodes"]} == {a for pair in edges for a in pair}
    for outcome, counts in expected["durations"].items():
        assert data["durations"]["by_outcome"][outcome]["counts"] == counts
    assert data["feature_latency"]["counts"] == expected["latency"]
    assert data["feature_latency"]["undelivered"] == expected["undelivered"]
    per_agent: dict[str, dict[str, int]] = defaultdict(dict)
    for (agent_id, kind), n in expected["contributions"].items():
        per_agent[agent_id][kind] = n
    shown = data["contributions"]["agents"]
    assert all(agent["by_kind"] == per_agent[agent["agent_id"]] for agent in shown)
    totals = sorted((sum(kinds.values()) for kinds in per_agent.values()), reverse=True)
    assert [agent["total"] for agent in shown] == totals[:TOP_CONTRIBUTORS]
    assert data["contributions"]["others"] == sum(totals[TOP_CONTRIBUTORS:])
    assert data["contributions"]["contributors_total"] == len(per_agent)
    assert (data["validation"] or {}).get("by_state") == expected["validation"]


async def test_the_report_is_the_rows(store_url: str, tmp_path: Path) -> None:
    await written_by_a_real_hub(store_url)
    out = tmp_path / "report.html"
    written = await report.write_report(store_url, out)
    assert written == [out]
    document = out.read_text()
    data = report.embedded_data(document)
    expected = expected_from_rows(store_url)
    check_against_rows(data, expected)
    # What the workload did, as its trainers were answered.
    assert data["totals"]["collaborations"] == {"completed": 1, "declined": 1}
    assert data["totals"]["artifacts"] == {"code_component": 1, "os_component": 3, "pattern": 6}
    assert data["feature_latency"]["count"] == 1 and data["feature_latency"]["undelivered"] == 0
    # Every figure is drawn inline; nothing is fetched from anywhere.
    for figure in report.FIGURES:
        section = document.split(f'id="fig-{figure}"', 1)[1].split("</section>", 1)[0]
        assert "<svg" in section, figure
    assert data["validation"] == {"by_state": {"pending": 4}, "pass_rate": None}  # no validator
    for needle in ("http://", "https://", "src=", "<link"):
        outside_svg = "".join(part.split("</svg>")[-1] for part in document.split("<svg"))
        assert needle not in outside_svg, needle


async def test_a_long_run_of_many_agents_is_the_rows(store_url: str) -> None:
    """An hour of 1,000 agents (synthetic rows, as the benchmark makes): buckets wider than a
    second, more pairs and contributors than are drawn, on each database."""
    await asyncio.to_thread(synthesize, store_url, 4000)
    data = (await report.read(store_url, Window())).as_json()
    width = data["shares"]["bucket_seconds"]
    assert width > 1 and data["shares"]["buckets"] <= MAX_BUCKETS
    assert data["graph"]["pairs_total"] > TOP_PAIRS == len(data["graph"]["edges"])
    assert data["contributions"]["contributors_total"] > TOP_CONTRIBUTORS
    check_against_rows(data, expected_from_rows(store_url, width))
    ended = data["durations"]["by_outcome"]
    assert sum(h["count"] for h in ended.values()) == 1000


async def test_a_window_selects_rows_by_their_time(database_url: str, tmp_path: Path) -> None:
    await written_by_a_real_hub(database_url)
    everything = await report.read(database_url, Window())
    first = everything.totals["first_share"]
    assert first is not None
    later = await report.read(database_url, Window(since=datetime(2100, 1, 1)))
    assert later.totals["artifacts"] == {} and later.shares["series"] == {}
    assert later.graph["edges"] == [] and later.contributions["agents"] == []
    start = datetime.fromisoformat(first)
    kept = await report.read(database_url, Window(since=start, until=start + timedelta(days=1)))
    assert kept.as_json() | {"window": None} == everything.as_json() | {"window": None}
    empty = report.render_html(later)
    assert empty.count('<p class="empty">no data</p>') == len(report.FIGURES)


def test_times_are_iso_or_a_duration_ago() -> None:
    now = datetime.fromisoformat("2026-12-02T10:00:00+00:00")
    assert report.parse_moment("2h", now) == datetime(2026, 12, 2, 8, 0, tzinfo=UTC)
    assert report.parse_moment("2026-12-02T11:30:00+01:00", now) == datetime(
        2026, 12, 2, 10, 30, tzinfo=UTC
    )
    assert report.parse_moment("2026-12-02T09:00:00", now) == datetime(2026, 12, 2, 9, tzinfo=UTC)
    with pytest.raises(report.ReportError, match="neither an ISO 8601 time"):
        report.parse_moment("yesterday-ish", now)


def test_the_command_writes_html_and_png(tmp_path: Path) -> None:
    db = tmp_path / "hub.db"
    asyncio.run(written_by_a_real_hub(f"sqlite:///{db}"))
    html_file = tmp_path / "out" / "report.html"
    done = subprocess.run(
        [*HUB, "report", "--db", str(db), "--out", str(html_file)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert report.embedded_data(html_file.read_text())["totals"]["feature_requests"] == 1
    images = tmp_path / "png"
    assert cli.main(["report", "--db", str(db), "--format", "png", "--out", str(images)]) == 0
    assert sorted(p.name for p in images.iterdir()) == sorted(f"{f}.png" for f in report.FIGURES)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in images.iterdir())


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--db", "/nonexistent/hub.db"], "no database at /nonexistent/hub.db"),
        (["--database-url", "memory://"], "an in-memory hub keeps nothing"),
        (["--db", "DB", "--since", "soonish"], "neither an ISO 8601 time"),
        (["--db", "HUB", "--out", "/dev/null/report.html"], "cannot write /dev/null/report.html"),
    ],
)
def test_a_report_that_cannot_be_made_says_why(
    tmp_path: Path, args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "hub.db"
    db.write_bytes(b"")  # an empty SQLite file: no tables
    if "HUB" in args:
        asyncio.run(written_by_a_real_hub(f"sqlite:///{db}"))
    args = [str(db) if a in ("DB", "HUB") else a for a in args]
    assert cli.main(["report", "--out", str(tmp_path / "r.html"), *args]) == 1
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.html").exists()


def test_a_database_that_is_not_a_hubs_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as connection:
        connection.execute("CREATE TABLE unrelated (x INTEGER)")
    assert cli.main(["report", "--db", str(db), "--out", str(tmp_path / "r.html")]) == 1
    err = capsys.readouterr().err
    assert "no such table" in err and len(err.strip().splitlines()) == 1, err


async def test_the_report_opens_offline_in_a_browser(
    database_url: str, tmp_path: Path, browser: Browser
) -> None:
    await written_by_a_real_hub(database_url)
    out = tmp_path / "report.html"
    await report.write_report(database_url, out)
    context = await browser.new_context(offline=True, viewport={"width": 1100, "height": 900})
    fetched: list[str] = []

    async def refuse(route: Route) -> None:
        if not route.request.url.startswith("file://"):
            fetched.append(route.request.url)
            await route.abort()
        else:
            await route.continue_()

    await context.route("**/*", refuse)
    page = await context.new_page()
    await page.goto(out.as_uri())
    for figure in report.FIGURES:
        svg = page.locator(f"#fig-{figure} svg")
        await svg.wait_for(state="visible", timeout=10_000)
        box = await svg.bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 150, (figure, box)
    embedded = await page.evaluate("JSON.parse(document.getElementById('report-data').textContent)")
    assert embedded == report.embedded_data(out.read_text())
    assert fetched == []
    SCREENSHOTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / "report.png"), full_page=True)
    await context.close()
