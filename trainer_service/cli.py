"""`kernelhub-trainer`: run one trainer against a hub, or a swarm of them.

Exit codes: 0 success, 1 fatal hub error (one line on stderr, no traceback),
2 usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

import grpc
from rich.console import Console
from rich.logging import RichHandler

from hub_service.durations import positive_duration
from trainer_service import __version__
from trainer_service.sdk.client import DEFAULT_TARGET
from trainer_service.sdk.errors import HubError
from trainer_service.sdk.targets import parse_hub_target
from trainer_service.simulation.behavior import Behavior, load_behavior
from trainer_service.simulation.capabilities import SPECIALIZATION_NAMES, parse_specialization
from trainer_service.simulation.dashboard import OBSERVER, DashboardUnavailable, dashboard_beside
from trainer_service.simulation.swarm import (
    MAX_REPLICAS,
    MAX_SWARM_SIZE,
    REPLICAS_NEED_POSTGRESQL,
    EmbeddedHubUnavailable,
    SwarmResult,
    agent_ids,
    embedded_hub,
    run_swarm,
    summary_tables,
    validator_ids,
    validator_processes,
)
from trainer_service.simulation.trainer import NetworkedKernelTrainer, TrainingMetrics

EXIT_OK: Final = 0
EXIT_FATAL: Final = 1
EXIT_USAGE: Final = 2

TOKEN_ENV: Final = "KERNELHUB_TOKEN"
HUB_ENV: Final = "KERNELHUB_HUB"
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT: Final = "%(asctime)s - %(agent_id)s - %(levelname)s - %(message)s"


class UsageError(Exception):
    """Bad input discovered after parsing (unreadable token file, ...): exit 2."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def _count(maximum: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 1 to `maximum`."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not 1 <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be between 1 and {maximum}, got {value}")
        return value

    return count


_swarm_count = _count(MAX_SWARM_SIZE)
_replica_count = _count(MAX_REPLICAS)


