"""Issue 11, acceptance 2: ``/demo`` in Chromium. The indicator reaches open, the job bars
advance, the log fills and the publish box works; the node is SIGKILLed and started again on
the same port (on Redis, so history survives): the indicator goes reconnecting, then open, and
the log holds every event of the demo topics between its first and last row, once, in order,
those published while the node was down included.

The test leaves a screenshot in ``tests/.artifacts/`` (not committed), or in the folder named
by ``SSE_GATEWAY_TEST_ARTIFACTS``."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import redis

from gateway.demo import TOPICS
from publisher import Publisher
from publisher.protocol import Keys, id_key
from tests.conftest import GatewayFactory
from tests.support.redis_server import stream_entries

WAIT_MS = 30_000
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("SSE_GATEWAY_TEST_ARTIFACTS") or ROOT / "tests" / ".artifacts")


STATUS = "() => document.getElementById('status').dataset.status"
LOG_IDS = "() => [...document.querySelectorAll('#log li[data-id]')].map(li => li.dataset.id)"
STATUS_TRAIL = (
    "() => [...document.querySelectorAll('#log li.status .data')].map(span => span.textContent)"
)
PERCENTS = (
    "() => Object.fromEntries([...document.querySelectorAll('.job')]"
    ".map(j => [j.dataset.jobId, Number(j.dataset.percent || 0)]))"
)


def wait_status(page: Any, status: str) -> None:
    page.wait_for_function(f"() => ({STATUS})() === {status!r}", timeout=WAIT_MS)


def wait_row(page: Any, event_id: str) -> None:
    page.wait_for_function(
        "(id) => document.querySelector(`#log li[data-id='${id}']`) !== null",
        arg=event_id,
        timeout=WAIT_MS,
    )


def console_problem(msg: Any) -> list[str]:
    """Errors the page logs (a refused Content-Security-Policy among them), apart from the
    failed requests that a killed node causes, which the client handles."""
    if msg.type != "error" or msg.text.startswith("Failed to load resource: net::"):
        return []
    return [f"console: {msg.text}"]


def held_ids(client: redis.Redis, prefix: str, first: str, last: str) -> list[str]:
    """Every id Redis holds for the demo topics from ``first`` to ``last``, in order."""
    keys = Keys(prefix)
    ids: set[str] = set()
    for topic in TOPICS:
        for entry_id, _ in stream_entries(client, keys.stream(topic), first, last):
            ids.add(entry_id)
    return sorted(ids, key=id_key)


def test_demo_page_shows_live_jobs_and_a_complete_log_across_a_node_restart(
    browser: Any,
    gateway_factory: GatewayFactory,
    redis_url: str,
    prefix: str,
    redis_client: redis.Redis,
) -> None:
    gateway = gateway_factory("--demo", "--prefix", prefix, redis_url=redis_url)
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda msg: problems.extend(console_problem(msg)))
        page.goto(gateway.url + "/demo")
        wait_status(page, "open")

        # the bars advance: one job's percentage grows while the page watches
        page.wait_for_function(
            f"() => Object.values(({PERCENTS})()).some(p => p > 0)", timeout=WAIT_MS
        )
        before = page.evaluate(PERCENTS)
        job, percent = next((j, p) for j, p in before.items() if 0 < p < 100)
        page.wait_for_function(
            f"([job, p]) => ({PERCENTS})()[job] > p", arg=[job, percent], timeout=WAIT_MS
        )

        # the box publishes to demo:chat, and the message comes back on the stream
        page.fill("#text", "hello from the page")
        page.click("button[type=submit]")
        page.wait_for_function(
            "() => document.getElementById('published').textContent.startsWith('published as')",
            timeout=WAIT_MS,
        )
        sent = page.text_content("#published").removeprefix("published as ").strip()
        wait_row(page, sent)
        assert "hello from the page" in page.text_content(f"#log li[data-id='{sent}']")

        # the node dies; meanwhile a worker publishes; the node comes back on the same port
        gateway.stop(signal.SIGKILL)
        wait_status(page, "reconnecting")
        with Publisher.from_url(redis_url, prefix=prefix) as pub:
            missed = pub.publish("demo:chat", "published while the node was down")
        gateway.start()
        wait_status(page, "open")
        wait_row(page, missed)
        # the restarted node's jobs arrive after what was missed
        page.wait_for_function(
            "(n) => document.querySelectorAll('#log li[data-id]').length >= n",
            arg=len(page.evaluate(LOG_IDS)) + 10,
            timeout=WAIT_MS,
        )
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)

        logged = page.evaluate(LOG_IDS)[::-1]  # the log shows the newest first
        assert len(logged) < 1000, "the log dropped rows: the check below would not hold"
        assert logged == held_ids(redis_client, prefix, logged[0], logged[-1])
        assert missed in logged
        trail = page.evaluate(STATUS_TRAIL)[::-1]
        assert trail[:2] == ["connecting", "open"], trail
        assert trail[-2:] == ["reconnecting", "open"], trail
        assert set(trail) <= {"connecting", "open", "reconnecting"}, trail
        assert page.evaluate(STATUS) == "open"
        assert not problems, problems
    finally:
        context.close()


def test_demo_page_on_the_embedded_engine_shows_the_reset_after_a_restart(
    browser: Any, gateway_factory: GatewayFactory
) -> None:
    """The quick start's engine keeps no history across a restart: the page says so (a
    ``reset`` row) and goes on with the new process's jobs."""
    gateway = gateway_factory("--demo")
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(gateway.url + "/demo")
        wait_status(page, "open")
        page.wait_for_selector("#log li[data-id]", timeout=WAIT_MS)
        gateway.stop(signal.SIGKILL)
        wait_status(page, "reconnecting")
        gateway.start()
        wait_status(page, "open")
        page.wait_for_selector("#log li.reset", timeout=WAIT_MS)
        assert "history lost on" in page.text_content("#log li.reset")
        newest = page.evaluate(LOG_IDS)[0]
        page.wait_for_function(
            "(id) => document.querySelector('#log li[data-id]').dataset.id !== id",
            arg=newest,
            timeout=WAIT_MS,
        )
    finally:
        context.close()
