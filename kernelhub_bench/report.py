"""Presenting a run: the rich table, the latency plot, and py-spy's hottest frames."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _number(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit in ("ms", "KiB", "s", "µs", "cores"):
        return f"{value:,.2f} {unit}" if value < 100 else f"{value:,.0f} {unit}"
    if unit == "us":
        return f"{value:,.0f} µs"
    return f"{value:,.0f}/s"


def figures_table(figures: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("figure")
    table.add_column("kernelhub", justify="right")
    table.add_column("baseline", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("target")
    table.add_column("met")
    for f in figures:
        met = "-" if f["met"] is None else ("yes" if f["met"] else "NO")
        table.add_row(
            f["figure"],
            _number(f["kernelhub"], f["unit"]),
            f"{_number(f['baseline'], f['unit'])} ({f['baseline_name']})",
            f"{f['ratio']:.2f}x",
            f["target"],
            met,
        )
    return table


def sweep_table(sweep: dict[str, Any]) -> Table:
    table = Table(
        title=f"latency sweep, N={sweep['receivers']} trainers "
        f"(hub max {sweep['max_shares_per_s']:,.0f} shares/s)",
        title_justify="left",
    )
    for column in (
        "offered load",
        "shares/s",
        "deliveries/s",
        "kernelhub p50",
        "kernelhub p99",
        "bare p50",
        "bare p99",
    ):
        table.add_column(column, justify="right")
    for p in sweep["points"]:
        table.add_row(
            f"{p['fraction']:.0%}",
            f"{p['offered_shares_per_s']:,.0f}",
            f"{p['offered_deliveries_per_s']:,.0f}",
            f"{p['kernelhub_p50_ms']:.2f} ms",
            f"{p['kernelhub_p99_ms']:.2f} ms",
            f"{p['baseline_p50_ms']:.2f} ms",
            f"{p['baseline_p99_ms']:.2f} ms",
        )
    return table


PEER_SYSTEMS = (("kernelhub", "kernelhub"), ("bare", "bare grpc.aio"), ("jetstream", "JetStream"))


def peers_table(peers: dict[str, Any]) -> Table:
    """Per offered rate: each system's p50/p99 and its server's / load's cores, and
    kernelhub's ratios to the bare server and to JetStream."""
    table = Table(
        title=f"beside the peers, N={peers['receivers']} receivers, one sender (medians; "
        "cores: server/load/other work)",
        title_justify="left",
    )
    table.add_column("shares/s", justify="right")
    for _, label in PEER_SYSTEMS:
        table.add_column(f"{label} p50/p99 ms", justify="right")
        table.add_column("cores", justify="right")
    table.add_column("x bare p50/p99", justify="right")
    table.add_column("x JetStream p50/p99", justify="right")
    for p in peers["points"]:
        cells = [f"{p['offered_shares_per_s']:,.0f}"]
        for key, _ in PEER_SYSTEMS:
            cells.append(f"{p[key + '_p50_ms']:.1f} / {p[key + '_p99_ms']:.1f}")
            cells.append(_cores(p, key))
        cells.append(f"{p['p50_vs_bare']:.2f} / {p['p99_vs_bare']:.2f}")
        cells.append(f"{p['p50_vs_jetstream']:.2f} / {p['p99_vs_jetstream']:.2f}")
        table.add_row(*cells)
    return table


def _cores(point: dict[str, Any], system: str) -> str:
    return "/".join(f"{point[f'{system}_{k}_cores']:.2f}" for k in ("server", "client", "other"))


