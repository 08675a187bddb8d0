"""A headless Chromium for the browser tests: Debian's `chromium`, driven by Playwright.

Playwright's own browser download cannot work on these machines, so the tests point it at the
system's binary (`KERNELHUB_CHROMIUM`, default `/usr/bin/chromium`; `scripts/setup` installs it).
Where none can be found the tests skip, saying what is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# Where the browser tests save their screenshots (CI keeps the directory as a test artifact).
SCREENSHOTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def chromium_path() -> str | None:
    configured = os.environ.get("KERNELHUB_CHROMIUM")
    if configured:
        return configured if Path(configured).exists() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium: apt-get install chromium (scripts/setup does it as root)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()
