"""Browser tests: Debian's Chromium (``/usr/bin/chromium``) driven by Playwright, never a
downloaded browser. They skip, saying why, where either is missing; CI installs both."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One Chromium per module: Playwright's sync API runs an event loop in this thread while
    it is open, so it must be closed before other tests use ``asyncio.run``."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is missing (pip install -e '.[test]')"
    )
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=[*args, "--disable-gpu"], headless=True
        )
        try:
            yield chromium
        finally:
            chromium.close()
