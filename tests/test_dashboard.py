"""The dashboard in headless Chromium, against a live hub with real trainers running: agents
online and counts that grow without a reload, the Validation panel, the agent and artifact
pages, and agent-supplied markup rendered as inert text; the aggregate's bounds; the hub
health GetHubStats reports."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest
from playwright.async_api import Browser, Page

from dashboard_service.aggregate import MAX_ONLINE, RECENT_FAILURES, Aggregate
from dashboard_service.cli import read_token
from generated.kernelhub.v1 import hub_pb2 as pb
from hub_service.roles import Role
from hub_service.server import HubServer
from trainer_service.simulation.dashboard import dashboard_beside
from trainer_service.simulation.swarm import agent_ids, run_swarm

from .browser import SCREENSHOTS, browser
from .conftest import WAIT, HubHarness, auth, code_component, hello

__all__ = ["browser"]  # the fixture, imported to be used

TRAINERS = 4
XSS_NAME = "<script>window.__xss = 1</script><img src=x onerror=window.__xss=2>"
XSS_CODE = "</code></pre><script>window.__xss = 3</script>\nint main(void) { return 0; }\n"
BROWSER_WAIT_MS = 20_000
XSS_DIAGNOSTIC = "<img src=x onerror=window.__xss=4>: error: expected ';'\nsecond line"


async def _fail_until(harness: HubHarness, artifact_id: str) -> None:
    """A validator (no process: its RPCs) claims components and fails each, with markup in
    its diagnostics, until it has failed `artifact_id` (the swarm's may come first)."""
    validator = await harness.token("v1", role=Role.VALIDATOR)
    verdict = pb.ValidationVerdict(state=pb.VALIDATION_STATE_FAILED, diagnostics=XSS_DIAGNOSTIC)
    async with asyncio.timeout(WAIT):
        while True:
            claim = await harness.stub.ClaimValidation(
                pb.ClaimValidationRequest(wait_seconds=5), metadata=auth(validator), timeout=15
            )
            if not claim.HasField("lease"):
                continue
            await harness.stub.SubmitVerdict(
                pb.SubmitVerdictRequest(lease_id=claim.lease.lease_id, verdict=verdict),
                metadata=auth(validator),
            )
            if claim.lease.artifact.artifact_id == artifact_id:
                return


@pytest.fixture
async def swarm(hub: HubServer) -> AsyncIterator[None]:
    """Real trainers, running until the test ends."""
    ids = agent_ids(TRAINERS)
    tokens = {agent_id: await hub.issue_token(agent_id) for agent_id in ids}
    stop = asyncio.Event()
    running = asyncio.create_task(
        run_swarm(
            target=f"127.0.0.1:{hub.port}",
            tokens=tokens,
            count=TRAINERS,
            duration_seconds=120,
            seed=3,
            tempo=20,
            stop=stop,
        )
    )
    try:
        yield
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 30)


async def _malicious_share(harness: HubHarness) -> str:
    """An agent whose version and component name are markup; the artifact id it got."""
    greeting = hello("mallory")
    greeting.version = XSS_NAME[:200]
    trainer = await harness.connect("mallory", greeting)
    component = code_component("xss", XSS_CODE)
    component.name = XSS_NAME[:200]
    message_id = await trainer.send(
        share_code_component=pb.ShareCodeComponent(code_component=component)
    )
    return str((await trainer.receipt(message_id)).resource_id)


async def _number(page: Page, element_id: str) -> int:
    text = await page.text_content(f"#{element_id}")
    return int(text or 0) if (text or "").isdigit() else 0


