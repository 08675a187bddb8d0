"""One hub process from its start to its drain: what `kernelhub-hub serve` runs, alone or as one
of `--workers N` (workers.py), which differ only in how they say they are serving."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from . import heap
from .config import HubConfig
from .server import HubServer

log = logging.getLogger(__name__)


def print_serving(config: HubConfig, hub: HubServer) -> None:
    """A single hub's startup line on stdout (what `TestHub.subprocess` waits for)."""
    print(f"kernelhub serving on {config.host}:{hub.port}", flush=True)


async def serve(
    config: HubConfig,
    announce: Callable[[HubConfig, HubServer], None] = print_serving,
    stop: asyncio.Event | None = None,
) -> int:
    """Serves until SIGINT or SIGTERM (or `stop` is set), then drains; the exit code."""
    hub = HubServer(config)
    try:
        await hub.start()
    except Exception as exc:  # a port in use, a missing certificate, the database (StatusError)
        # Whatever stops a start is the operator's to fix: say what, in one line, not a
        # traceback.
        log.error("kernelhub could not start: %s", exc or type(exc).__name__)
        return 1
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    heap.settle()
    announce(config, hub)
    await stop.wait()
    log.info("signal received; draining")
    await hub.stop()
    return 0
