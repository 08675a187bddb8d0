"""`kernelhub-hub`: serve the hub, show its settings, issue, list or revoke agent tokens,
look after its database (`db`), and draw a run's report from it (`report`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from . import db_admin, report, report_data, serving, workers
from .config import HubConfig
from .durations import parse_duration
from .errors import StatusError
from .roles import Role
from .schema import SchemaError
from .settings import (
    DURATIONS,
    FLAG_ALIASES,
    GROUPS,
    HubSettings,
    Resolved,
    SettingsError,
    env_name,
    flag_name,
    group_of,
    load_settings,
    mask_url,
    sqlite_url,
)
from .sql_store import SqlStore
from .validation import Limits, validate_agent_id


def _setting_flags(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    """A flag for each setting in `names`, derived from the model; only the flags given land
    in the namespace (argparse.SUPPRESS), so the others fall through to env, file, default."""
    parser.add_argument(
        "--config", type=Path, metavar="TOML", help="settings file (flags and env override it)"
    )
    for name in names:
        if name == "log_level":
            continue  # the top-level --log-level, before the command
        field = HubSettings.model_fields[name]
        flags = [flag_name(name), *FLAG_ALIASES.get(name, ())]
        help_text = f"{field.description} (env {env_name(name)}; default {field.default!r})"
        if name == "database_url":
            group = parser.add_mutually_exclusive_group()
            group.add_argument(
                "--db", metavar="PATH", default=argparse.SUPPRESS, help="SQLite database file"
            )
            group.add_argument(
                *flags, dest=name, metavar="URL", default=argparse.SUPPRESS, help=help_text
            )
            continue
        metavar = _metavar(name, field.annotation)
        parser.add_argument(
            *flags, dest=name, metavar=metavar, default=argparse.SUPPRESS, help=help_text
        )


def _metavar(name: str, kind: object) -> str:
    if name in DURATIONS:
        return "DURATION"
    if name.startswith("tls_"):
        return "PEM"
    if kind is int:
        return "BYTES" if name.endswith("_bytes") else "N"
    return "PER_S" if kind is float else name.upper()


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags (`--db PATH` is the SQLite URL)."""
    flags = {name: value for name, value in vars(args).items() if name in HubSettings.model_fields}
    if getattr(args, "db", None):
        flags["database_url"] = sqlite_url(args.db)
    return flags


def build_parser() -> argparse.ArgumentParser:
    """`serve`, `config` and `token`: one `add_parser` block each, so a group is easy to add."""
    parser = argparse.ArgumentParser(prog="kernelhub-hub", description=__doc__)
    parser.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        help=f"{HubSettings.model_fields['log_level'].description} (env KERNELHUB_LOG_LEVEL; default INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    every = list(HubSettings.model_fields)

    serve = commands.add_parser("serve", help="run the hub")
    _setting_flags(serve, every)

    config = commands.add_parser("config", help="inspect the settings").add_subparsers(
        dest="config_command", required=True
    )
    show = config.add_parser("show", help="each effective setting, its value and its source")
    _setting_flags(show, every)

    token = commands.add_parser("token", help="manage agent tokens").add_subparsers(
        dest="token_command", required=True
    )
    issue = token.add_parser("issue", help="issue a token for an agent (printed once)")
    issue.add_argument("agent_id", nargs="+")
    issue.add_argument("--ttl", type=parse_duration, help="expire after, e.g. 30d or 12h")
    issue.add_argument("--out", type=Path, help="append 'agent_id token' lines to this file")
    issue.add_argument(
        "--role",
        choices=[role.value for role in Role],
        default=Role.AGENT.value,
        help="what the token may do (default agent: a trainer; see the README's roles table)",
    )
    _setting_flags(issue, ["database_url"])
    listing = token.add_parser("list", help="list tokens (never the tokens themselves)")
    _setting_flags(listing, ["database_url"])
    revoke = token.add_parser("revoke", help="revoke a token by id, or all tokens of an agent")
    revoke.add_argument("agent_or_token_id")
    _setting_flags(revoke, ["database_url"])

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
        _setting_flags(sub, ["database_url"])

    drawn = commands.add_parser(
        "report", help="draw a run from the database: one self-contained HTML file, or PNGs"
    )
    drawn.add_argument(
        "--out", type=Path, required=True, help="the HTML file (--format html) or a directory (png)"
    )
    drawn.add_argument("--format", choices=("html", "png"), default="html", dest="report_format")
    for end in ("since", "until"):
        drawn.add_argument(
            f"--{end}",
            metavar="TIME",
            help=f"only what was created {'at or after' if end == 'since' else 'before'} TIME: "
            "ISO 8601 (UTC unless it says) or a duration ago (2h)",
        )
    _setting_flags(drawn, ["database_url"])
    return parser