async def test_the_dashboard_is_live_and_renders_agent_text_inert(
    hub: HubServer, harness: HubHarness, swarm: None, browser: Browser, tmp_path: Path
) -> None:
    token = await hub.issue_token("dash", role=Role.OBSERVER)
    evil_artifact = await _malicious_share(harness)
    await _fail_until(harness, evil_artifact)
    async with dashboard_beside(f"127.0.0.1:{hub.port}", token, 0) as dashboard:
        url = dashboard.url
        # Without the page's CSP, so the test proves the escaping alone keeps markup inert
        # (the CSP is a second wall; its header is checked below). Playwright's polling
        # needs eval, which that CSP forbids.
        page = await browser.new_page(viewport={"width": 1400, "height": 1800}, bypass_csp=True)
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("dialog", lambda d: problems.append(f"dialog: {d.message}"))
        response = await page.goto(url)
        assert response is not None
        assert "script-src 'self'" in response.headers["content-security-policy"]
        await page.evaluate("window.__same_page = true")
        await page.wait_for_function(
            f"Number(document.getElementById('agents-online').textContent) >= {TRAINERS}",
            timeout=BROWSER_WAIT_MS,
        )
        await page.wait_for_selector("#agents-table a", timeout=BROWSER_WAIT_MS)
        first = await _number(page, "patterns") + await _number(page, "head-seq")
        await page.wait_for_function(
            "Number(document.getElementById('patterns').textContent)"
            " + Number(document.getElementById('head-seq').textContent)"
            f" > {first}",
            timeout=BROWSER_WAIT_MS,
        )
        assert await page.evaluate("window.__same_page === true"), "the page reloaded"
        await page.wait_for_function(
            "document.querySelector('#shares-chart') && document.getElementById('feed-status')"
            ".textContent === 'live'",
            timeout=BROWSER_WAIT_MS,
        )
        # The verdict: the Validation panel appears, the failure links to its artifact.
        await page.wait_for_selector("#failures-table a", timeout=BROWSER_WAIT_MS)
        assert not await page.is_hidden("#validation-section")
        assert "failed" in (await page.text_content("#verdicts-table") or "")
        assert await page.text_content("#pass-rate") == "0%"
        failures = await page.text_content("#failures-table") or ""
        assert XSS_DIAGNOSTIC.splitlines()[0] in failures and "second line" not in failures
        assert await page.evaluate("window.__xss === undefined")
        SCREENSHOTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(SCREENSHOTS / "dashboard.png"), full_page=True)

        # The agent page of the top contributor (so it has shared something): what it shared.
        # Its name and link are read at once, and the link clicked by its address: the live
        # table may re-rank its rows between a read and a click.
        top = page.locator("#contributors-table a").first
        name, href = await top.evaluate("a => [a.textContent, a.getAttribute('href')]")
        await page.locator(f"#contributors-table a[href={json.dumps(href)}]").click()
        await page.wait_for_selector("#artifacts-table a", timeout=BROWSER_WAIT_MS)
        assert await page.text_content("#agent-id") == name
        await page.screenshot(path=str(SCREENSHOTS / "dashboard-agent.png"), full_page=True)

        # The malicious artifact: its name and code are text, nothing ran.
        await page.goto(f"{url}artifact/{evil_artifact}")
        await page.wait_for_function(
            "document.getElementById('code').textContent.length > 0", timeout=BROWSER_WAIT_MS
        )
        assert XSS_NAME[:200] in (await page.text_content("#title") or "")
        assert await page.text_content("#code") == XSS_CODE
        assert await page.text_content("#contributor") == "mallory"
        assert await page.text_content("#validation-state") == "failed"
        assert XSS_DIAGNOSTIC in (await page.text_content("#verdict") or "")
        assert await page.evaluate("window.__xss === undefined")
        await page.screenshot(path=str(SCREENSHOTS / "dashboard-artifact.png"), full_page=True)
        # Mallory's page and the main page show its markup as text too.
        await page.goto(f"{url}agent/mallory")
        await page.wait_for_selector("#artifacts-table a", timeout=BROWSER_WAIT_MS)
        assert XSS_NAME[:200] in (await page.text_content("#artifacts-table") or "")
        assert await page.evaluate("window.__xss === undefined")
        await page.close()
    assert problems == [], problems


def test_the_token_file_takes_a_bare_token_or_an_agent_token_line(tmp_path: Path) -> None:
    bare, line, empty = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    bare.write_text("\nkh_abc\n")
    line.write_text("dash kh_def\n")
    empty.write_text("\n")
    assert (read_token(bare), read_token(line)) == ("kh_abc", "kh_def")
    with pytest.raises(ValueError, match="holds no token"):
        read_token(empty)


