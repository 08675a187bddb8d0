"""`kernelhub-dashboard --hub host:port --token-file F [--port 8080]`: serve the page."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
from pathlib import Path

import uvicorn

from .aggregate import Aggregate
from .feed import HubFeed
from .web import make_app


def read_token(path: Path) -> str:
    """The token in `path`: its first non-empty line, or that line's last field (so an
    'agent_id token' line from `kernelhub-hub token issue --out` works too)."""
    for line in path.read_text().splitlines():
        if line.strip():
            return line.split()[-1]
    raise ValueError(f"{path} holds no token")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kernelhub-dashboard", description="A live web dashboard of one kernelhub hub."
    )
    parser.add_argument("--hub", default="localhost:50051", help="the hub's host:port")
    parser.add_argument(
        "--token-file", type=Path, required=True, help="a file holding an observer (or admin) token"
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to serve the page on")
    parser.add_argument("--port", type=int, default=8080, help="port to serve on (0: any free)")
    parser.add_argument("--log-level", default="WARNING")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    feed = HubFeed(args.hub, read_token(args.token_file), Aggregate())
    config = uvicorn.Config(
        make_app(feed, [args.host]),
        log_level=args.log_level.lower(),
        timeout_graceful_shutdown=2,  # open pages hold event streams: do not wait on them
        lifespan="on",
    )
    # Bound here, so the URL printed names the port (--port 0 picks one) before serving.
    listener = socket.create_server((args.host, args.port), reuse_port=False)
    port = listener.getsockname()[1]
    print(f"kernelhub dashboard on http://{args.host}:{port}/ (hub {args.hub})", flush=True)
    await uvicorn.Server(config).serve(sockets=[listener])


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        read_token(args.token_file)
    except (OSError, ValueError) as error:
        print(f"kernelhub-dashboard: cannot read the token: {error}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(args))
    except OSError as error:  # the port is taken, or the interface is not this machine's
        print(
            f"kernelhub-dashboard: cannot serve on {args.host}:{args.port}: {error}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