async def _report(args: argparse.Namespace, database_url: str) -> int:
    try:
        window = report_data.Window(
            since=report.parse_moment(args.since) if args.since else None,
            until=report.parse_moment(args.until) if args.until else None,
        )
        written = await report.write_report(database_url, args.out, args.report_format, window)
    except report.ReportError as error:
        print(f"kernelhub-hub report: {error}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"kernelhub-hub report: no figure has data; nothing written to {args.out}")
    return 0


def show_settings(resolved: Resolved) -> str:
    """The effective settings as a TOML file would hold them, each with its source; the
    database password masked."""
    lines: list[str] = []
    values = resolved.settings.model_dump()
    for group in GROUPS:
        lines.append(f"[{group}]")
        for name, value in values.items():
            if group_of(name) != group:
                continue
            if name == "database_url":
                value = mask_url(value)
            shown = json.dumps(value) if isinstance(value, str) else repr(value)
            lines.append(f"{name} = {shown}  # {resolved.origins[name]}")
        lines.append("")
    return "\n".join(lines)


async def _tokens(args: argparse.Namespace, database_url: str, auto_upgrade: bool) -> int:
    if database_url.startswith("memory:"):
        print(
            "kernelhub-hub: an in-memory hub keeps its tokens in its own process: issue them "
            "there (hub_service.testing.TestHub.issue_token), not from the command line",
            file=sys.stderr,
        )
        return 2
    if args.token_command == "issue":
        # Every id is checked before any token is issued: all or nothing.
        for agent_id in args.agent_id:
            try:
                validate_agent_id(agent_id, Limits())
            except StatusError as error:
                print(
                    f"kernelhub-hub: cannot issue a token for {agent_id!r}: {error.message}",
                    file=sys.stderr,
                )
                return 2
    # Tokens are written by the CLI itself; with auto-upgrade off, an old schema is refused.
    store = SqlStore(database_url, writer="thread", auto_upgrade=auto_upgrade)
    try:
        await store.open()
    except (SchemaError, StatusError) as error:  # an old schema, or a database that is down
        await store.close()
        print(f"kernelhub-hub: {getattr(error, 'message', error)}", file=sys.stderr)
        return 1
    try:
        if args.token_command == "issue":
            ttl = timedelta(seconds=args.ttl) if args.ttl else None
            lines = []
            for agent_id in args.agent_id:
                issued = await store.issue_token(agent_id, ttl, Role(args.role))
                lines.append(f"{issued.agent_id} {issued.token}")
                print(f"{issued.agent_id} {issued.token}")
            if args.out:
                with args.out.open("a") as out:
                    out.write("".join(line + "\n" for line in lines))
                args.out.chmod(0o600)
                print(f"appended {len(lines)} token(s) to {args.out}", file=sys.stderr)
        elif args.token_command == "list":
            print(
                f"{'TOKEN ID':<18} {'AGENT':<24} {'ROLE':<10} {'CREATED':<20} {'EXPIRES':<20} STATUS"
            )
            for row in await store.list_tokens():
                status = "revoked" if row.revoked_at else "active"
                expires = row.expires_at.isoformat(" ", "seconds") if row.expires_at else "never"
                created = row.created_at.isoformat(" ", "seconds")
                print(
                    f"{row.token_id:<18} {row.agent_id:<24} {row.role:<10} {created:<20} "
                    f"{expires:<20} {status}"
                )
        else:
            count = await store.revoke_tokens(args.agent_or_token_id)
            print(f"revoked {count} token(s)")
            if count == 0:
                return 1
        return 0
    finally:
        await store.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        flags = _given(args)
        labels = {"database_url": "--db"} if getattr(args, "db", None) else {}
        resolved = load_settings(os.environ, args.config, flags, labels)
    except SettingsError as error:
        print(f"kernelhub-hub: {error}", file=sys.stderr)
        return 2
    settings = resolved.settings
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s - hub - %(levelname)s - %(message)s"
    )
    if args.command == "db":
        return db_admin.run(args.db_command, settings.database_url, getattr(args, "path", None))
    if args.command == "serve":
        config = HubConfig.from_settings(settings)
        if config.workers > 1:
            return workers.supervise(config, settings.log_level)
        return asyncio.run(serving.serve(config))
    if args.command == "report":
        return asyncio.run(_report(args, settings.database_url))
    if args.command == "config":
        print(show_settings(resolved), end="")
        return 0
    return asyncio.run(_tokens(args, settings.database_url, settings.auto_upgrade))
