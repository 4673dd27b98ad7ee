"""Issue 12, notifications: alice sees her toast and bob does not, project events follow the
filters chosen on the page, a token that expires mid-session is refreshed with nothing missed,
and "show what I missed" replays from a time (embedded engine, and Redis behind a balancer)."""

from __future__ import annotations

from typing import Any

import httpx

from tests.examples.conftest import Launch, screenshot
from tests.support.waiting import let_time_pass

WAIT_MS = 15_000
TOKEN_TTL = 3
BURST = 30
"""Notifications sent 0.2 s apart: 6 s, so the 3 s tokens expire at least once during it."""


def log_in(browser: Any, url: str, user: str) -> tuple[Any, Any, list[str]]:
    context = browser.new_context()
    page = context.new_page()
    tokens: list[str] = []
    page.on("request", lambda r: tokens.append(r.url) if r.url.endswith("/token") else None)
    page.goto(url)
    page.get_by_role("button", name=f"Log in as {user.title()}").click()
    page.locator("#conn").filter(has_text="open").wait_for(timeout=WAIT_MS)
    return context, page, tokens


def titles(page: Any, list_id: str = "recent") -> list[str]:
    return [str(t) for t in page.locator(f"#{list_id} li b").all_text_contents()]


def test_toasts_reach_their_user_only_and_survive_token_expiry(
    browser: Any, launch: Launch
) -> None:
    example = launch(
        "notifications",
        node_args=["--jwt-leeway", "0"],
        env={"NOTIFICATIONS_TOKEN_TTL": str(TOKEN_TTL)},
    )
    api = httpx.Client(base_url=example.url, timeout=10)
    alice_context, alice, alice_tokens = log_in(browser, example.url, "alice")
    bob_context, bob, _ = log_in(browser, example.url, "bob")
    try:

        def notify(**body: str) -> None:
            api.post("/api/notify", json=body).raise_for_status()

        notify(user="alice", level="success", title="for alice")
        alice.locator(".toast.success", has_text="for alice").wait_for(timeout=WAIT_MS)
        notify(user="bob", level="info", title="for bob")
        bob.locator(".toast.info", has_text="for bob").wait_for(timeout=WAIT_MS)
        notify(project="apollo", resource="cluster", level="warning", title="apollo node lost")
        alice.locator(".toast.warning", has_text="apollo node lost").wait_for(timeout=WAIT_MS)
        notify(project="zeus", resource="cluster", level="error", title="zeus down")
        bob.locator(".toast.error", has_text="zeus down").wait_for(timeout=WAIT_MS)
        assert titles(bob) == ["zeus down", "for bob"]

        # Filters are topics: without "workload", the gateway does not send workload events.
        alice.locator("input[value=workload]").uncheck()
        notify(project="apollo", resource="workload", level="info", title="workload event")
        notify(project="apollo", resource="project", level="info", title="project event")
        alice.locator("#recent li", has_text="project event").wait_for(timeout=WAIT_MS)
        assert "workload event" not in titles(alice)

        # Tokens last 3 s: the client fetches new ones and resumes, and misses nothing.
        before = len(alice_tokens)
        for n in range(BURST):
            notify(user="alice", level="info", title=f"burst {n}")
            let_time_pass(0.2, "a burst spread over the tokens' 3 s lifetime")
        alice.locator("#recent li", has_text=f"burst {BURST - 1}").wait_for(timeout=WAIT_MS)
        burst = [t for t in titles(alice) if t.startswith("burst ")]
        assert burst == [f"burst {n}" for n in reversed(range(BURST))]
        assert len(alice_tokens) - before >= 1, alice_tokens
        assert alice.locator("#conn").text_content() == "open"

        # "Show what I missed since …" replays alice's history from a time.
        alice.locator("#replay").click()
        alice.locator("#missed li", has_text=f"burst {BURST - 1}").wait_for(timeout=WAIT_MS)
        missed = titles(alice, "missed")
        assert missed[:3] == ["for alice", "apollo node lost", "project event"]
        assert "for bob" not in missed
        assert "burst 0" in missed
        mode = launch.mode  # type: ignore[attr-defined]
        screenshot(alice, f"example-notifications-alice-{mode}")
        screenshot(bob, f"example-notifications-bob-{mode}")
    finally:
        alice_context.close()
        bob_context.close()
        api.close()
