"""Issue 12, job_progress: worker processes report jobs with ``Publisher.job()``; in Chromium
the bars reach 100 %, a failed job shows its error, a reload mid-job restores every bar (from
``sessionStorage`` and a resume with the last event id), and a fresh page with
``?since=<epoch ms>`` restores them from history (embedded engine, and Redis behind a
balancer)."""

from __future__ import annotations

import socket
import time
from typing import Any

from tests.examples.conftest import Launch, screenshot

WAIT_MS = 15_000
BARS = (
    "() => Object.fromEntries([...document.querySelectorAll('#jobs .job')].map(li => [li.id,"
    " {status: li.dataset.status, percent: Number(li.dataset.percent),"
    " name: li.querySelector('.name').textContent,"
    " error: li.querySelector('.error').textContent}]))"
)


def bars(page: Any) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = page.evaluate(BARS)
    return result


def test_bars_complete_fail_and_survive_a_reload(browser: Any, launch: Launch) -> None:
    since = int(time.time() * 1000) - 1000
    example = launch("job_progress")
    context = browser.new_context()
    fresh = browser.new_context()
    try:
        page = context.new_page()
        page.goto(example.url)
        page.locator('.job[data-status="completed"][data-percent="100"]').first.wait_for(
            timeout=WAIT_MS
        )
        failed = page.locator('.job[data-status="failed"] .error').first
        failed.wait_for(timeout=WAIT_MS)
        assert "JobError: disk full while writing item 11 of 20" in failed.text_content()
        page.wait_for_function(
            "() => [...document.querySelectorAll('.job[data-status=running]')]"
            ".some(li => Number(li.dataset.percent) > 0)",
            timeout=WAIT_MS,
        )
        before = bars(page)
        host = socket.gethostname()
        assert all(f" on {host}/" in bar["name"] for bar in before.values()), before
        running = [key for key, bar in before.items() if bar["status"] == "running"]

        # Reload mid-job: every bar is back, no lower than it was, and the stream resumes
        # after the page's last event id.
        streams: list[str] = []
        page.on("request", lambda r: streams.append(r.url) if "/events?" in r.url else None)
        page.reload()
        page.wait_for_function(
            f"() => document.querySelectorAll('#jobs .job').length >= {len(before)}",
            timeout=WAIT_MS,
        )
        after = bars(page)
        for key, bar in before.items():
            assert key in after, (key, after)
            assert after[key]["percent"] >= bar["percent"], (key, bar, after[key])
        page.locator("#status").filter(has_text="open").wait_for(timeout=WAIT_MS)
        assert streams, "the reloaded page opened no stream"
        assert "lastEventID=" in streams[0], streams[0]
        assert "since=" not in streams[0], streams[0]
        for key in running:  # the jobs running at the reload finish on the reloaded page
            page.wait_for_function(
                f"() => document.getElementById({key!r}).dataset.status !== 'running'",
                timeout=WAIT_MS,
            )
        screenshot(page, f"job_progress-{launch.mode}")  # type: ignore[attr-defined]

        # A page with no sessionStorage and ?since= rebuilds the same bars from history.
        seen = bars(page)
        other = fresh.new_page()
        other.goto(f"{example.url}?since={since}")
        other.wait_for_function(
            f"() => document.querySelectorAll('#jobs .job').length >= {len(seen)}",
            timeout=WAIT_MS,
        )
        replayed = bars(other)
        for key, bar in seen.items():
            if bar["status"] != "running":
                assert replayed[key] == bar, (key, bar, replayed.get(key))
    finally:
        fresh.close()
        context.close()
