"""The chaos suite: fault-injection scenarios on real processes (see harness.py)."""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator

import pytest

from tests.chaos.harness import Chaos, redis_binary
from tests.support.waiting import WaitTimeout, wait_until


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

    def left() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("chaos-")]

    try:
        wait_until(lambda: not left(), "the scenario's threads to end", 5)
    except WaitTimeout:
        raise AssertionError(f"threads left running: {left()}") from None
