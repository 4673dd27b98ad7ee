"""Scenario 2: Redis is killed (SIGKILL) and restarted on the same port with its AOF while
publishers keep publishing with retries. Every acknowledged publish is stored once and reaches
every client once; the nodes reconnect and backfill, so clients stay connected."""

from __future__ import annotations

import contextlib

import pytest

from tests.chaos.harness import Chaos, backfill_available
from tests.support.clients import spread_topics, wait_connected
from tests.support.invariants import Ledger, check_delivery, stored_tags, summary, wait_caught_up
from tests.support.waiting import let_time_pass

TOPICS = [f"restart{i}" for i in range(5)]


@pytest.mark.chaos
def test_redis_killed_and_restarted_loses_nothing(chaos: Chaos) -> None:
    server = chaos.redis()
    nodes = [chaos.node(server.url) for _ in range(2)]
    lb = chaos.load_balancer(nodes)
    clients = chaos.clients(lb.port, spread_topics(TOPICS, 60))
    wait_connected(clients)
    publisher = chaos.publisher(server.url, TOPICS, rate=60, retry_for=30).start()

    let_time_pass(3, "events flow before the kill")
    server.kill()
    let_time_pass(2, "Redis stays down")
    server.start()
    let_time_pass(5, "events flow after the restart")
    publisher.stop()

    ledger = Ledger([publisher])
    wait_caught_up(clients, ledger)
    print(summary(clients, ledger), f"slowest publish {publisher.slowest:.2f}s")
    assert not publisher.failed, f"publishes failed despite retry_for: {publisher.failed[:3]}"
    with contextlib.closing(server.client()) as admin:
        stored = stored_tags(admin, chaos.prefix, TOPICS)
    wrong = {
        p.tag: stored.get(p.tag)
        for p in publisher.acked
        if stored.get(p.tag) != [p.id] * len(p.topics)
    }
    assert not wrong, f"{len(wrong)} acknowledged publishes not stored once under their id: {wrong}"
    assert set(stored) <= set(ledger.by_tag), "Redis holds events nobody acknowledged"
    check_delivery(clients, ledger)
    if backfill_available():
        moved = [c.describe() for c in clients if c.reconnects]
        assert not moved, f"{len(moved)} clients had to reconnect: {moved[:3]}"