def test_the_aggregate_stays_bounded_with_many_agents_and_events() -> None:
    """10,000 agents' shares and collaborations: every table within its cap, the snapshot
    the same size as for a handful."""
    aggregate = Aggregate()
    for i in range(60_000):
        event = pb.HubEvent(seq=i + 1, sender_id=f"AI_Node_{i % 10_000}")
        event.create_time.seconds = 1_000_000 + i // 100
        if i % 3:
            event.artifact_shared.pattern.pattern_type = "p"
        else:
            collab = event.collaboration_updated.collaboration
            collab.initiator_id, collab.target_id = f"AI_Node_{i % 10_000}", f"AI_Node_{i % 97}"
            collab.state = pb.COLLABORATION_STATE_PROPOSED
        aggregate.event(event)
    snapshot = aggregate.snapshot(now=1_000_600)
    assert len(aggregate._edges) <= 2000 and len(aggregate._shares) <= 301
    assert len(snapshot["graph"]) == 150 and len(snapshot["recent_events"]) == 20
    assert sum(snapshot["shares"]["by_kind"]["pattern"]) > 0
    assert snapshot["feed"]["last_seq"] == 60_000


def _validated(seq: int, state: int, diagnostics: str = "") -> pb.HubEvent:
    event = pb.HubEvent(seq=seq, sender_id="v1")
    validated = event.artifact_validated
    validated.artifact_id, validated.component_id = f"art_{seq}", f"comp_{seq}"
    validated.contributor_id = f"AI_Node_{seq % 7}"
    validated.verdict.state = state  # type: ignore[assignment]  # a newer hub's number too
    validated.verdict.diagnostics = diagnostics
    return event


def test_the_aggregate_counts_verdicts_and_keeps_the_newest_failures() -> None:
    """Verdict events counted by state (unknown states bounded), the pass rate over those
    judged, the newest failures with their first diagnostic line, truncated."""
    aggregate = Aggregate()
    assert aggregate.snapshot()["validation"]["pass_rate"] is None
    states = [pb.VALIDATION_STATE_PASSED] * 3 + [
        pb.VALIDATION_STATE_FAILED,
        pb.VALIDATION_STATE_UNSUPPORTED,
        pb.VALIDATION_STATE_TIMED_OUT,
        pb.VALIDATION_STATE_ERROR,
    ]
    for i in range(700):
        aggregate.event(_validated(i + 1, states[i % len(states)], f"{'x' * 300}\nline two"))
    for i in range(100):  # states a newer hub may send: counted, but only so many of them
        aggregate.event(_validated(1000 + i, 50 + i))
    validation = aggregate.snapshot()["validation"]
    assert validation["verdicts"] == 700 + 16 - 5
    assert validation["by_state"]["PASSED"] == 300
    assert validation["by_state"]["FAILED"] == validation["by_state"]["ERROR"] == 100
    assert len(validation["by_state"]) == 16
    assert validation["pass_rate"] == 300 / 500  # ERROR and UNSUPPORTED are not judged
    failures = validation["recent_failures"]
    assert len(failures) == RECENT_FAILURES
    assert [f["seq"] for f in failures[:2]] == [700, 699]  # newest first; 700 is ERROR
    assert failures[0]["state"] == "ERROR" and failures[0]["artifact_id"] == "art_700"
    assert failures[0]["diagnostic"] == "x" * 200
    assert {f["state"] for f in failures} == {"FAILED", "ERROR", "TIMED_OUT"}
    assert aggregate.snapshot()["other_events"] == {}


