"""Scenario 10: the pub/sub links go silently dead (no FIN, no RST: a NAT or firewall forgot
them), so only the nodes' self-probe can tell. Each node must notice within the probe interval
plus its timeout, reconnect, re-subscribe and backfill; clients stay connected and miss
nothing."""

from __future__ import annotations

import time

import pytest

from tests.chaos.harness import Chaos
from tests.support.clients import spread_topics, wait_connected
from tests.support.invariants import Ledger, check_delivery, summary, wait_caught_up
from tests.support.waiting import let_time_pass, wait_until

TOPICS = [f"silent{i}" for i in range(5)]
PROBE = 1.0


@pytest.mark.chaos
def test_silently_dead_pubsub_links_are_found_by_the_probe(chaos: Chaos) -> None:
    server = chaos.redis()
    proxy = chaos.freezing_proxy(server.port)
    nodes = [chaos.node(proxy.url, "--probe-interval", str(PROBE)) for _ in range(2)]
    lb = chaos.load_balancer(nodes)
    clients = chaos.clients(lb.port, spread_topics(TOPICS, 60))
    wait_connected(clients)
    publisher = chaos.publisher(server.url, TOPICS, rate=60).start()

    let_time_pass(2, "events flow before the link goes silent")
    assert proxy.pubsub_links() == len(nodes)
    assert proxy.freeze_pubsub() == len(nodes)
    began = time.monotonic()
    # A probe every PROBE s, answered within min(3, PROBE) s: found within about 2 * PROBE.
    wait_until(lambda: proxy.pubsub_links() == len(nodes), "the nodes to relink", 10)
    relinked = time.monotonic() - began
    let_time_pass(3, "events flow on the new links")
    publisher.stop()

    ledger = Ledger([publisher])
    wait_caught_up(clients, ledger)
    print(summary(clients, ledger), f"relinked after {relinked:.1f}s")
    check_delivery(clients, ledger)
    assert relinked <= 2 * PROBE + 2, f"the dead links were found after {relinked:.1f}s"
    moved = [c.describe() for c in clients if c.reconnects]
    assert not moved, f"{len(moved)} clients had to reconnect: {moved[:3]}"
