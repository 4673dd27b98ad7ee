"""Scenario 1: every node's pub/sub link is killed by Redis (``CLIENT KILL TYPE pubsub``), three
times a few seconds apart, while events flow. No client may miss or repeat an event; once the
nodes backfill after a link loss (spec 4), clients must not even notice (no reconnect)."""

from __future__ import annotations

import contextlib

import pytest

from tests.chaos.harness import Chaos, backfill_available
from tests.support.clients import spread_topics, wait_connected
from tests.support.invariants import Ledger, check_delivery, summary, wait_caught_up
from tests.support.waiting import let_time_pass

TOPICS = [f"kill{i}" for i in range(5)]


@pytest.mark.chaos
def test_pubsub_links_killed_three_times_lose_nothing(chaos: Chaos) -> None:
    server = chaos.redis()
    nodes = [chaos.node(server.url) for _ in range(2)]
    lb = chaos.load_balancer(nodes)
    clients = chaos.clients(lb.port, spread_topics(TOPICS, 60))
    wait_connected(clients)
    publisher = chaos.publisher(server.url, TOPICS, rate=60).start()

    let_time_pass(2, "events flow before the first kill")
    killed = []
    with contextlib.closing(server.client()) as admin:
        for _ in range(3):
            killed.append(admin.client_kill_filter(_type="pubsub"))
            let_time_pass(3, "events flow between kills")
    publisher.stop()

    ledger = Ledger([publisher])
    wait_caught_up(clients, ledger)
    print(summary(clients, ledger))
    assert all(count >= len(nodes) for count in killed), f"pub/sub links killed: {killed}"
    check_delivery(clients, ledger)
    if backfill_available():
        moved = [c.describe() for c in clients if c.reconnects]
        assert not moved, f"{len(moved)} clients had to reconnect: {moved[:3]}"