def print_report(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    mode = "quick" if result["quick"] else "full"
    title = (
        f"kernelhub benchmarks ({mode}, median of {result['repeat']} runs; "
        "ratio: median of the per-run kernelhub / baseline ratios)"
    )
    console.print(figures_table(result["figures"], title))
    if result.get("latency_sweep"):
        console.print(sweep_table(result["latency_sweep"]))
    peers = result.get("peers") or {}
    if peers.get("points"):
        console.print(peers_table(peers))
    if peers.get("skipped"):
        console.print(f"peers skipped: {peers['skipped']}")
    for path, spots in result.get("hot_spots", {}).items():
        console.print(hot_spots_table(path, spots))
    for path, spots in result.get("breakdown", {}).items():
        console.print(breakdown_table(path, spots))


def hot_spots_table(path: str, spots: dict[str, Any]) -> Table:
    threads = ", ".join(f"{name} {share:.0%}" for name, share in spots["threads"].items())
    table = Table(
        title=f"top self-time frames in the hub ({path}; busy samples by thread: {threads})",
        title_justify="left",
    )
    table.add_column("share of busy samples", justify="right")
    table.add_column("frame")
    for frame, share in spots["top"]:
        table.add_row(f"{share:.1%}", frame)
    return table


def plot_peers(result: dict[str, Any], out: Path) -> None:
    """p50/p99 share->delivery latency against the absolute offered rate, every system."""
    import matplotlib  # lazily: only `plot` needs it (the `bench` extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peers = result["peers"]
    points = peers["points"]
    x = [p["offered_shares_per_s"] for p in points]
    figure, axes = plt.subplots(figsize=(8, 5), dpi=110)
    colors = {"kernelhub": "tab:blue", "bare": "tab:gray", "jetstream": "tab:orange"}
    for key, label in PEER_SYSTEMS:
        for q, style in (("p50", "o-"), ("p99", "s--")):
            axes.plot(
                x,
                [p[f"{key}_{q}_ms"] for p in points],
                style,
                color=colors[key],
                label=f"{label} {q}",
            )
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xticks(x, [f"{v:g}" for v in x])
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(ScalarFormatter())
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel(f"offered load, shares/s (each delivered to {peers['receivers']} receivers)")
    axes.set_ylabel("share -> delivery latency, ms")
    title = f"share->delivery latency beside the peers, {peers['receivers']} receivers"
    machine = result.get("machine", {})
    if "other_cores_median" in machine:
        title += (
            f"\n{machine.get('cpus')} cores; other work on the machine took "
            f"{machine['other_cores_median']:.2f} cores (median) while measuring"
        )
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, ncol=3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)


def plot_latency(result: dict[str, Any], out: Path) -> None:
    """p50/p99 share->delivery latency against offered load, kernelhub and the bare baseline."""
    import matplotlib  # lazily: only `plot` needs it (the `bench` extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = result.get("latency_sweep")
    if not sweep:
        raise ValueError("the results have no latency sweep (run the latency scenario)")
    points = sweep["points"]
    x = [p["offered_shares_per_s"] for p in points]
    figure, axes = plt.subplots(figsize=(8, 5), dpi=110)
    axes.plot(
        x, [p["kernelhub_p50_ms"] for p in points], "o-", color="tab:blue", label="kernelhub p50"
    )
    axes.plot(
        x, [p["kernelhub_p99_ms"] for p in points], "s--", color="tab:blue", label="kernelhub p99"
    )
    axes.plot(
        x,
        [p["baseline_p50_ms"] for p in points],
        "o-",
        color="tab:gray",
        label="bare grpc.aio fan-out p50",
    )
    axes.plot(
        x,
        [p["baseline_p99_ms"] for p in points],
        "s--",
        color="tab:gray",
        label="bare grpc.aio fan-out p99",
    )
    axes.axhline(10.0, color="tab:red", linewidth=0.8, linestyle=":", label="target: p99 <= 10 ms")
    half = 0.5 * sweep["max_shares_per_s"]
    axes.axvline(
        half,
        color="tab:green",
        linewidth=0.8,
        linestyle=":",
        label=f"50% of hub max ({half:,.0f} shares/s)",
    )
    axes.set_yscale("log")
    axes.set_xlabel(f"offered load, shares/s (each delivered to {sweep['receivers']} trainers)")
    axes.set_ylabel("share -> delivery latency, ms")
    title = f"kernelhub share->delivery latency, {sweep['receivers']} trainers"
    machine = result.get("machine", {})
    if "other_cores_median" in machine:
        title += (
            f"\n{machine.get('cpus')} cores; other work on the machine took "
            f"{machine['other_cores_median']:.2f} cores (median) while measuring"
        )
    axes.set_title(title, fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)
    plt.close(figure)


