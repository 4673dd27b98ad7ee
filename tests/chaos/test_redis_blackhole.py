"""Scenario 11 (issue 10 D, blackhole): the network between the nodes and Redis goes black
for 10 s. Every byte is dropped both ways and nothing is closed: the open connections go
silent, and new ones connect but never get a reply. Then new connections pass again, while
the ones that went black stay black. One publisher reaches Redis directly and keeps
publishing, another goes through the proxy (with retries), and more clients arrive in the dark.

Each node must recover by itself, because every Redis wait (connect, handshake, subscribe,
reads) has a time limit: a new pub/sub link, /readyz 200 again, and everything acknowledged
meanwhile backfilled or replayed to each client, exactly once and in order."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.chaos.harness import Chaos
from tests.support.clients import spread_topics, wait_connected
from tests.support.invariants import Ledger, check_delivery, summary, wait_caught_up
from tests.support.proxy import BlackholeProxy
from tests.support.waiting import let_time_pass, wait_until

TOPICS = [f"black{i}" for i in range(5)]
BLACKHOLE = 10.0
RECOVERY = 20.0
"""Seconds after the network comes back within which each node must be linked and ready (a
link attempt that went black gives up after its connect timeout, then the next one passes)."""


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.chaos
def test_nodes_recover_by_themselves_after_a_blackholed_network(chaos: Chaos) -> None:
    server = chaos.redis()
    proxy = BlackholeProxy(server.port)
    chaos.defer(proxy.close)
    nodes = [chaos.node(proxy.url) for _ in range(2)]
    lb = chaos.load_balancer(nodes)
    clients = chaos.clients(lb.port, spread_topics(TOPICS, 60))
    wait_connected(clients)
    publisher = chaos.publisher(server.url, TOPICS, rate=40).start()
    proxied = chaos.publisher(proxy.url, TOPICS, rate=10, name="q", retry_for=30).start()

    let_time_pass(2, "events flow before the network goes black")
    assert proxy.live_pubsub_links() == len(nodes)
    assert proxy.blackhole() >= len(nodes)
    began = time.monotonic()
    let_time_pass(BLACKHOLE / 3, "the network stays black")
    # Clients that arrive in the dark: refused or held, never stranded.
    late = chaos.clients(lb.port, spread_topics(TOPICS, 10), name="late")
    let_time_pass(BLACKHOLE - (time.monotonic() - began), "the fault lasts BLACKHOLE s")
    proxy.restore()
    back = time.monotonic()
    during = Ledger([publisher, proxied])
    clients = clients + late

    problems = []
    try:
        wait_until(lambda: proxy.live_pubsub_links() == len(nodes), "the nodes to relink", RECOVERY)
    except TimeoutError as exc:
        problems.append(f"{exc}: {proxy.live_pubsub_links()} of {len(nodes)} links")
    relinked = time.monotonic() - back
    try:
        wait_until(
            lambda: all(_ready(n.url) for n in nodes), "/readyz", max(1.0, RECOVERY - relinked)
        )
    except TimeoutError as exc:
        problems.append(f"{exc}: {[_ready(n.url) for n in nodes]}")
    ready = time.monotonic() - back
    # Everything acknowledged up to the end of the blackhole reaches every client.
    settled = wait_caught_up(clients[: -len(late)], during, max(1.0, RECOVERY - ready)) + ready
    caught_up = wait_caught_up(clients, during, max(1.0, RECOVERY - ready)) + ready
    if not problems:
        let_time_pass(3, "events after the recovery")
        # A publish stuck in the dark gives up after its socket timeout, then its retry passes.
        wait_until(lambda: proxied.acked[-1].at > back, "publishing through the proxy", RECOVERY)
    publisher.stop()
    proxied.stop()

    ledger = Ledger([publisher, proxied])
    wait_caught_up(clients, ledger, 1 if problems else 15)
    print(
        summary(clients, ledger),
        f"after the blackhole: relinked {relinked:.1f}s, ready {ready:.1f}s, "
        f"clients caught up {settled:.1f}s (with those that came in the dark {caught_up:.1f}s); "
        f"through the proxy: {len(proxied.acked)} acked, "
        f"{len(proxied.failed)} failed, slowest {proxied.slowest:.1f}s",
    )
    assert not problems, "the nodes did not recover by themselves:\n" + "\n".join(problems)
    assert not publisher.failed, f"direct publishes failed: {publisher.failed[:3]}"
    check_delivery(clients, ledger)
    assert caught_up < RECOVERY, f"clients caught up {caught_up:.1f}s after the blackhole"
