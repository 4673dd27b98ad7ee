"""Issue 10 A, acceptance 2: a page refused by a full node gets in by itself once a slot frees,
and receives every event, those published while it was refused included (in Chromium)."""

from __future__ import annotations

from typing import Any

import httpx

from publisher import Publisher
from tests.browser.page import log_of, open_page
from tests.conftest import GatewayFactory

WAIT_MS = 15_000


def test_a_page_refused_by_a_full_node_gets_in_once_a_slot_frees(
    browser: Any, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory("--max-connections", "1", "--retry-ms", "300")
    context = browser.new_context()
    with (
        Publisher.from_url(gateway.url) as pub,
        httpx.Client(base_url=gateway.url, timeout=httpx.Timeout(10, read=None)) as http,
    ):
        start = pub.publish("feed", "start", "start")
        try:
            with http.stream("GET", "/events?topic=other") as occupant:
                assert occupant.status_code == 200
                page = open_page(context, gateway.url, f"/events?topic=feed&lastEventID={start}")
                # refused, and retrying: the page saw the reason and is not closed for good
                page.wait_for_function("() => window.log.refused.length >= 2", timeout=WAIT_MS)
                for seq in range(5):
                    pub.publish("feed", {"seq": seq}, "n")
                log = log_of(page)
                assert set(log["refused"]) == {"too_many_connections"}, log
                # what the README promises a page sees: open, the refusal, error, and again
                assert log["trace"][:4] == ["open", "refused", "error", "open"], log
                assert not log["closedForGood"], log
                assert log["seqs"] == [], log
            # the slot is free: the page gets in by itself and receives what it missed, then more
            page.wait_for_function("() => window.log.seqs.length >= 5", timeout=WAIT_MS)
            for seq in range(5, 10):
                pub.publish("feed", {"seq": seq}, "n")
            page.wait_for_function("() => window.log.seqs.length >= 10", timeout=WAIT_MS)
            log = log_of(page)
            assert log["seqs"] == list(range(10)), log
            assert page.evaluate("() => window.source.readyState") == 1  # OPEN
        finally:
            context.close()
