"""The swarm's dashboard: `kernelhub-dashboard` started beside the swarm's own hub, in its own
process (as an operator would run it), with an observer token; stopped with the swarm."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

OBSERVER: Final = "swarm_dashboard"  # the dashboard's token name
START_TIMEOUT_SECONDS: Final = 30.0
STOP_TIMEOUT_SECONDS: Final = 5.0


class DashboardUnavailable(RuntimeError):
    """The dashboard process did not start (its own words, if it said any)."""


@dataclass(frozen=True)
class Dashboard:
    url: str  # http://host:port/
    pid: int


@contextlib.asynccontextmanager
async def dashboard_beside(target: str, token: str, port: int) -> AsyncIterator[Dashboard]:
    """Runs the dashboard against `target` on `port` (0: any free one); yields where."""
    with tempfile.TemporaryDirectory(prefix="kernelhub-dashboard-") as directory:
        token_file = Path(directory) / "observer.token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dashboard_service",
            "--hub",
            target,
            "--token-file",
            str(token_file),
            "--port",
            str(port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=os.environ.copy(),
        )
        try:
            assert process.stdout is not None and process.stderr is not None
            try:
                line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT_SECONDS)
            except TimeoutError:
                line = b""
            url = next((w for w in line.decode().split() if w.startswith("http://")), None)
            if url is None:
                if process.returncode is None:
                    process.kill()
                error = (await process.stderr.read()).decode().strip()
                raise DashboardUnavailable(error or "the dashboard did not say where it serves")
            yield Dashboard(url, process.pid)
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
                except TimeoutError:
                    process.kill()
                    await process.wait()
