"""Scenario 3: Redis Sentinel. Nodes and publishers use a ``redis+sentinel://`` URL; a
``SENTINEL FAILOVER`` promotes the replica mid-run. Publishers retry onto the new primary and
every client gets every acknowledged publish once, in order.

Redis replicates asynchronously, and Sentinel turns the old primary into a replica only at its
next look at it (up to ~10 s after the promotion). The servers run with
``min-replicas-to-write 1`` (README, "Delivery guarantees"), so the old primary refuses writes
as soon as its replica leaves it; with one replica, the new primary accepts writes once the old
one has rejoined as its replica, and publishers retry through that pause. Nodes find the new
primary through Sentinel at their next probe."""

from __future__ import annotations

import contextlib
import time

import pytest

from tests.chaos.harness import Chaos
from tests.support.clients import spread_topics, wait_connected
from tests.support.invariants import Ledger, check_delivery, stored_tags, summary, wait_caught_up
from tests.support.waiting import let_time_pass

TOPICS = [f"sentinel{i}" for i in range(5)]


@pytest.mark.chaos
def test_sentinel_failover_loses_nothing(chaos: Chaos) -> None:
    setup = chaos.sentinel()
    nodes = [chaos.node(setup.url, "--probe-interval", "1") for _ in range(2)]
    lb = chaos.load_balancer(nodes)
    clients = chaos.clients(lb.port, spread_topics(TOPICS, 60))
    wait_connected(clients)
    publisher = chaos.publisher(
        setup.url, TOPICS, rate=60, retry_for=40, options={"wait_replicas": 1}
    ).start()

    let_time_pass(3, "events flow before the failover")
    began = time.monotonic()
    old, new = setup.failover()
    took = time.monotonic() - began
    let_time_pass(3, "events flow after the failover")
    publisher.stop()

    with contextlib.closing(setup.nodes[new].client()) as primary:
        stored = stored_tags(primary, chaos.prefix, TOPICS)
    ledger = Ledger([publisher])
    wait_caught_up(clients, ledger)
    print(
        summary(clients, ledger),
        f"failover {old} -> {new} in {took:.1f}s, slowest publish {publisher.slowest:.2f}s",
    )
    assert not publisher.failed, f"publishes failed despite retry_for: {publisher.failed[:3]}"
    lost = [p.tag for p in publisher.acked if p.tag not in stored]
    assert not lost, f"acknowledged but not on the new primary: {len(lost)} {lost[:5]}"
    wrong = {
        p.tag: stored[p.tag] for p in publisher.acked if stored[p.tag] != [p.id] * len(p.topics)
    }
    assert not wrong, f"{len(wrong)} publishes stored under another id or twice: {wrong}"
    check_delivery(clients, ledger)
    after = [p for p in publisher.acked if p.at > began + took]
    assert after, "nothing was published on the new primary"
