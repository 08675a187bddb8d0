"""The dashboard's web app (Starlette): the pages, their JSON, and the server-sent events
that carry a snapshot to each open page a few times a second.

Everything an agent supplied reaches the browser as JSON, and the pages put it into the
document as text only (never as markup); the Content-Security-Policy allows scripts from
this server alone, so even a slip could not run an injected one. Only requests naming this
server (the configured host, localhost, 127.0.0.1) in their Host header are answered: a
page elsewhere cannot rebind its own name to this address and read the dashboard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from importlib import resources
from typing import Any

import grpc
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .aggregate import Aggregate
from .feed import HubFeed

SNAPSHOTS_PER_SECOND = 2
MAX_STREAMS = 100  # open pages at once; each costs a snapshot per tick, not per event
PAGE_LIMIT = 100
STATIC = resources.files("dashboard_service") / "static"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


class _Headers(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response


class Snapshots:
    """One snapshot per tick, serialized once, whichever pages read it."""

    def __init__(self, aggregate: Aggregate) -> None:
        self._aggregate = aggregate
        self._tick = asyncio.Event()
        self.data = ""
        self.streams = 0

    async def run(self) -> None:
        while True:
            self.data = json.dumps(self._aggregate.snapshot(), separators=(",", ":"))
            self._tick.set()
            self._tick = asyncio.Event()
            await asyncio.sleep(1 / SNAPSHOTS_PER_SECOND)

    async def next(self) -> str:
        await asyncio.wait_for(self._tick.wait(), 10)
        return self.data


def _page(name: str) -> FileResponse:
    return FileResponse(str(STATIC / name), media_type="text/html")


LOCAL_HOSTS = ("localhost", "127.0.0.1")


def make_app(feed: HubFeed, hosts: Sequence[str] = ()) -> Starlette:
    """The app; `hosts`: names besides LOCAL_HOSTS that its Host header may give (the
    configured one): any other is refused (DNS rebinding)."""
    allowed = sorted({*LOCAL_HOSTS, *hosts})
    snapshots = Snapshots(feed.aggregate)

    async def index(request: Request) -> Response:
        return _page("index.html")

    async def agent_html(request: Request) -> Response:
        return _page("agent.html")

    async def artifact_html(request: Request) -> Response:
        return _page("artifact.html")

    async def snapshot(request: Request) -> Response:
        return JSONResponse(feed.aggregate.snapshot())

    async def stream(request: Request) -> Response:
        if snapshots.streams >= MAX_STREAMS:
            return JSONResponse({"error": "too many open pages"}, status_code=503)

        async def events() -> AsyncIterator[str]:
            snapshots.streams += 1
            try:
                yield "retry: 2000\n\n"
                while not await request.is_disconnected():
                    yield f"data: {await snapshots.next()}\n\n"
            finally:
                snapshots.streams -= 1

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def agents(request: Request) -> Response:
        offset = _int(request.query_params.get("offset"), 0)
        limit = min(_int(request.query_params.get("limit"), 25), PAGE_LIMIT)
        return JSONResponse(feed.aggregate.agents_page(offset, limit))

    async def agent(request: Request) -> Response:
        params = request.query_params
        return await _hub(
            feed.agent_page(
                request.path_params["agent_id"],
                params.get("artifacts", ""),
                params.get("collaborations", ""),
            )
        )

    async def artifact(request: Request) -> Response:
        return await _hub(feed.artifact(request.path_params["artifact_id"]))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await feed.start()
        ticking = asyncio.create_task(snapshots.run())
        try:
            yield
        finally:
            ticking.cancel()
            await feed.stop()

    return Starlette(
        routes=[
            Route("/", index),
            Route("/agent/{agent_id:path}", agent_html),
            Route("/artifact/{artifact_id:path}", artifact_html),
            Route("/api/snapshot", snapshot),
            Route("/api/stream", stream),
            Route("/api/agents", agents),
            Route("/api/agent/{agent_id:path}", agent),
            Route("/api/artifact/{artifact_id:path}", artifact),
            Mount("/static", StaticFiles(directory=str(STATIC)), name="static"),
        ],
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed), Middleware(_Headers)],
        lifespan=lifespan,
    )


async def _hub(lookup: Any) -> Response:
    """The hub's answer as JSON; its refusal as the matching HTTP status, in words."""
    try:
        return JSONResponse(await lookup)
    except grpc.aio.AioRpcError as error:
        status = {
            grpc.StatusCode.NOT_FOUND: 404,
            grpc.StatusCode.INVALID_ARGUMENT: 400,
            grpc.StatusCode.PERMISSION_DENIED: 403,
            grpc.StatusCode.UNAUTHENTICATED: 403,
        }.get(error.code(), 502)
        return JSONResponse({"error": f"{error.code().name}: {error.details()}"}, status)


def _int(text: str | None, default: int) -> int:
    try:
        return max(0, int(text)) if text else default
    except ValueError:
        return default
