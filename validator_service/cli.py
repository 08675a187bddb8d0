"""`kernelhub-validator run`: one validator against a hub, until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from .builder import Builder, BuildLimits
from .sandbox import BWRAP, Limits, Sandbox, SandboxUnavailable
from .worker import Validator

log = logging.getLogger("kernelhub.validator")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelhub-validator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="validate components from a hub until stopped")
    run.add_argument("--hub", default="localhost:50051", help="the hub's host:port")
    run.add_argument(
        "--token-file", type=Path, required=True, help="a file holding a validator's token"
    )
    run.add_argument("--name", default="validator", help="this validator's name in its logs")
    run.add_argument(
        "--no-sandbox",
        action="store_true",
        help="run the code without bubblewrap (rlimits and timeouts only); every verdict says so",
    )
    run.add_argument("--bwrap", default=BWRAP, help="bubblewrap's path")
    run.add_argument("--count", type=int, default=0, help="stop after this many verdicts")
    run.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where scratch dirs go (default: the system's temp dir); run as root, every "
        "directory on its path must be searchable by other uids (o+x): each component runs "
        "as a uid of its own",
    )
    default = BuildLimits()
    run.add_argument("--build-cpu-seconds", type=int, default=default.build.cpu_seconds)
    run.add_argument("--build-wall-seconds", type=float, default=default.build.wall_seconds)
    run.add_argument("--test-cpu-seconds", type=int, default=default.test.cpu_seconds)
    run.add_argument("--test-wall-seconds", type=float, default=default.test.wall_seconds)
    run.add_argument("--memory-mib", type=int, default=default.test.memory_bytes >> 20)
    run.add_argument("--max-processes", type=int, default=default.test.processes)
    run.add_argument(
        "--total-memory-mib",
        type=int,
        default=default.test.total_memory_bytes >> 20,
        help="all of one run's processes together (enforced where cgroups v1 can be divided)",
    )
    run.add_argument("--file-mib", type=int, default=default.test.file_bytes >> 20)
    run.add_argument("--output-kib", type=int, default=default.test.output_bytes >> 10)
    run.add_argument("--disk-mib", type=int, default=default.test.disk_bytes >> 20)
    run.add_argument("--log-level", default="INFO")
    return parser


def limits_from(args: argparse.Namespace) -> BuildLimits:
    common = {
        "memory_bytes": args.memory_mib << 20,
        "processes": args.max_processes,
        "total_memory_bytes": args.total_memory_mib << 20,
        "file_bytes": args.file_mib << 20,
        "output_bytes": args.output_kib << 10,
        "disk_bytes": args.disk_mib << 20,
    }
    return BuildLimits(
        build=Limits(
            cpu_seconds=args.build_cpu_seconds, wall_seconds=args.build_wall_seconds, **common
        ),
        test=Limits(
            cpu_seconds=args.test_cpu_seconds, wall_seconds=args.test_wall_seconds, **common
        ),
    )


async def _run(args: argparse.Namespace) -> int:
    try:
        limits = limits_from(args)
    except ValueError as error:  # processes x memory past the budget
        print(f"kernelhub-validator cannot start: {error}", file=sys.stderr)
        return 1
    sandbox = Sandbox(enabled=not args.no_sandbox, bwrap=args.bwrap)
    try:
        await sandbox.check()
    except SandboxUnavailable as error:
        print(f"kernelhub-validator cannot start: {error}", file=sys.stderr)
        return 1
    if args.no_sandbox:
        log.warning("running WITHOUT a sandbox: the code sees this host (--no-sandbox)")
    token = args.token_file.read_text().strip()
    builder = Builder(sandbox, limits, args.work_dir)
    validator = Validator(args.hub, token, builder, args.name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    counts = await validator.run(stop, args.count)
    print(f"{args.name}: {counts.validated} validated {counts.by_state}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return asyncio.run(_run(args))
