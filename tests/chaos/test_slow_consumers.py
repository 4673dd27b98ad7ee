"""Scenario 7: 200 stalled clients (they send the GET and never read) on one node while large
events flow fast. The node sheds them by policy (pending bytes or send timeout), its memory
stays bounded, and the healthy clients, through the load balancer, miss nothing."""

from __future__ import annotations

import contextlib

import pytest

from tests.chaos.harness import Chaos
from tests.support.clients import spread_topics, wait_connected
from tests.support.gateway import open_sockets
from tests.support.invariants import Ledger, check_delivery, summary, wait_caught_up
from tests.support.waiting import WaitTimeout, let_time_pass, wait_until

HOT = "slow-hot"
CALM = ["slow1", "slow2", "slow3"]
STALLED = 200
SHED = (
    'sse_disconnects_total{reason="slow_consumer"}',
    'sse_disconnects_total{reason="send_timeout"}',
)


@pytest.mark.chaos
def test_stalled_clients_are_shed_and_memory_stays_bounded(chaos: Chaos) -> None:
    server = chaos.redis()
    limits = ("--max-pending-bytes", "65536", "--send-timeout", "2")
    nodes = [chaos.node(server.url, *limits) for _ in range(2)]
    victim = nodes[0]
    lb = chaos.load_balancer(nodes)
    # Most healthy clients read the calm topics; a few read the hot one with the stalled.
    topic_sets = spread_topics(CALM, 52) + [(HOT,)] * 4 + [(HOT, CALM[0])] * 4
    healthy = chaos.clients(lb.port, topic_sets)
    wait_connected(healthy)
    let_time_pass(0.5, "the node at rest with its clients, before its RSS is read")
    rss_before = victim.rss_bytes()
    sockets_before = open_sockets(victim.pid)

    stalled = chaos.stalled()
    stalled.open(victim.port, [HOT], STALLED)
    assert victim.metric("sse_connections ") >= STALLED

    # About 2.9 MiB fill each stalled socket's kernel buffers before a write blocks: the hot
    # topic carries 400 KiB/s of 2 KiB events, in bursts of 10 (one write per client each).
    calm = chaos.publisher(server.url, CALM, rate=60, name="calm").start()
    hot = chaos.publisher(
        server.url, [HOT], rate=200, batch=10, payload_bytes=2048, pair_every=0, name="hot"
    ).start()
    rss_peak = rss_before
    dropped = 0.0

    def all_shed() -> bool:
        """Samples the RSS every 0.5 s until every stalled client is dropped."""
        nonlocal rss_peak, dropped
        rss_peak = max(rss_peak, victim.rss_bytes())
        dropped = sum(victim.metric(name) for name in SHED)
        return dropped >= STALLED

    with contextlib.suppress(WaitTimeout):  # ``dropped`` is checked below
        wait_until(all_shed, "every stalled client dropped", 40, 0.5)
    let_time_pass(1, "the hot topic goes on after the drops: RSS stays bounded")
    rss_peak = max(rss_peak, victim.rss_bytes())
    hot.stop()
    calm.stop()

    ledger = Ledger([calm, hot])
    wait_caught_up(healthy, ledger)
    growth = (rss_peak - rss_before) / 2**20
    print(summary(healthy, ledger), f"shed {dropped:g}, RSS growth {growth:.1f} MiB")
    assert dropped >= STALLED, f"only {dropped:g} of {STALLED} stalled clients were shed"
    assert growth < 150, f"the node's RSS grew by {growth:.1f} MiB"
    check_delivery(healthy, ledger)
    assert victim.metric("sse_connections ") == lb.open_to(victim.port)
    # The shed sockets are released (aborted, not left flushing to a peer that never reads).
    assert open_sockets(victim.pid) <= sockets_before + 5