_THREAD = re.compile(r"^thread \((?:\d+|0x[0-9A-Fa-f]+)\):? ?(.*)$")
_PROCESS = re.compile(r"^process \d+:")
_FRAME_FILE = re.compile(r"\(([^()]*?)(?::\d+)?\)$")
# Leaf frames that are a thread waiting, not working: py-spy cannot always tell them apart
# (a thread blocked in C with the GIL released looks busy), so they are left out by name.
IDLE_FRAMES = (
    "EpollSelector.select (",  # the event loop waiting for I/O
    "_worker (concurrent/futures/thread.py",  # a pool thread waiting for work
    "Thread.run (threading.py",  # grpc's completion-queue poller, waiting in C
    "Condition.wait (",
    "Event.wait (",
)


def split_stack(stack: str) -> tuple[str, list[str]]:
    """A py-spy raw stack (`--threads`, maybe `--subprocesses`) as (thread, frames): the
    thread's name, prefixed "child process" for a child's (the hub's writer), and its Python
    frames (process command lines, which may hold semicolons themselves, left out)."""
    parts = stack.split(";")
    marks = [i for i, part in enumerate(parts) if _THREAD.match(part)]
    if not marks:
        return "?", [p for p in parts if _FRAME_FILE.search(p) and not _PROCESS.match(p)]
    at = marks[-1]
    match = _THREAD.match(parts[at])
    name = (match.group(1) if match else "").strip().strip("()") or "?"
    if sum(1 for part in parts[:at] if _PROCESS.match(part)) > 1:
        name = f"child process {name}"
    return name, parts[at + 1 :]


def hot_spots(path: Path, top: int = 10) -> dict[str, Any]:
    """The frames with the most self time in a py-spy `-f raw --threads` profile (collapsed
    stacks), waiting frames (IDLE_FRAMES) left out: shares of the busy samples, overall and
    per thread."""
    self_time: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = busy = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        thread, frames = split_stack(stack)
        if not frames or frames[-1].startswith(IDLE_FRAMES):
            continue
        busy += samples
        self_time[frames[-1]] += samples
        threads[thread] += samples
    return {
        "samples": total,
        "busy_samples": busy,
        "threads": {t: n / busy for t, n in threads.most_common()} if busy else {},
        "top": [[frame, n / busy] for frame, n in self_time.most_common(top)] if busy else [],
    }


# What a busy sample was running: the innermost frame on its stack whose file names one of
# these (first match wins). Frames of libc or the interpreter name none, so a syscall or an
# allocation counts for the library that made it (with `--native`; without, C code is
# invisible and counts for the Python line that called it).
LAYERS = (
    ("grpc", ("grpc/", "cygrpc")),
    ("protobuf", ("google/protobuf", "google/_upb", "_message.abi3")),
    ("sql", ("sqlalchemy/", "sqlmodel/", "sqlite3/", "psycopg/", "_sqlite")),
    ("pickle / pipe", ("pickle", "multiprocessing/", "copyreg")),
    ("asyncio", ("asyncio/", "_asynciomodule")),
    ("hub code", ("hub_service/",)),
    ("generated", ("generated/",)),
    ("logging", ("logging/",)),
)


# The event loop dispatching: what runs below these frames is a callback or a task step.
LOOP_FRAMES = ("Handle._run (asyncio/events.py", "BaseEventLoop._run_once (asyncio/")


def _frame_file(frame: str) -> str:
    match = _FRAME_FILE.search(frame)
    return match.group(1) if match else frame


def _layer(frames: list[str]) -> str:
    for frame in reversed(frames):
        path = _frame_file(frame)
        for name, marks in LAYERS:
            if any(mark in path for mark in marks):
                return name
    return "other"


def breakdown(path: Path, top: int = 12) -> dict[str, Any]:
    """Where a py-spy raw profile's busy samples go (waiting frames left out, as in
    hot_spots): each sample is charged to the innermost hub_service module on its stack
    (whose call it was: connection.py writing, router.py routing, ...) and to the layer it
    runs in (LAYERS: grpc, protobuf, sql, asyncio, the hub's own code, ...)."""
    modules: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    pairs: Counter[str] = Counter()
    busy = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        _, frames = split_stack(stack)
        if not frames or frames[-1].startswith(IDLE_FRAMES):
            continue
        samples = int(count)
        busy += samples
        # Only frames the event loop called count as owners: below the last loop frame, the
        # hub's entry point (cli.py running the loop) would own the loop's own work.
        loop = max((i for i, f in enumerate(frames) if f.startswith(LOOP_FRAMES)), default=-1)
        owner = next(
            (
                _frame_file(f).rsplit("hub_service/", 1)[1]
                for f in reversed(frames[loop + 1 :])
                if "hub_service/" in _frame_file(f)
            ),
            "(the event loop itself)" if loop >= 0 else "(no hub frame)",
        )
        layer = _layer(frames)
        modules[owner] += samples
        layers[layer] += samples
        pairs[f"{owner} -> {layer}"] += samples

    def shares(counter: Counter[str]) -> list[list[Any]]:
        return [[k, n / busy] for k, n in counter.most_common(top)] if busy else []

    return {
        "busy_samples": busy,
        "by_module": shares(modules),
        "by_layer": shares(layers),
        "by_module_and_layer": shares(pairs),
    }


