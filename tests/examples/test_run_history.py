"""Issue 12, run_history: rows go from running to completed live, and a run that finished
between the snapshot and the subscribe still shows (embedded engine, and Redis behind a
balancer)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import httpx
import pytest

from tests.examples.conftest import ROOT, ExampleProcess, Launch, readme_command, screenshot

WAIT_MS = 15_000


def status_of(page: Any, run_id: int) -> Any:
    return page.locator(f'tr[data-run="{run_id}"] .status')


def test_rows_change_status_live_and_a_change_before_subscribe_is_replayed(
    browser: Any, launch: Launch
) -> None:
    example = launch("run_history")
    api = httpx.Client(base_url=example.url, timeout=10)
    context = browser.new_context()
    try:
        before = api.post("/api/runs", json={"url": "https://example.com/before"}).json()

        # The page's snapshot is rendered with run #1 running; the stream opens only once
        # /client.js arrives, and the run finishes before that: it must be replayed.
        page = context.new_page()
        finished: list[int] = []

        def finish_before_subscribe(route: Any) -> None:
            reply = api.post(f"/api/runs/{before['id']}/finish", json={"pages": 7})
            finished.append(reply.status_code)
            route.continue_()

        page.route("**/client.js", finish_before_subscribe)
        snapshot = page.goto(example.url)
        assert snapshot is not None
        assert 'class="running"' in snapshot.text()
        conn = page.locator("#conn")
        conn.filter(has_text="open").wait_for(timeout=WAIT_MS)
        assert finished == [200]
        status_of(page, before["id"]).filter(has_text="completed").wait_for(timeout=WAIT_MS)

        # Live: a new run appears as running, then completes.
        run = api.post("/api/runs", json={"url": "https://example.com/live"}).json()
        status_of(page, run["id"]).filter(has_text="running").wait_for(timeout=WAIT_MS)
        api.post(f"/api/runs/{run['id']}/finish", json={"pages": 42}).raise_for_status()
        status_of(page, run["id"]).filter(has_text="completed").wait_for(timeout=WAIT_MS)

        # The README's worker drives the same page.
        worker = [sys.executable, "examples/run_history/worker.py", example.url]
        subprocess.run([*worker, "--runs", "2", "--seconds", "0.2"], cwd=ROOT, check=True,
                       timeout=30, capture_output=True)  # fmt: skip
        page.locator("tr.completed").nth(3).wait_for(timeout=WAIT_MS)
        assert page.locator("tr.running").count() == 0
        assert page.locator("#conn").text_content() == "open"
        screenshot(page, f"example-run_history-{launch.mode}")  # type: ignore[attr-defined]
    finally:
        context.close()
        api.close()


def test_stopping_an_example_stops_the_gateway_it_started() -> None:
    """The launcher's own gateway goes when the example is stopped (SIGTERM, as a service
    manager or a test does): uvicorn re-raises the signal after its shutdown."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "GATEWAY_URL", "PORT")}
    example = ExampleProcess(readme_command("run_history"), env)
    try:
        assert httpx.get(example.gateway_url + "/readyz", timeout=5).status_code == 200
        example.process.terminate()
        assert example.process.wait(20) == 128 + signal.SIGTERM
        with pytest.raises(httpx.TransportError):
            httpx.get(example.gateway_url + "/readyz", timeout=5)
    finally:
        example.stop()
