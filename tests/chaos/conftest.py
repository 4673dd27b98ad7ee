"""The chaos suite: fault-injection scenarios on real processes (see harness.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator

import pytest

from tests.chaos.harness import Chaos, redis_binary


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: fault-injection scenarios")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        chaos = getattr(item, "funcargs", {}).get("chaos")
        if isinstance(chaos, Chaos):
            chaos.failed = True


@pytest.fixture
def chaos() -> Iterator[Chaos]:
    """Starts a scenario's parts; at teardown closes them all, newest first (and prints the
    nodes' and Redis's logs when the scenario failed)."""
    redis_binary()  # found or installed before the scenario starts anything
    chaos = Chaos()
    try:
        yield chaos
    finally:
        chaos.close()
    deadline = time.monotonic() + 5
    while left := [t.name for t in threading.enumerate() if t.name.startswith("chaos-")]:
        assert time.monotonic() < deadline, f"threads left running: {left}"
        time.sleep(0.05)
