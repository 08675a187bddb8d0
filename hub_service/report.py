"""The run report (`kernelhub-hub report`): a hub's run drawn from its database, as ONE
self-contained HTML file (inline SVG, no network needed to open it, the figures' numbers
embedded as JSON) or as PNG images.

The numbers come from `report_data` through the store's read side; this module only draws
them. matplotlib is the `report` extra (`pip install 'kernelhub[report]'`): a serving hub
never draws, so it is imported only here, only when a report is made.
"""

from __future__ import annotations

import asyncio
import html
import io
import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import make_url
from sqlalchemy.exc import SQLAlchemyError

from generated.kernelhub.v1 import hub_pb2 as pb

from .durations import parse_duration
from .errors import StatusError
from .report_data import DURATION_BINS, ReportData, Window, specialization_name
from .sql_store import SqlStore

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Each figure: its file name (PNG) and element id (HTML), its title, and what it shows.
FIGURES = {
    "shares": ("Shares over time by specialization", "artifacts shared per time bucket"),
    "collaboration-graph": (
        "Who works with whom",
        "collaborations per pair of agents (line width: how many; green: some completed)",
    ),
    "collaboration-durations": (
        "Collaboration durations by outcome",
        "from proposal to the last update, per ended collaboration",
    ),
    "feature-latency": (
        "Feature request to first delivery",
        "how long each request waited for its first delivery",
    ),
    "contributions": ("Contributions per agent", "artifacts by kind, the top contributors"),
    "validation": (
        "Validation outcomes",
        "shared components by their latest verdict (pending: not validated yet)",
    ),
}
SPECIALIZATIONS = [
    specialization_name(v) for v in pb.Specialization.values() if v != pb.SPECIALIZATION_UNSPECIFIED
]
OUTCOME_COLORS = {"completed": "#2ca02c", "declined": "#d62728", "expired": "#7f7f7f"}
KIND_COLORS = {"pattern": "#1f77b4", "code_component": "#ff7f0e", "os_component": "#9467bd"}


class ReportError(Exception):
    """A report that cannot be made: the message says why, in one line."""


# --- the figures ---------------------------------------------------------------


def _matplotlib() -> type[Figure]:
    try:
        import matplotlib
    except ImportError:
        raise ReportError(
            "the report draws with matplotlib, which is not installed: "
            "pip install 'kernelhub[report]'"
        ) from None
    matplotlib.rcParams["svg.hashsalt"] = "kernelhub"  # the same data, the same file
    matplotlib.rcParams["font.size"] = 9
    from matplotlib.figure import Figure

    return Figure


def _color(specialization: str) -> str:
    from matplotlib import colormaps

    index = SPECIALIZATIONS.index(specialization) if specialization in SPECIALIZATIONS else 0
    rgba = colormaps["tab20"](index % 20)
    return "#{:02x}{:02x}{:02x}".format(*(round(c * 255) for c in rgba[:3]))


def _bin_labels() -> list[str]:
    return [f"≤{b:g}s" for b in DURATION_BINS] + [f">{DURATION_BINS[-1]:g}s"]


def _shown_bins(*histograms: list[int]) -> int:
    """Bins up to the last one holding anything (and one more), so short runs are readable."""
    used = [i for counts in histograms for i, n in enumerate(counts) if n]
    return min(len(DURATION_BINS) + 1, max(used, default=0) + 2)


def _shares(ax: Axes, data: ReportData) -> bool:
    shares = data.shares
    if not shares["series"]:
        return False
    width = shares["bucket_seconds"]
    unit, scale = ("min", 60.0) if width >= 60 else ("s", 1.0)
    x = [i * width / scale for i in range(shares["buckets"])]
    bottom = [0] * shares["buckets"]
    for name, counts in shares["series"].items():
        ax.bar(
            x,
            counts,
            width=width / scale * 0.9,
            bottom=bottom,
            label=name,
            color=_color(name),
            align="edge",
        )
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    start = datetime.fromtimestamp(shares["start_epoch"], UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    ax.set_xlabel(f"{unit} since {start} (buckets of {width} s)")
    ax.set_ylabel("artifacts shared")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    return True


def _graph(ax: Axes, data: ReportData) -> bool:
    graph = data.graph
    nodes = sorted(graph["nodes"], key=lambda n: (n["specialization"], n["id"]))
    if not nodes:
        return False
    place = {
        n["id"]: (
            math.cos(2 * math.pi * k / len(nodes)),
            math.sin(2 * math.pi * k / len(nodes)),
        )
        for k, n in enumerate(nodes)
    }
    most = max(e["count"] for e in graph["edges"])
    for edge in graph["edges"]:
        (x1, y1), (x2, y2) = place[edge["a"]], place[edge["b"]]
        ax.plot(
            [x1, x2],
            [y1, y2],
            color="#2ca02c" if edge["completed"] else "#9e9e9e",
            linewidth=0.8 + 3.2 * edge["count"] / most,
            alpha=0.7,
            zorder=1,
        )
    shown: set[str] = set()
    for n in nodes:
        x, y = place[n["id"]]
        first = n["specialization"] not in shown
        shown.add(n["specialization"])
        ax.scatter(
            [x],
            [y],
            s=120,
            color=_color(n["specialization"]),
            edgecolors="black",
            linewidths=0.5,
            zorder=2,
            label=n["specialization"] if first else None,
        )
        if len(nodes) <= 40:
            side = "left" if x > 0.3 else "right" if x < -0.3 else "center"
            ax.annotate(n["id"], (x, y), xytext=(x * 1.1, y * 1.1), fontsize=7, ha=side)
    ax.set_xlim(-1.45, 1.45)
    ax.set_ylim(-1.3, 1.3)
    ax.set_aspect("equal")
    ax.axis("off")
    hidden = graph["pairs_total"] - len(graph["edges"])
    if hidden > 0:
        ax.set_title(
            f"the {len(graph['edges'])} busiest pairs of {graph['pairs_total']}", fontsize=8
        )
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(-0.05, -0.1))
    return True


