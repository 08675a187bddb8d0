"""`kernelhub-bench`: run the benchmark suite against in-run baselines, and plot it.

kernelhub-bench run [--quick] [--repeat 3] [--json results.json] [--peers]
                    [--scenarios ingest,fanout,latency,rss,replay] [--profile DIR]
kernelhub-bench run --scenarios peers_latency --peer-rates 200 --peer-duration 20 ...
kernelhub-bench plot results.json docs/latency.png [--peers]
kernelhub-bench markdown results.json
kernelhub-bench hot-spots PROFILE.txt [--top 10] [--by-module]
kernelhub-bench soak [--trainers 200] [--duration 10m] [--rate 0.2] [--restart-every 2m]
kernelhub-bench report-scale [--rows 1000000]
kernelhub-bench join [--events 1000000] [--joins 5] [--json results.json]
kernelhub-bench validation [--quick] [--json results.json]
kernelhub-bench replicas --database-url postgresql+psycopg://postgres@127.0.0.1:5432/postgres
                    [--replicas 0,1,2,3] [--senders 3] [--receivers 30] [--shares 1000] [--json F]
kernelhub-bench replicas --database-url ... --workers 1,2  (one `serve --workers N` per count)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from hub_service.durations import parse_duration

from . import __version__
from .common import median
from .report import (
    breakdown,
    breakdown_table,
    hot_spots,
    hot_spots_table,
    markdown,
    plot_latency,
    plot_peers,
    print_report,
)
from .report_scale import report_scale
from .report_scale import summary as scale_summary
from .runner import (
    DEFAULT_SCENARIOS,
    FULL,
    PEER_SCENARIOS,
    QUICK,
    SCENARIOS,
    RunError,
    other_cores,
    run,
    summarize,
    summarize_peers,
)
from .soak import as_json, report, soak


def _scenarios(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown) or '(none)'}; choose from {','.join(SCENARIOS)}"
        )
    return chosen


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(r) for r in text.split(",") if r.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of rates: {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates must be positive shares/s")
    return rates


def _counts(least: int) -> Callable[[str], list[int]]:
    """A comma-separated list of process counts, each at least `least`."""

    def parse(text: str) -> list[int]:
        try:
            counts = [int(c) for c in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of counts: {text!r}") from None
        if min(counts) < least:
            raise argparse.ArgumentTypeError(f"{text!r}: each count must be {least} or more")
        return counts

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kernelhub-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the benchmarks and their baselines")
    run_parser.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke sizes (N=10, 2,000 events, 50 idle trainers, "
        "5,000 replayed events; repeat 1)",
    )
    run_parser.add_argument("--repeat", type=int, help="runs per figure (default 3; quick: 1)")
    run_parser.add_argument(
        "--connect-trainers",
        type=int,
        metavar="N",
        help="trainers in the connect storm (default 1,000; quick: 100), e.g. 5000",
    )
    run_parser.add_argument(
        "--idle-trainers",
        type=int,
        metavar="N",
        help="idle trainers connected for the RSS figure (default 1,000; quick: 50), e.g. 5000",
    )
    run_parser.add_argument(
        "--interest-trainers",
        type=int,
        metavar="N",
        help="trainers in the interest-filtered fan-out (default 1,000; quick: 16)",
    )
    run_parser.add_argument(
        "--interest-rate",
        type=float,
        metavar="SHARES_PER_S",
        help="the interest-filtered fan-out's fixed offered rate, shares/s in all (default 5: "
        "the load process reads every delivery, and at 1,000 trainers the broadcast run's "
        "5,000 a second leave it room on a slow day of a 2-core machine)",
    )
    run_parser.add_argument("--json", type=Path, help="write the results here")
    run_parser.add_argument(
        "--scenarios",
        type=_scenarios,
        default=list(DEFAULT_SCENARIOS),
        help=f"comma-separated, of {','.join(SCENARIOS)} (default: all but the peers)",
    )
    run_parser.add_argument(
        "--peers",
        action="store_true",
        help=f"also run {','.join(PEER_SCENARIOS)}: kernelhub beside the bare grpc.aio server "
        "and NATS JetStream (its own nats-server -js), at fixed absolute rates",
    )
    run_parser.add_argument(
        "--peer-rates",
        type=_rates,
        help="the peers' offered shares/s, comma-separated (default 20,100,200,400,800; quick: 20)",
    )
    run_parser.add_argument(
        "--peer-duration", type=float, help="seconds per rate and system (default 4; quick 1.5)"
    )
    run_parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record each hub process with py-spy (raw, --threads) into DIR",
    )
    run_parser.add_argument(
        "--profile-gil",
        action="store_true",
        help="with --profile: sample only the thread holding the GIL (where the hub's one "
        "core of Python goes, not the time its threads wait)",
    )
    run_parser.add_argument(
        "--profile-native",
        action="store_true",
        help="with --profile: C frames too (grpc's core and Cython, protobuf's upb), so a "
        "stream write splits into serialization, grpc and the await",
    )
    run_parser.add_argument(
        "--keep-workdir", action="store_true", help="keep the temporary directory (databases, logs)"
    )
    plot_parser = commands.add_parser("plot", help="plot latency against offered load")
    plot_parser.add_argument("results", type=Path)
    plot_parser.add_argument("out", type=Path)
    plot_parser.add_argument(
        "--peers", action="store_true", help="kernelhub beside the bare server and JetStream"
    )
    md = commands.add_parser("markdown", help="the results as Markdown tables (for the docs)")
    md.add_argument("results", type=Path)
    hot = commands.add_parser("hot-spots", help="top self-time frames of a py-spy raw profile")
    hot.add_argument("profile", type=Path)
    hot.add_argument("--top", type=int, default=10)
    hot.add_argument(
        "--by-module",
        action="store_true",
        help="charge each busy sample to the innermost hub module on its stack and to the "
        "layer its leaf runs in (grpc, protobuf, sql, asyncio, hub code...)",
    )
    soak_parser = commands.add_parser(
        "soak", help="many trainers for a long time: hub RSS over time, lost and duplicated events"
    )
    soak_parser.add_argument("--trainers", type=int, default=200)
    soak_parser.add_argument("--duration", type=parse_duration, default=600.0, help="e.g. 10m")
    soak_parser.add_argument(
        "--rate",
        type=float,
        default=0.2,
        help="shares per second per trainer (prototype pace: 0.2)",
    )
    soak_parser.add_argument(
        "--restart-every",
        type=parse_duration,
        help="SIGKILL and restart the hub this often, e.g. 2m",
    )
    soak_parser.add_argument("--sample-every", type=parse_duration, default=10.0)
    soak_parser.add_argument("--json", type=Path, help="write the result here")
    scale = commands.add_parser(
        "report-scale",
        help="the run report's read side on synthetic databases of N/10 and N rows: time and "
        "peak memory as ratios",
    )
    scale.add_argument("--rows", type=int, default=1_000_000, help="the large database's rows")
    board = commands.add_parser(
        "dashboard", help="what kernelhub-dashboard costs a hub with many agents online"
    )
    board.add_argument("--agents", type=int, default=1000)
    board.add_argument("--shares", type=int, default=200, help="shares fanned out per run")
    board.add_argument("--repeat", type=int, default=2, help="runs with the dashboard")
    board.add_argument("--json", type=Path, help="write the result here")
    join_parser = commands.add_parser(
        "join", help="a fresh agent going live from now on a hub with a big event log"
    )
    join_parser.add_argument("--events", type=int, default=1_000_000, help="events in the log")
    join_parser.add_argument("--joins", type=int, default=5, help="measured joins per hub")
    join_parser.add_argument("--json", type=Path, help="write the result here")
    validation = commands.add_parser(
        "validation",
        help="validators: components validated per second (1 and 2 validators), the "
        "sandbox's overhead, share -> verdict time",
    )
    validation.add_argument("--quick", action="store_true", help="smoke sizes (~15 s)")
    validation.add_argument("--json", type=Path, help="write the result here")
    replicas_parser = commands.add_parser(
        "replicas",
        help="aggregate ingest and fan-out of 1, 2, 3 hub replicas on one PostgreSQL, and the "
        "database's cost per event (docs/scaling.md)",
    )
    replicas_parser.add_argument(
        "--database-url",
        required=True,
        help="a PostgreSQL server (any database on it): each replica count gets a fresh database",
    )
    replicas_parser.add_argument(
        "--replicas",
        type=_counts(0),
        default=[0, 1, 2, 3],
        help="replica counts, in turn; 0 is one hub without --replica (the baseline)",
    )
    replicas_parser.add_argument(
        "--workers",
        type=_counts(1),
        help="instead of --replicas: worker counts, in turn, each one `kernelhub-hub serve "
        "--workers N` on one port (1: one plain process, the baseline), a connection per stream",
    )
    replicas_parser.add_argument("--senders", type=int, default=3)
    replicas_parser.add_argument("--receivers", type=int, default=30)
    replicas_parser.add_argument("--shares", type=int, default=1000, help="per sender")
    replicas_parser.add_argument("--json", type=Path, help="write the results here")
    return parser


def _git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _machine() -> dict[str, Any]:
    import grpc
    import psutil

    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "revision": _git_revision(),
    }


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def cmd_run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    sizes = QUICK if args.quick else FULL
    if args.connect_trainers is not None:
        sizes = dataclasses.replace(sizes, connect_trainers=args.connect_trainers)
    if args.idle_trainers is not None:
        sizes = dataclasses.replace(sizes, idle_trainers=args.idle_trainers)
    if args.interest_trainers is not None:
        if args.interest_trainers < 1:
            print("--interest-trainers must be at least 1", file=sys.stderr)
            return 2
        sizes = dataclasses.replace(sizes, interest_receivers=args.interest_trainers)
    if args.interest_rate is not None:
        if args.interest_rate <= 0:
            print("--interest-rate must be positive", file=sys.stderr)
            return 2
        sizes = dataclasses.replace(sizes, interest_rate=args.interest_rate)
    if args.peer_rates:
        sizes = dataclasses.replace(sizes, peer_rates=args.peer_rates)
    if args.peer_duration:
        if args.peer_duration <= 0:
            print("--peer-duration must be positive", file=sys.stderr)
            return 2
        sizes = dataclasses.replace(sizes, peer_duration=args.peer_duration)
    if args.peers:
        args.scenarios += [s for s in PEER_SCENARIOS if s not in args.scenarios]
    repeat = args.repeat or (1 if args.quick else 3)
    if repeat < 1:
        print("--repeat must be at least 1", file=sys.stderr)
        return 2
    console = Console(stderr=True)
    machine = _machine()
    started = datetime.datetime.now(datetime.UTC)
    workdir = Path(tempfile.mkdtemp(prefix="kernelhub-bench-"))
    console.print(
        f"kernelhub-bench {__version__}: {'quick' if args.quick else 'full'} run, "
        f"repeat {repeat}, scenarios {','.join(args.scenarios)}; work dir {workdir}"
    )
    try:
        raw = asyncio.run(
            run(
                sizes,
                repeat,
                args.scenarios,
                workdir,
                args.profile,
                profile_gil=args.profile_gil,
                profile_native=args.profile_native,
                log=lambda line: console.print(line, highlight=False),
            )
        )
    except RunError as error:
        console.print(f"[red]benchmark failed:[/red] {error}")
        console.print(f"the servers' and loads' logs are kept in {workdir}")
        args.keep_workdir = True
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[red]interrupted[/red]; every server and load was stopped")
        return 130
    finally:
        if not args.keep_workdir:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    figures, sweep = summarize(raw, sizes)
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    # CPU that other work on the machine took while we measured (the load competes for it).
    contention = other_cores(raw)
    machine["other_cores_median"] = round(median(contention), 2) if contention else 0.0
    machine["other_cores_max"] = round(max(contention, default=0.0), 2)
    result = {
        "command": "kernelhub-bench " + shlex.join(argv),
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(raw["seconds"], 1),
        "quick": args.quick,
        "repeat": repeat,
        "sizes": dataclasses.asdict(sizes),
        "machine": machine,
        "figures": figures,
        "latency_sweep": sweep,
        "peers": summarize_peers(raw["peers"]),
        "hot_spots": {p: hot_spots(Path(p)) for p in raw["profiles"] if Path(p).exists()},
        "breakdown": {p: breakdown(Path(p)) for p in raw["profiles"] if Path(p).exists()},
        "raw": raw,
    }
    print_report(result, Console())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_clean(result), indent=2) + "\n")
        console.print(f"results written to {args.json}")
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    """Exit 0 only when no event was lost or duplicated and every send was acknowledged."""
    import logging

    logging.basicConfig(level=logging.ERROR)  # reconnect notices would drown the RSS lines
    result = asyncio.run(
        soak(args.trainers, args.duration, args.rate, args.restart_every, args.sample_every)
    )
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(as_json(result), indent=2) + "\n")
    return 0 if result.ok else 1


def cmd_dashboard(args: argparse.Namespace) -> int:
    from .dashboard import as_json, bench_dashboard, report

    result = asyncio.run(bench_dashboard(args.agents, args.shares, args.repeat))
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(as_json(result), indent=2) + "\n")
    return 0


def cmd_replicas(args: argparse.Namespace) -> int:
    from .replicas import report as replicas_report
    from .replicas import run_replicas

    rows = asyncio.run(
        run_replicas(
            args.database_url,
            args.workers or args.replicas,
            args.senders,
            args.receivers,
            args.shares,
            workers=bool(args.workers),
        )
    )
    print(replicas_report(rows))
    print(f"machine: {_machine()}")
    if args.json:
        args.json.write_text(json.dumps({"machine": _machine(), "rows": rows}, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args, argv)
    if args.command == "plot":
        result = json.loads(args.results.read_text())
        if args.peers:
            if not (result.get("peers") or {}).get("points"):
                print("the results have no peers' latency (run with --peers)", file=sys.stderr)
                return 2
            plot_peers(result, args.out)
        elif not result.get("latency_sweep"):
            has_peers = (result.get("peers") or {}).get("points")
            hint = " (this one has the peers': plot --peers)" if has_peers else ""
            print(f"the results have no latency sweep{hint}", file=sys.stderr)
            return 2
        else:
            plot_latency(result, args.out)
        print(f"wrote {args.out}")
        return 0
    if args.command == "soak":
        return cmd_soak(args)
    if args.command == "report-scale":
        if args.rows < 10:
            print("--rows must be at least 10", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory(prefix="kernelhub-report-scale-") as workdir:
            small, large = report_scale(args.rows, Path(workdir))
        print("\n".join(scale_summary(small, large)))
        return 0
    if args.command == "dashboard":
        return cmd_dashboard(args)
    if args.command == "join":
        from .join import run  # imports the SDK and the hub's schema: only when asked

        return run(args.events, args.joins, args.json)
    if args.command == "validation":
        from .validation import print_validation, run_validation

        result = asyncio.run(run_validation(args.quick))
        print_validation(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    if args.command == "replicas":
        return cmd_replicas(args)
    if args.command == "markdown":
        print(markdown(json.loads(args.results.read_text())), end="")
        return 0
    if args.by_module:
        Console().print(breakdown_table(str(args.profile), breakdown(args.profile, args.top)))
    else:
        Console().print(hot_spots_table(str(args.profile), hot_spots(args.profile, args.top)))
    return 0