async def test_hub_stats_report_the_commit_queue_and_the_latest_commit(
    hub: HubServer, harness: HubHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Commands held behind a slow commit show as the queue's depth; the latest commit's
    time is reported once it ends. (The gate delays the real store's commit; it fakes none.)"""
    trainer = await harness.connect("AI_Node_1")
    gate, entered = asyncio.Event(), asyncio.Event()
    commit = hub.store.commit

    async def slow_commit(commands: Any) -> Any:
        entered.set()
        await gate.wait()
        return await commit(commands)

    monkeypatch.setattr(hub.store, "commit", slow_commit)
    sent = [
        await trainer.send(
            share_code_component=pb.ShareCodeComponent(code_component=code_component(f"c{i}"))
        )
        for i in range(4)
    ]
    async with asyncio.timeout(WAIT):
        await entered.wait()
        # The first is in the held commit. (The committer's state: no event to wait on.)
        while hub.committer.queued() < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    held = await harness.query("GetHubStats", pb.GetHubStatsRequest())
    assert held.commit_queue_depth >= 3
    gate.set()
    for message_id in sent:
        await trainer.receipt(message_id)
    stats = await harness.query("GetHubStats", pb.GetHubStatsRequest())
    assert stats.last_commit_seconds > 0
    assert stats.commit_queue_depth < held.commit_queue_depth


def test_presence_follows_the_roster_then_its_changes() -> None:
    """The Watch stream's roster (in two parts), then changes; a new roster starts afresh;
    capped."""
    aggregate = Aggregate()
    listed = [pb.AgentInfo(agent_id=f"AI_Node_{i}", online=True) for i in range(3)]
    aggregate.presence(pb.PresenceUpdate(online=listed[:2], roster=True))
    aggregate.presence(pb.PresenceUpdate(online=listed[2:], roster=True, roster_complete=True))
    joined = pb.AgentInfo(agent_id="AI_Node_9", specialization=pb.SPECIALIZATION_GRAPHICS)
    aggregate.presence(pb.PresenceUpdate(online=[joined], offline=["AI_Node_0"]))
    assert sorted(aggregate.online) == ["AI_Node_1", "AI_Node_2", "AI_Node_9"]
    page = aggregate.agents_page(1, 1)
    assert page["total"] == 3 and [a["agent_id"] for a in page["agents"]] == ["AI_Node_2"]
    assert aggregate.snapshot()["online_by_specialization"]["GRAPHICS"] == 1
    many = [pb.AgentInfo(agent_id=f"a{i}") for i in range(MAX_ONLINE + 5)]
    aggregate.presence(pb.PresenceUpdate(online=many, roster=True, roster_complete=True))
    assert len(aggregate.online) == MAX_ONLINE and aggregate.online_truncated
    assert "AI_Node_9" not in aggregate.online, "a new roster replaces the table"


async def test_a_dashboard_with_a_bad_token_says_so(hub: HubServer) -> None:
    async with dashboard_beside(f"127.0.0.1:{hub.port}", "kh_wrong", 0) as dashboard:
        url = dashboard.url

        def feed_error() -> str:
            with urlopen(url + "api/snapshot", timeout=WAIT) as response:
                return str(json.load(response)["feed"]["error"])

        async with asyncio.timeout(WAIT):
            error = await asyncio.to_thread(feed_error)
            while "UNAUTHENTICATED" not in error:  # another process's page: polled
                await asyncio.sleep(0.1)
                error = await asyncio.to_thread(feed_error)
        assert "invalid, expired or revoked token" in error


def _status(url: str, host: str) -> int:
    try:
        with urlopen(Request(url, headers={"Host": host}), timeout=WAIT) as response:
            return int(response.status)
    except HTTPError as error:
        return error.code


async def test_the_dashboard_answers_only_its_own_host_names(hub: HubServer) -> None:
    """A page on another site that rebinds its name to this address sends that name as
    Host: refused, so the dashboard's data stays unread cross-origin."""
    token = await hub.issue_token("dash", role=Role.OBSERVER)
    async with dashboard_beside(f"127.0.0.1:{hub.port}", token, 0) as dashboard:
        port = dashboard.url.rstrip("/").rsplit(":", 1)[1]
        snapshot = dashboard.url + "api/snapshot"
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            assert await asyncio.to_thread(_status, snapshot, host) == 400, host
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
            assert await asyncio.to_thread(_status, snapshot, host) == 200, host


async def test_the_graph_takes_agents_named_like_its_edges(
    hub: HubServer, browser: Browser
) -> None:
    token = await hub.issue_token("dash", role=Role.OBSERVER)
    async with dashboard_beside(f"127.0.0.1:{hub.port}", token, 0) as dashboard:
        page = await browser.new_page(bypass_csp=True)
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(str(e)))
        await page.goto(dashboard.url)
        await page.wait_for_function("typeof drawGraph === 'function'", timeout=BROWSER_WAIT_MS)
        # One call draws and counts: the next snapshot may redraw the graph after it.
        drawn = await page.evaluate(
            "() => { drawGraph([{a: 'e0', b: 'e1', count: 1}, {a: 'e1', b: 'p:0', count: 2}]);"
            " return [graph.nodes().length, graph.edges().length,"
            " graph.nodes().map((n) => n.data('agent')).sort()]; }"
        )
        await page.close()
    assert drawn == [3, 2, ["e0", "e1", "p:0"]], drawn
    assert problems == [], problems
