"""Issue 10 A, acceptance 2: a reconnect wave of 500 EventSource-like clients, all through one
balancer address, is not refused for good by the default limits.

500 clients stream from node A through a loopback balancer (every client has the balancer's
address, 127.0.0.1). Node B joins the pool and A is drained: the whole population moves at
once, meeting A's ``draining`` refusals on the way (the balancer still sends to A), and must all
end up streaming from B and receive what is published next. The clients behave as
``EventSource`` does: a non-200 answer would end one for good."""

from __future__ import annotations

import collections
import time

import httpx
import orjson

from publisher import Publisher
from tests.browser.eventsource import OPEN, Crowd, EventSourceLike
from tests.support.gateway import GatewayProcess
from tests.support.proxy import LoadBalancer
from tests.support.waiting import wait_until

CLIENTS = 500
NODE_ARGS = ("--drain-seconds", "3", "--retry-ms", "500")
"""Default admission limits: the point is that they let the wave through."""


def open_streams(node: GatewayProcess) -> float:
    text = httpx.get(node.url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("sse_connections "):
            return float(line.split()[1])
    raise AssertionError("no sse_connections gauge")


def describe(clients: list[EventSourceLike]) -> str:
    failed = collections.Counter(c.failed for c in clients if c.failed)
    states = collections.Counter(c.state for c in clients)
    reasons = collections.Counter(orjson.loads(r)["reason"] for c in clients for r in c.refused)
    errors = sum((c.errors for c in clients), collections.Counter[str]())
    return f"failed for good {dict(failed)}, states {dict(states)}, refusals {dict(reasons)}, " \
        f"network errors {dict(errors)}"  # fmt: skip


def test_a_wave_of_500_through_one_balancer_address_is_not_refused_for_good(
    redis_url: str, prefix: str
) -> None:
    a = GatewayProcess("--prefix", prefix, *NODE_ARGS, redis_url=redis_url)
    b = GatewayProcess("--prefix", prefix, *NODE_ARGS, redis_url=redis_url)
    crowd: Crowd | None = None
    balancer: LoadBalancer | None = None
    try:
        a.start()
        b.start()
        balancer = LoadBalancer([a.port])
        crowd = Crowd()
        clients = crowd.spawn(balancer.port, ["wave"], CLIENTS)

        def settled_on(node: GatewayProcess) -> bool:
            assert not any(c.failed for c in clients), describe(clients)
            return open_streams(node) == CLIENTS and all(c.state == OPEN for c in clients)

        wait_until(lambda: settled_on(a), f"{CLIENTS} streams on node A", 60)

        balancer.add(b.port)
        assert a.process is not None
        began = time.monotonic()
        a.process.send_signal(15)  # SIGTERM: drain over 3 s
        wait_until(lambda: settled_on(b), f"{CLIENTS} streams on node B", 60)
        moved = time.monotonic() - began

        with Publisher.from_url(redis_url, prefix=prefix) as pub:
            after = pub.publish("wave", "after the wave", "after")
        wait_until(
            lambda: all(any(e[0] == after for e in c.events) for c in clients),
            "every client to receive the event published after the wave",
            30,
        )
    finally:
        if crowd is not None:
            crowd.close()
        if balancer is not None:
            balancer.close()
        a.close()
        b.close()

    assert not any(c.failed for c in clients), describe(clients)
    print(f"{CLIENTS} clients moved in {moved:.1f}s: {describe(clients)}")