def _checked(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type: the text as given, once `parse` accepts it (so a typo is a usage
    error with the parser's reason)."""

    def check(text: str) -> str:
        try:
            parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


# One hub, or several replicas of one.
_hub_address = _checked(parse_hub_target)
_specialization = _checked(parse_specialization)


def read_token_file(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read token file {path}: {exc.strerror or exc}") from exc
    if not token or any(c.isspace() for c in token):
        raise UsageError(f"token file {path} must hold exactly one token")
    return token


def read_tokens_file(path: Path) -> dict[str, str]:
    """Lines `agent_id token`; blank lines and `#` comments are ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read tokens file {path}: {exc.strerror or exc}") from exc
    tokens: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2:
            raise UsageError(
                f"{path}:{number}: expected `agent_id token`, got {len(fields)} fields"
            )
        agent_id, token = fields
        if agent_id in tokens:
            raise UsageError(f"{path}:{number}: {agent_id} appears twice")
        tokens[agent_id] = token
    return tokens


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS from --tls-ca; mutual TLS when --tls-cert and --tls-key are given too."""
    ca_file, cert_file, key_file = args.tls_ca, args.tls_cert, args.tls_key
    if (cert_file is None) != (key_file is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if ca_file is None:
        if cert_file is not None:
            raise UsageError("--tls-cert needs --tls-ca (the CA that signed the hub's certificate)")
        return None

    def read(path: Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca_file),
        private_key=read(key_file),
        certificate_chain=read(cert_file),
    )


def _behavior_factory(spec: str | None) -> Callable[[], Behavior] | None:
    if spec is None:
        return None
    try:
        load_behavior(spec)  # fail at startup, not inside every trainer
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    return lambda: load_behavior(spec)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kernelhub-trainer",
        description="Simulated AI trainers that build OS components together through a kernelhub.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser, default_duration: str) -> None:
        sub.add_argument(
            "--duration",
            type=positive_duration,
            default=positive_duration(default_duration),
            help=f"how long to train: 30s, 5m, 1h or seconds (default {default_duration})",
        )
        sub.add_argument("--seed", type=int, default=0, help="seed for every random choice")
        sub.add_argument(
            "--tempo",
            type=_positive_float,
            default=1.0,
            help="speed-up factor for every pause (default 1; 10 runs ten times faster)",
        )
        sub.add_argument(
            "--behavior",
            metavar="MODULE:CLASS",
            help="decision logic to use instead of the simulation, e.g. mypkg.brain:Brain",
        )
        sub.add_argument(
            "--tls-ca", type=Path, metavar="FILE", help="PEM CA bundle: connect with TLS"
        )
        sub.add_argument(
            "--tls-cert", type=Path, metavar="FILE", help="client certificate (mutual TLS)"
        )
        sub.add_argument("--tls-key", type=Path, metavar="FILE", help="client private key")
        sub.add_argument(
            "--subscribe",
            choices=("interests", "all"),
            default="interests",
            help="what each trainer receives: `interests` (default), shares and requests of "
            "its specialization and those that complement it, plus what is addressed to it; "
            "`all`: everything, as before subscriptions",
        )

    run = commands.add_parser("run", help="run one trainer against a hub")
    run.add_argument("--id", required=True, dest="agent_id", help="agent id, e.g. AI_Node_1")
    run.add_argument(
        "--specialization",
        required=True,
        type=_specialization,
        metavar="NAME",
        help="one of: " + ", ".join(SPECIALIZATION_NAMES),
    )
    run.add_argument(
        "--hub",
        type=_hub_address,
        default=os.environ.get(HUB_ENV, DEFAULT_TARGET),
        metavar="HOST:PORT",
        help=f"hub address (default ${HUB_ENV} or {DEFAULT_TARGET}); several replicas of one "
        "hub as IP:PORT,IP:PORT or dns:///NAME:PORT: the trainer fails over between them",
    )
    token = run.add_mutually_exclusive_group()
    token.add_argument("--token", help=f"bearer token (default ${TOKEN_ENV})")
    token.add_argument("--token-file", type=Path, metavar="FILE", help="file holding the token")
    run.add_argument(
        "--log-level", type=str.upper, choices=LOG_LEVELS, default="INFO", help="default INFO"
    )
    common(run, "5m")

    swarm = commands.add_parser("swarm", help="run N trainers in one process, with live progress")
    swarm.add_argument(
        "--count", type=_swarm_count, required=True, help="number of trainers, AI_Node_1..N"
    )
    swarm.add_argument(
        "--hub",
        type=_hub_address,
        metavar="HOST:PORT",
        help="use this hub (needs --tokens-file); without it the swarm runs its own. Several "
        "replicas of one hub as IP:PORT,IP:PORT or dns:///NAME:PORT: the trainers spread "
        "over them and fail over between them",
    )
    swarm.add_argument(
        "--tokens-file", type=Path, metavar="FILE", help="lines `agent_id token` for --hub"
    )
    swarm.add_argument(
        "--db", type=Path, metavar="PATH", help="SQLite file for the embedded hub (default: temp)"
    )
    swarm.add_argument(
        "--database-url",
        metavar="URL",
        help="database for the embedded hub instead of --db, e.g. postgresql+psycopg://..."
        " (--replicas needs one)",
    )
    swarm.add_argument(
        "--replicas",
        type=_replica_count,
        metavar="N",
        help="run the embedded hub as N replica processes on --database-url (PostgreSQL) and "
        "spread the trainers over them",
    )
    swarm.add_argument(
        "--report",
        type=Path,
        metavar="FILE",
        help="at the end, write the run report (one self-contained HTML file) from the "
        "embedded hub's database (needs the report extra: matplotlib)",
    )
    swarm.add_argument(
        "--validators",
        type=int,
        default=1,
        metavar="N",
        help="validators to run beside the trainers (default 1, 0 for none), each a "
        "`kernelhub-validator` process; with --hub their tokens come from --tokens-file "
        "as validator_1..N",
    )
    swarm.add_argument(
        "--validators-no-sandbox",
        action="store_true",
        help="run the validators with --no-sandbox (every verdict says so)",
    )
    swarm.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="WARNING",
        help="logging level under the live view (default WARNING)",
    )
    swarm.add_argument(
        "--dashboard",
        nargs="?",
        const=8080,
        type=int,
        metavar="PORT",
        help="open the live web dashboard beside the swarm's own hub (default port 8080; 0: "
        "any free port) and print its URL",
    )
    common(swarm, "60s")
    return parser


class _AgentIdDefault(logging.Filter):
    """Records from outside a trainer (grpc, the embedded hub) have no agent id."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "agent_id"):
            record.agent_id = "kernelhub"
        return True


@contextlib.contextmanager
def _logging_to(handler: logging.Handler, level: str) -> Iterator[None]:
    root = logging.getLogger()
    previous = root.level
    handler.addFilter(_AgentIdDefault())
    root.addHandler(handler)
    root.setLevel(level.upper())
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)


@contextlib.contextmanager
def _graceful_stop(stop: Callable[[], None]) -> Iterator[None]:
    """First Ctrl-C/SIGTERM stops cleanly; a second Ctrl-C interrupts at once."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        logging.getLogger(__name__).warning("%s: stopping (again to abort)", sig.name)
        with contextlib.suppress(ValueError, RuntimeError):
            loop.remove_signal_handler(sig)
        stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)


def _print_metrics(agent_id: str, metrics: TrainingMetrics) -> None:
    values = metrics.as_dict()
    width = max(len(k) for k in values)
    print(f"Final metrics for {agent_id}:")
    for key, value in values.items():
        print(f"  {key:<{width}}  {value}")


async def _run(args: argparse.Namespace) -> int:
    token: str | None = args.token
    if args.token_file is not None:
        token = read_token_file(args.token_file)
    token = token or os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise UsageError(f"no token: pass --token or --token-file, or set {TOKEN_ENV}")
    factory = _behavior_factory(args.behavior)
    trainer = NetworkedKernelTrainer(
        args.agent_id,
        parse_specialization(args.specialization),
        args.hub,
        token,
        behavior=factory() if factory else None,
        seed=args.seed,
        tempo=args.tempo,
        credentials=_credentials(args),
        subscribe_all=args.subscribe == "all",
    )
    with _graceful_stop(trainer.stop):
        metrics = await trainer.run(args.duration)
    _print_metrics(args.agent_id, metrics)
    return EXIT_OK


async def _swarm(args: argparse.Namespace, console: Console) -> int:
    if (args.hub is None) != (args.tokens_file is None):
        raise UsageError("--hub and --tokens-file go together")
    for flag, value in (("--db", args.db), ("--database-url", args.database_url)):
        if args.hub is not None and value is not None:
            raise UsageError(f"{flag} is for the embedded hub; it cannot be used with --hub")
    if args.hub is not None and args.replicas is not None:
        raise UsageError(
            "--replicas starts the swarm's own hub replicas; it cannot be used with --hub"
        )
    if args.db is not None and args.database_url is not None:
        raise UsageError(
            "--db and --database-url both name the embedded hub's database: one of them"
        )
    if args.replicas is not None and not (args.database_url or "").startswith("postgresql"):
        raise UsageError(REPLICAS_NEED_POSTGRESQL)
    if args.hub is not None and args.report is not None:
        raise UsageError(
            "--report reads the embedded hub's database; for another hub run "
            "`kernelhub-hub report --db FILE --out FILE` where its database is"
        )
    if args.hub is not None and args.dashboard is not None:
        raise UsageError(
            "--dashboard opens beside the swarm's own hub; for --hub, run kernelhub-dashboard "
            "--hub HOST:PORT --token-file F with an observer token"
        )
    factory = _behavior_factory(args.behavior)
    credentials = _credentials(args)
    ids = agent_ids(args.count)
    if args.validators < 0:
        raise UsageError("--validators must be 0 or more")
    validators = validator_ids(args.validators)
    stop = asyncio.Event()
    reported = True  # the report, if asked for, was written

    async def run_against(target: str, tokens: dict[str, str]) -> SwarmResult:
        async with validator_processes(
            target,
            {v: tokens[v] for v in validators},
            sandbox=not args.validators_no_sandbox,
        ):
            return await run_swarm(
                target=target,
                tokens=tokens,
                count=args.count,
                duration_seconds=args.duration,
                seed=args.seed,
                tempo=args.tempo,
                credentials=credentials,
                behavior_factory=factory,
                console=console,
                stop=stop,
                subscribe_all=args.subscribe == "all",
            )

    with _graceful_stop(stop.set):
        if args.hub is not None:
            tokens = read_tokens_file(args.tokens_file)
            missing = [agent_id for agent_id in ids + validators if agent_id not in tokens]
            if missing:
                raise UsageError(f"{args.tokens_file} has no token for {', '.join(missing[:5])}")
            result = await run_against(args.hub, tokens)
        else:
            observers = [] if args.dashboard is None else [OBSERVER]
            try:
                async with contextlib.AsyncExitStack() as stack:
                    target, tokens, database_url = await stack.enter_async_context(
                        embedded_hub(
                            args.db,
                            tempo=args.tempo,
                            agents=ids,
                            observers=observers,
                            validators=validators,
                            database_url=args.database_url,
                            replicas=args.replicas or 0,
                        )
                    )
                    if args.dashboard is not None:
                        dashboard = await stack.enter_async_context(
                            dashboard_beside(target, tokens.pop(OBSERVER), args.dashboard)
                        )
                        console.print(f"dashboard: {dashboard.url}", highlight=False)
                    result = await run_against(target, tokens)
                    if args.report is not None:
                        reported = await _write_report(database_url, args.report)
            except (EmbeddedHubUnavailable, DashboardUnavailable) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return EXIT_FATAL
    for table in summary_tables(result):
        console.print(table)
    failures = result.failures
    for trainer in failures:
        print(f"error: {trainer.agent_id}: {trainer.error or trainer.status}", file=sys.stderr)
    return EXIT_FATAL if failures or not reported else EXIT_OK


async def _write_report(database_url: str, out: Path) -> bool:
    """The run report from the embedded hub's database; False (said on stderr) if it failed."""
    from hub_service.report import ReportError, write_report

    try:
        await write_report(database_url, out)
    except ReportError as error:
        print(f"error: the report: {error}", file=sys.stderr)
        return False
    print(f"report written to {out}")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            with _logging_to(handler, args.log_level):
                return asyncio.run(_run(args))
        # Piped output gets room for the whole summary instead of a truncated 80 columns.
        console = Console(width=None if sys.stdout.isatty() else 160)
        rich_handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
        rich_handler.setFormatter(logging.Formatter("%(agent_id)s - %(message)s"))
        with _logging_to(rich_handler, args.log_level):
            return asyncio.run(_swarm(args, console))
    except UsageError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except HubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
