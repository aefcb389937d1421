"""A real headless Chromium for tests: Debian's ``chromium``, driven by Playwright.

Playwright's own browser builds are a download from a CDN, which CI here cannot
reach; the distribution's Chromium is what ``scripts/install-browser`` installs
and what this launches (``CHROMIUM`` overrides the path)::

    async with chromium() as browser:
        page = await browser.new_page()

A missing browser fails the test with the command that installs it: a
browser test that skips proves nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright

# Headless and quiet: no GPU, no sandbox (containers run as root), and none of
# the background traffic (updates, sync, QUIC probes) that would reach for the
# internet or compete with the test for two CPU cores.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Offline but for this machine: a page's CDN script fails at once instead of
    # waiting on DNS. Not Playwright's page.route: with interception on, Playwright
    # answers CORS preflights itself, and the gateway's would go untested.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
)


def chromium_path() -> Path:
    """Where Chromium is; fails the test with install instructions when it is not."""
    configured = os.environ.get("CHROMIUM")
    found = configured or shutil.which("chromium") or "/usr/bin/chromium"
    path = Path(found)
    if not path.exists():
        pytest.fail(
            f"Chromium was not found at {path}. The browser tests drive a real one: run "
            "scripts/install-browser (Debian: apt-get install chromium), or set CHROMIUM "
            "to a Chromium or Chrome binary.",
            pytrace=False,
        )
    return path


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """A headless Chromium for one test; closed (with its process) on exit."""
    executable = chromium_path()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=list(CHROMIUM_FLAGS), timeout=30_000
        )
        try:
            yield browser
        finally:
            await browser.close()
