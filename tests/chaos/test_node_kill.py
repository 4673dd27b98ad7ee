"""Scenario 4: one gateway node dies (SIGKILL) under load. Its clients' connections drop; they
reconnect through the load balancer (which skips the dead backend when its connect fails) with
their Last-Event-ID, land on the surviving node, and miss nothing."""

from __future__ import annotations

import signal

import pytest

from tests.chaos.harness import Chaos
from tests.support.clients import spread_topics, wait_connected
from tests.support.invariants import Ledger, check_delivery, summary, wait_caught_up
from tests.support.waiting import let_time_pass

TOPICS = [f"node{i}" for i in range(5)]


@pytest.mark.chaos
def test_clients_of_a_killed_node_resume_elsewhere_without_loss(chaos: Chaos) -> None:
    server = chaos.redis()
    nodes = [chaos.node(server.url) for _ in range(2)]
    victim, survivor = nodes
    lb = chaos.load_balancer(nodes)
    clients = chaos.clients(lb.port, spread_topics(TOPICS, 60))
    wait_connected(clients)
    on_victim = lb.open_to(victim.port)
    assert on_victim >= 20, f"round robin put only {on_victim} of 60 clients on the victim"
    publisher = chaos.publisher(server.url, TOPICS, rate=60).start()

    let_time_pass(3, "events flow before the kill")
    victim.stop(signal.SIGKILL)
    # The load balancer still lists the dead node for a while: connects to it are refused,
    # and each is retried on the next backend, as an L4 balancer does.
    let_time_pass(4, "the balancer still lists the dead node")
    lb.remove(victim.port)
    let_time_pass(1, "events flow on the survivors")
    publisher.stop()

    ledger = Ledger([publisher])
    wait_caught_up(clients, ledger)
    print(summary(clients, ledger), f"failed connects {lb.failed_connects}")
    check_delivery(clients, ledger)
    moved = [c for c in clients if c.reconnects]
    assert len(moved) >= on_victim, f"{on_victim} clients were on the victim, {len(moved)} moved"
    assert lb.open_to(survivor.port) == len(clients)
    assert lb.failed_connects >= 1, "no reconnect ever tried the dead node: the test proves less"