def _durations(ax: Axes, data: ReportData) -> bool:
    outcomes = {k: v for k, v in data.durations["by_outcome"].items() if v["count"]}
    if not outcomes:
        return False
    labels = _bin_labels()[: _shown_bins(*(h["counts"] for h in outcomes.values()))]
    width = 0.8 / len(outcomes)
    for i, (name, histogram) in enumerate(outcomes.items()):
        ax.bar(
            [j + i * width for j in range(len(labels))],
            histogram["counts"][: len(labels)],
            width=width,
            color=OUTCOME_COLORS.get(name, "#1f77b4"),
            label=f"{name} ({histogram['count']}, mean {histogram['mean_seconds']:.2f} s)",
        )
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=45, ha="right"
    )
    ax.set_ylabel("collaborations")
    ax.legend(fontsize=7)
    return True


def _feature_latency(ax: Axes, data: ReportData) -> bool:
    latency = data.feature_latency
    if not latency["count"] and not latency["undelivered"]:
        return False
    labels = _bin_labels()[: _shown_bins(latency["counts"])]
    ax.bar(range(len(labels)), latency["counts"][: len(labels)], color="#17becf")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_ylabel("feature requests")
    ax.set_title(
        f"{latency['count']} delivered (mean {latency['mean_seconds']:.2f} s, max "
        f"{latency['max_seconds']:.2f} s); {latency['undelivered']} never delivered",
        fontsize=8,
    )
    return True


def _contributions(ax: Axes, data: ReportData) -> bool:
    agents = data.contributions["agents"]
    if not agents:
        return False
    rows = list(reversed(agents))  # the top contributor on top
    names = [f"{a['agent_id']} ({a['specialization']})" for a in rows]
    left = [0] * len(rows)
    kinds = sorted({kind for a in rows for kind in a["by_kind"]})
    for kind in kinds:
        counts = [a["by_kind"].get(kind, 0) for a in rows]
        ax.barh(names, counts, left=left, label=kind, color=KIND_COLORS.get(kind, "#8c564b"))
        left = [a + b for a, b in zip(left, counts, strict=True)]
    ax.set_xlabel("artifacts")
    others = data.contributions["others"]
    if others:
        ax.set_title(
            f"{others} more artifacts from {data.contributions['contributors_total'] - len(agents)} "
            "other agents",
            fontsize=8,
        )
    ax.legend(fontsize=7, loc="lower right")
    return True


STATE_COLORS = {
    "passed": "#2ca02c",
    "failed": "#d62728",
    "timed_out": "#ff7f0e",
    "error": "#7f7f7f",
    "unsupported": "#bcbd22",
    "pending": "#1f77b4",
}


def _validation(ax: Axes, data: ReportData) -> bool:
    if data.validation is None:
        return False
    states = sorted(data.validation["by_state"].items())
    ax.bar(
        [state for state, _ in states],
        [n for _, n in states],
        color=[STATE_COLORS.get(state, "#8c564b") for state, _ in states],
    )
    ax.set_ylabel("components")
    rate = data.validation["pass_rate"]
    ax.set_title(
        "none judged yet" if rate is None else f"{rate:.0%} of those judged passed", fontsize=8
    )
    return True


DRAW: dict[str, Callable[[Axes, ReportData], bool]] = {
    "shares": _shares,
    "collaboration-graph": _graph,
    "collaboration-durations": _durations,
    "feature-latency": _feature_latency,
    "contributions": _contributions,
    "validation": _validation,
}


def figures(data: ReportData) -> dict[str, Figure | None]:
    """Each figure, or None where the run has no data for it."""
    figure_class = _matplotlib()
    drawn: dict[str, Figure | None] = {}
    for name, draw in DRAW.items():
        tall = name in ("collaboration-graph", "contributions")
        figure = figure_class(figsize=(7.5, 6.0 if tall else 4.2), layout="constrained")
        ax = figure.add_subplot()
        figure.suptitle(FIGURES[name][0])
        drawn[name] = figure if draw(ax, data) else None
    return drawn


