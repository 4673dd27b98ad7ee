"""Issue 10 A, acceptance 2: pages streaming through a load balancer from two nodes, while each
node is drained (SIGTERM) and restarted in turn, all end up streaming, with every published
sequence number exactly once and in order (in Chromium).

The balancer never looks at readiness (the worst case, as every balancer is until its next
health check): pages that reconnect into the draining node are refused there, retry by
themselves after the jittered ``retry:``, and land on the other node."""

from __future__ import annotations

import threading
import time
from typing import Any

from publisher import Publisher
from tests.browser.page import log_of, open_page
from tests.support.gateway import GatewayProcess
from tests.support.proxy import LoadBalancer

PAGES = 6
"""Each in a context of its own (a browser allows 6 connections per host and profile)."""
WAIT_MS = 20_000
NODE_ARGS = ("--drain-seconds", "2", "--retry-ms", "400", "--heartbeat", "2")


class Numbered:
    """Publishes ``{"seq": n}`` events (``event: n``) at a steady rate from a thread."""

    def __init__(self, pub: Publisher, topic: str, rate: float) -> None:
        self.pub = pub
        self.topic = topic
        self.interval = 1 / rate
        self.sent = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="numbered-publisher")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.pub.publish(self.topic, {"seq": self.sent}, "n")
            except Exception as exc:
                self.errors.append(repr(exc))
                continue
            self.sent += 1

    def start(self) -> Numbered:
        self._thread.start()
        return self

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.sent


def wait_all(pages: list[Any], expression: str, what: str) -> None:
    for index, page in enumerate(pages):
        try:
            page.wait_for_function(expression, timeout=WAIT_MS)
        except Exception as exc:
            raise AssertionError(f"page {index} never {what}: {log_of(page)}") from exc


def test_pages_survive_a_rolling_drain_behind_a_balancer(
    browser: Any, redis_url: str, prefix: str
) -> None:
    nodes = [GatewayProcess("--prefix", prefix, *NODE_ARGS, redis_url=redis_url) for _ in range(2)]
    contexts: list[Any] = []
    balancer: LoadBalancer | None = None
    numbered: Numbered | None = None
    rolled: list[float] = []
    """Seconds from each SIGTERM until every page streamed again (drain, exit, restart)."""
    try:
        for node in nodes:
            node.start()
        balancer = LoadBalancer(node.port for node in nodes)
        origin = f"http://127.0.0.1:{balancer.port}"
        with Publisher.from_url(redis_url, prefix=prefix) as pub:
            start = pub.publish("roll", "start", "start")
            pages = []
            for _ in range(PAGES):
                contexts.append(browser.new_context())
                pages.append(
                    open_page(contexts[-1], origin, f"/events?topic=roll&lastEventID={start}")
                )
            numbered = Numbered(pub, "roll", rate=25).start()
            wait_all(pages, "() => window.log.seqs.length > 0", "received a first event")

            for node in nodes:
                began = time.monotonic()
                node.stop(timeout=10)  # SIGTERM: drain, then exit
                node.start()  # the same port: the balancer's pool never changes
                mark = numbered.sent
                wait_all(pages, f"() => window.log.seqs.includes({mark})", "streamed again")
                rolled.append(round(time.monotonic() - began, 1))

            sent = numbered.stop()
            assert numbered.errors == [], numbered.errors
            wait_all(pages, f"() => window.log.seqs.length >= {sent}", "caught up")
            logs = [log_of(page) for page in pages]
    finally:
        if numbered is not None:
            numbered.stop()
        for context in contexts:
            context.close()
        if balancer is not None:
            balancer.close()
        for node in nodes:
            node.close()

    for index, log in enumerate(logs):
        assert log["seqs"] == list(range(sent)), (index, log["seqs"][:50], log["refused"])
        assert not log["closedForGood"], (index, log)
    refusals = [log["refused"] for log in logs]
    print(f"{PAGES} pages, {sent} events, node by node back in {rolled} s, refusals {refusals}")
    # The balancer sent reconnects into the draining nodes, and none stranded a page.
    assert any(refusals), "no page met a draining node: the scenario did not test it"