def breakdown_table(path: str, spots: dict[str, Any]) -> Table:
    table = Table(
        title=f"where the hub's busy samples go ({path}, {spots['busy_samples']:,} samples)",
        title_justify="left",
    )
    for column in ("hub module (innermost on the stack)", "share", "layer", "share"):
        table.add_column(column, justify="right" if column == "share" else "left")
    table.add_column("module -> layer")
    table.add_column("share", justify="right")
    rows = max(len(spots["by_module"]), len(spots["by_module_and_layer"]))
    for i in range(rows):
        cells: list[str] = []
        for key in ("by_module", "by_layer", "by_module_and_layer"):
            entries = spots[key]
            cells += [entries[i][0], f"{entries[i][1]:.1%}"] if i < len(entries) else ["", ""]
        table.add_row(*cells)
    return table


def markdown(result: dict[str, Any]) -> str:
    """The figures, the latency sweep and the hot spots as Markdown tables (for the docs)."""
    lines = [
        "| figure | kernelhub | baseline | ratio | target | met |",
        "| --- | ---: | ---: | ---: | --- | --- |",
    ]
    for f in result["figures"]:
        met = "-" if f["met"] is None else ("**yes**" if f["met"] else "**no**")
        runs = ", ".join(_number(v, f["unit"]) for v in f["runs"]["kernelhub"])
        lines.append(
            f"| {f['figure']} | {_number(f['kernelhub'], f['unit'])} <br><sub>runs: {runs}</sub> "
            f"| {_number(f['baseline'], f['unit'])} <br><sub>{f['baseline_name']}</sub> "
            f"| {f['ratio']:.2f}x | {f['target']} | {met} |"
        )
    sweep = result.get("latency_sweep")
    if sweep:
        lines += [
            "",
            f"Latency sweep, N={sweep['receivers']} trainers; the hub's own max: "
            f"{sweep['max_shares_per_s']:,.0f} shares/s (median of the runs):",
            "",
            "| offered load | shares/s | deliveries/s | kernelhub p50 | kernelhub p99 "
            "| bare p50 | bare p99 | other work (cores) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in sweep["points"]:
            lines.append(
                f"| {p['fraction']:.0%} | {p['offered_shares_per_s']:,.0f} "
                f"| {p['offered_deliveries_per_s']:,.0f} | {p['kernelhub_p50_ms']:.1f} ms "
                f"| {p['kernelhub_p99_ms']:.1f} ms | {p['baseline_p50_ms']:.1f} ms "
                f"| {p['baseline_p99_ms']:.1f} ms | {p.get('other_cores', 0.0):.2f} |"
            )
    peers = result.get("peers") or {}
    if peers.get("points"):
        lines += [
            "",
            f"Beside the peers, N={peers['receivers']} receivers, one sender (medians of the "
            "runs; cores: server / load / other work on the machine):",
            "",
            "| shares/s | kernelhub p50 / p99 | cores | bare grpc.aio p50 / p99 | cores "
            "| JetStream p50 / p99 | cores | kernelhub / bare | kernelhub / JetStream |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in peers["points"]:
            cells = [f"{p['offered_shares_per_s']:,.0f}"]
            for key, _ in PEER_SYSTEMS:
                cells.append(f"{p[key + '_p50_ms']:.1f} / {p[key + '_p99_ms']:.1f} ms")
                cells.append(_cores(p, key))
            cells.append(f"{p['p50_vs_bare']:.2f}x / {p['p99_vs_bare']:.2f}x")
            cells.append(f"{p['p50_vs_jetstream']:.2f}x / {p['p99_vs_jetstream']:.2f}x")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