# --- the outputs -----------------------------------------------------------------


def _svg(figure: Figure) -> str:
    out = io.StringIO()
    figure.savefig(out, format="svg", metadata={"Date": None})
    text = out.getvalue()
    return text[text.index("<svg") :]  # no XML prolog or DOCTYPE inside HTML


STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-bottom: 0.2em; }
table { border-collapse: collapse; } td, th { padding: 0.2em 0.8em; text-align: left; }
tr:nth-child(even) { background: #f4f4f4; }
.figure { margin: 2em 0; } .figure svg { max-width: 100%; height: auto; }
.empty { color: #777; font-style: italic; } .caption { color: #555; margin-top: 0; }
"""


def render_html(data: ReportData, title: str = "kernelhub run report") -> str:
    """One HTML file, nothing to fetch: inline SVG, inline CSS, the numbers as JSON."""
    drawn = figures(data)
    totals = data.totals
    rows = [
        ("agents known", totals["agents"]),
        *((f"artifacts: {kind}", n) for kind, n in totals["artifacts"].items()),
        *((f"collaborations: {state}", n) for state, n in totals["collaborations"].items()),
        ("feature requests", totals["feature_requests"]),
        ("feature deliveries", totals["feature_deliveries"]),
        ("first share", totals["first_share"] or "none"),
        ("last share", totals["last_share"] or "none"),
        ("window", f"{data.window['since'] or 'the start'} to {data.window['until'] or 'the end'}"),
    ]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<table id="totals">',
        *(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows),
        "</table>",
    ]
    for name, figure in drawn.items():
        heading, caption = FIGURES[name]
        parts.append(f'<section class="figure" id="fig-{name}"><h2>{html.escape(heading)}</h2>')
        parts.append(f'<p class="caption">{html.escape(caption)}</p>')
        parts.append(_svg(figure) if figure is not None else '<p class="empty">no data</p>')
        parts.append("</section>")
    # The figures' numbers, for whoever wants them exactly (a test, a script); < > & as JSON
    # escapes, so no string in the data can end (or, with "<!--", derail) the script element.
    embedded = (
        json.dumps(data.as_json(), sort_keys=True)
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )
    parts.append(f'<script type="application/json" id="report-data">{embedded}</script>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_png(data: ReportData, directory: Path) -> list[Path]:
    """Each figure that has data as DIRECTORY/NAME.png; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in figures(data).items():
        if figure is not None:
            path = directory / f"{name}.png"
            figure.savefig(path, format="png", dpi=110, metadata={"Software": None})
            written.append(path)
    return written


# --- reading the database ---------------------------------------------------------


def parse_moment(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC unless it says otherwise), or a duration meaning that long ago
    (`2h`, `30m`); in UTC."""
    now = now or datetime.now(UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:
            moment = now - timedelta(seconds=parse_duration(text))
        except Exception:
            raise ReportError(
                f"{text!r} is neither an ISO 8601 time (2026-12-02T10:00:00Z) nor a duration "
                "(2h, 30m)"
            ) from None
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


async def read(database_url: str, window: Window) -> ReportData:
    """The report's numbers, read from the database (never written to, never upgraded)."""
    if database_url.startswith("memory:"):
        raise ReportError(
            "an in-memory hub keeps nothing to report on: give --db or --database-url"
        )
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and not await asyncio.to_thread(
        Path(url.database or "").is_file
    ):
        # Else SQLite would make an empty file there, and the report would say nothing.
        raise ReportError(f"no database at {url.database or '(none given)'}")
    store = SqlStore(database_url, writer="thread", auto_upgrade=False)
    try:
        return await store.report_data(window)
    except StatusError as error:
        raise ReportError(error.message) from None
    except SQLAlchemyError as error:  # e.g. a database that is not a kernelhub one
        first = str(getattr(error, "orig", error) or error).splitlines()[0]
        raise ReportError(f"cannot read the database: {first}") from None
    finally:
        await store.close()


async def write_report(
    database_url: str, out: Path, fmt: str = "html", window: Window | None = None
) -> list[Path]:
    """Read the database, draw, write `out` (a file for html, a directory for png)."""
    data = await read(database_url, window or Window())
    # Drawing takes a CPU second or so: off the event loop (a swarm's hub may still serve).
    try:
        return await asyncio.to_thread(write, data, out, fmt)
    except OSError as error:
        raise ReportError(f"cannot write {out}: {error.strerror or error}") from None


def write(data: ReportData, out: Path, fmt: str = "html") -> list[Path]:
    """Draw `data` into `out`: an HTML file, or a directory of PNGs."""
    if fmt == "png":
        return write_png(data, out)
    document = render_html(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document)
    return [out]


def embedded_data(document: str) -> dict[str, Any]:
    """The numbers a report embeds (what a test or script reads back)."""
    found = re.search(
        r'<script type="application/json" id="report-data">(.*?)</script>', document, re.S
    )
    if found is None:
        raise ReportError("no report data in this document")
    data: dict[str, Any] = json.loads(found.group(1))
    return data
