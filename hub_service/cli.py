"""`kernelhub-hub`: serve the hub, issue, list or revoke agent tokens, and look after its
database (`db`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from . import db_admin
from .config import HubConfig
from .durations import parse_duration
from .errors import HubError
from .server import HubServer
from .store import SqlStore
from .validation import Limits, validate_agent_id


def _database_args(parser: argparse.ArgumentParser, config: HubConfig) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--db", metavar="PATH", help="SQLite database file (default ./kernelhub.db)")
    group.add_argument(
        "--database-url",
        metavar="URL",
        default=config.database_url,
        help="any SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db (env KERNELHUB_DATABASE_URL)",
    )


def _database_url(args: argparse.Namespace) -> str:
    return HubConfig.sqlite_url(args.db) if args.db else str(args.database_url)


def build_parser(config: HubConfig) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kernelhub-hub", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("KERNELHUB_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the hub")
    serve.add_argument(
        "--host", default=config.host, help=f"interface to bind (default {config.host})"
    )
    serve.add_argument(
        "--port", type=int, default=config.port, help=f"port (default {config.port}; 0 picks one)"
    )
    serve.add_argument(
        "--training-sync-interval",
        type=parse_duration,
        default=config.training_sync_interval,
        help="how often every agent gets a training sync, e.g. 30s (0: only on connect)",
    )
    serve.add_argument(
        "--tls-cert",
        default=config.tls_cert,
        metavar="PEM",
        help="server certificate (enables TLS)",
    )
    serve.add_argument(
        "--tls-key", default=config.tls_key, metavar="PEM", help="server private key"
    )
    serve.add_argument(
        "--tls-client-ca",
        default=config.tls_client_ca,
        metavar="PEM",
        help="CA that signs client certificates (enables mutual TLS)",
    )
    serve.add_argument(
        "--rate-limit",
        type=float,
        default=config.rate_limit_per_second,
        metavar="MSGS_PER_S",
        help=f"per-agent message rate (default {config.rate_limit_per_second:g}; 0 disables)",
    )
    serve.add_argument(
        "--max-connections",
        type=int,
        default=config.max_connections,
        help=f"live streams at once (default {config.max_connections})",
    )
    _database_args(serve, config)

    token = commands.add_parser("token", help="manage agent tokens").add_subparsers(
        dest="token_command", required=True
    )
    issue = token.add_parser("issue", help="issue a token for an agent (printed once)")
    issue.add_argument("agent_id", nargs="+")
    issue.add_argument("--ttl", type=parse_duration, help="expire after, e.g. 30d or 12h")
    issue.add_argument("--out", type=Path, help="append 'agent_id token' lines to this file")
    _database_args(issue, config)
    listing = token.add_parser("list", help="list tokens (never the tokens themselves)")
    _database_args(listing, config)
    revoke = token.add_parser("revoke", help="revoke a token by id, or all tokens of an agent")
    revoke.add_argument("agent_or_token_id")
    _database_args(revoke, config)

    db = commands.add_parser("db", help="upgrade, back up or check the database").add_subparsers(
        dest="db_command", required=True
    )
    for name, text in (
        ("upgrade", "bring the schema to this hub's revision"),
        ("current", "print the schema revision"),
        ("backup", "copy a SQLite database consistently, even while a hub serves it"),
        ("check", "integrity check and event-log gap check (non-zero exit on a problem)"),
    ):
        sub = db.add_parser(name, help=text)
        if name == "backup":
            sub.add_argument("path", type=Path, help="the new file to write")
        _database_args(sub, config)
    return parser


async def _serve(config: HubConfig) -> int:
    hub = HubServer(config)
    try:
        await hub.start()
    except (RuntimeError, OSError, ValueError) as exc:  # a port in use, a missing certificate
        logging.getLogger(__name__).error("kernelhub could not start: %s", exc)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"kernelhub serving on {config.host}:{hub.port}", flush=True)
    await stop.wait()
    logging.getLogger(__name__).info("signal received; draining")
    await hub.stop()
    return 0


async def _tokens(args: argparse.Namespace, database_url: str) -> int:
    if args.token_command == "issue":
        # Every id is checked before any token is issued: all or nothing.
        for agent_id in args.agent_id:
            try:
                validate_agent_id(agent_id, Limits())
            except HubError as error:
                print(
                    f"kernelhub-hub: cannot issue a token for {agent_id!r}: {error.message}",
                    file=sys.stderr,
                )
                return 2
    store = SqlStore(database_url)
    await store.open()
    try:
        if args.token_command == "issue":
            ttl = timedelta(seconds=args.ttl) if args.ttl else None
            lines = []
            for agent_id in args.agent_id:
                issued = await store.issue_token(agent_id, ttl)
                lines.append(f"{issued.agent_id} {issued.token}")
                print(f"{issued.agent_id} {issued.token}")
            if args.out:
                with args.out.open("a") as out:
                    out.write("".join(line + "\n" for line in lines))
                args.out.chmod(0o600)
                print(f"appended {len(lines)} token(s) to {args.out}", file=sys.stderr)
        elif args.token_command == "list":
            print(f"{'TOKEN ID':<18} {'AGENT':<24} {'CREATED':<20} {'EXPIRES':<20} STATUS")
            for row in await store.list_tokens():
                status = "revoked" if row.revoked_at else "active"
                expires = row.expires_at.isoformat(" ", "seconds") if row.expires_at else "never"
                created = row.created_at.isoformat(" ", "seconds")
                print(f"{row.token_id:<18} {row.agent_id:<24} {created:<20} {expires:<20} {status}")
        else:
            count = await store.revoke_tokens(args.agent_or_token_id)
            print(f"revoked {count} token(s)")
            if count == 0:
                return 1
        return 0
    finally:
        await store.close()


def main(argv: Sequence[str] | None = None) -> int:
    config = HubConfig.from_env(os.environ)
    args = build_parser(config).parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s - hub - %(levelname)s - %(message)s"
    )
    database_url = _database_url(args)
    if args.command == "db":
        return db_admin.run(args.db_command, database_url, getattr(args, "path", None))
    if args.command == "serve":
        config.host, config.port = args.host, args.port
        config.training_sync_interval = args.training_sync_interval
        config.tls_cert, config.tls_key = args.tls_cert, args.tls_key
        config.tls_client_ca = args.tls_client_ca
        config.rate_limit_per_second = args.rate_limit
        config.max_connections = args.max_connections
        config.database_url = database_url
        return asyncio.run(_serve(config))
    return asyncio.run(_tokens(args, database_url))
