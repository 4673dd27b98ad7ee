"""Scenario 8: 5000 short connections (50 at a time) against one node, in every way a client
may leave: after the preamble, mid-replay, before the response, with a reset. Afterwards the
node holds nothing for them: no connection, no topic (after the linger), no socket, and its
memory is back near where it was; the long-lived clients behind the load balancer missed
nothing."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
import urllib.parse

import pytest

from tests.chaos.harness import Chaos
from tests.support.clients import spread_topics, wait_connected
from tests.support.gateway import open_sockets
from tests.support.invariants import Ledger, check_delivery, socket_peers, summary, wait_caught_up
from tests.support.publishing import PublisherThread
from tests.support.waiting import let_time_pass, wait_until

TOPICS = [f"churn-live{i}" for i in range(4)]
CYCLES = 5000
CONCURRENCY = 50


async def one_cycle(port: int, i: int, last_id: str) -> None:
    """One connection that leaves in the ``i % 4``th way."""
    topics = [f"churn-{i % 40}"] if i % 2 == 0 else [TOPICS[i % len(TOPICS)], f"churn-{i % 40}"]
    query = urllib.parse.urlencode([("topic", t) for t in topics])
    headers = f"Last-Event-ID: {last_id}\r\n" if i % 4 == 1 and last_id else ""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET /events?{query} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
        if i % 4 == 2:
            return  # gone before the response
        await asyncio.wait_for(reader.readuntil(b": ok"), 10)
        if i % 4 == 1:
            await asyncio.wait_for(reader.read(4096), 10)  # some of the replay
        if i % 4 == 3:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        writer.close()


async def churn(port: int, publisher: PublisherThread) -> int:
    failures = 0
    todo = iter(range(CYCLES))

    async def worker() -> None:
        nonlocal failures
        for i in todo:
            last_id = publisher.acked[-50].id if len(publisher.acked) > 50 else ""
            try:
                await one_cycle(port, i, last_id)
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                failures += 1

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return failures


@pytest.mark.chaos
def test_connection_churn_leaves_nothing_behind(chaos: Chaos) -> None:
    server = chaos.redis()
    nodes = [chaos.node(server.url, "--linger", "0.2") for _ in range(2)]
    target = nodes[0]
    lb = chaos.load_balancer(nodes)
    clients = chaos.clients(lb.port, spread_topics(TOPICS, 50))
    wait_connected(clients)
    publisher = chaos.publisher(server.url, TOPICS, rate=40).start()
    let_time_pass(1.5, "events flow before the churn")
    connections = target.metric("sse_connections ")
    topics = target.metric("sse_hub_topics ")
    rss_before = target.rss_bytes()
    sockets_before = open_sockets(target.pid) - socket_peers(target.pid)[server.port]
    assert connections == lb.open_to(target.port)

    began = time.monotonic()
    failures = asyncio.run(churn(target.port, publisher))
    took = time.monotonic() - began
    opened = target.metric("sse_connections_opened_total")

    def settled() -> bool:
        return (
            target.metric("sse_connections ") == connections
            and target.metric("sse_hub_topics ") == topics
        )

    try:
        wait_until(settled, "the node to let go of the churned connections", 10, 0.2)
    finally:
        publisher.stop()
    rss_growth = (target.rss_bytes() - rss_before) / 2**20

    def sockets_now() -> int:
        return open_sockets(target.pid) - socket_peers(target.pid)[server.port]

    # The gauge drops as a stream ends; its socket is closed a moment later.
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: sockets_now() <= sockets_before + 3, "the sockets to close", 5)
    peers = socket_peers(target.pid)
    sockets = sockets_now()

    ledger = Ledger([publisher])
    wait_caught_up(clients, ledger)
    print(
        summary(clients, ledger),
        f"churn {CYCLES} in {took:.1f}s ({failures} failed), opened {opened:g}, "
        f"RSS +{rss_growth:.1f} MiB, sockets {sockets_before} -> {sockets} "
        f"(and {peers[server.port]} to Redis)",
    )
    assert failures == 0
    assert rss_growth < 30, f"RSS grew by {rss_growth:.1f} MiB over {CYCLES} connections"
    assert sockets <= sockets_before + 3, f"sockets {sockets_before} -> {sockets}"
    # The Redis connection pool may grow with concurrent replays, but not past the load.
    assert peers[server.port] <= CONCURRENCY + 5, f"{peers[server.port]} connections to Redis"
    check_delivery(clients, ledger)
    assert not [c.describe() for c in clients if c.reconnects]
