"""Slow consumers are shed, not buffered (docs/architecture.md §6).

A client that stops reading must not pin the gateway's memory or hold up anyone else: once its
pending bytes pass ``--max-pending-bytes`` (or one write takes longer than ``--send-timeout``)
the gateway drops the connection and counts it, while healthy clients of the same topic keep
receiving every event in order. The dropped browser reconnects with its Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import Node, NodeFactory
from tests.support.gateway import open_sockets, settled_sockets
from tests.support.sse import SSEStream, open_stream
from tests.support.waiting import wait_until

TOPIC = "feed:big"
EVENT_SIZE = 16 * 1024
BATCH = 8
"""Events per publish batch; the healthy client catches up between batches, so its own pending
bytes stay near BATCH * EVENT_SIZE (128 KiB), well under the limits used here."""

SLOW_CONSUMER = 'sse_disconnects_total{reason="slow_consumer"}'
SEND_TIMEOUT = 'sse_disconnects_total{reason="send_timeout"}'


def payload(i: int) -> str:
    return f"{i:06d}:" + "x" * (EVENT_SIZE - 7)


class StalledClient:
    """A raw TCP client that sends ``GET /events`` and then never reads.

    A small receive buffer, set before connecting, keeps the kernel from soaking up much of
    the stream on the client side."""

    def __init__(self, port: int, topic: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        request = f"GET /events?topic={topic} HTTP/1.1\r\nHost: test\r\n\r\n"
        self.sock.sendall(request.encode())
        # Read only the response head and the preamble, then stop reading for good.
        head = b""
        while b": ok\n\n" not in head:
            chunk = self.sock.recv(1024)
            assert chunk, f"gateway closed the stream early: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head

    def drain_until_closed(self, timeout: float = 15.0) -> tuple[int, bool]:
        """Read everything the kernel holds; return (bytes read, whether EOF/RST was seen)."""
        received = 0
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += len(chunk)
        return received, False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def stalled_clients() -> Iterator[list[StalledClient]]:
    clients: list[StalledClient] = []
    yield clients
    for client in clients:
        client.close()


@dataclass
class Flow:
    healthy: list[str]
    published: int
    dropped_after: int | None
    """How many events had been published when the gateway reported the drop (None: never)."""
    rss_before: int
    rss_peak: int


async def warm_up(node: Node, stream: SSEStream) -> None:
    await stream.until_subscribed()


async def run_flow(node: Node, metric: str, total: int) -> Flow:
    """Publish ``total`` large events to TOPIC while a healthy client reads them, in lock-step
    batches (each batch is read by the healthy client before the next is published); watch
    the gateway's RSS and when ``metric`` (a disconnect reason) first counts a drop."""
    gateway = node.gateway
    timeout = httpx.Timeout(30, read=None)
    async with httpx.AsyncClient(timeout=timeout) as client:
        healthy, reading = open_stream(client, node.url, [TOPIC])
        try:
            await warm_up(node, healthy)

            rss_before = rss_peak = gateway.rss_bytes()
            dropped_after = None
            published = 0
            while published < total:
                batch = [(TOPIC, payload(i)) for i in range(published, published + BATCH)]
                await asyncio.to_thread(node.publisher.publish_many, batch)
                published += BATCH
                await healthy.wait_for(_received_at_least(published), timeout=30)
                rss_peak = max(rss_peak, gateway.rss_bytes())
                check = dropped_after is None and published % (4 * BATCH) == 0
                if check and await asyncio.to_thread(gateway.metric, metric) >= 1:
                    dropped_after = published
            assert not healthy.closed_by_server, "the healthy client was disconnected"
            return Flow(
                [e.data for e in healthy.events if e.event == "message"],
                published,
                dropped_after,
                rss_before,
                rss_peak,
            )
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)


def _received(stream: SSEStream) -> int:
    return sum(e.event == "message" for e in stream.events)


def _received_at_least(count: int) -> Callable[[SSEStream], bool]:
    return lambda stream: _received(stream) >= count


def test_stalled_client_is_dropped_when_pending_bytes_pass_the_limit(
    node_factory: NodeFactory, stalled_clients: list[StalledClient]
) -> None:
    # The send timeout is far longer than the test: only the pending-bytes limit can fire.
    node = node_factory(
        "--max-pending-bytes", "262144", "--send-timeout", "120", "--heartbeat", "60",
        max_events=50,
    )  # fmt: skip
    stalled = StalledClient(node.gateway.port, TOPIC)
    stalled_clients.append(stalled)

    # 2000 x 16 KiB = 32 MiB: several times what the kernel buffers plus the limit can hold.
    total = 2000
    flow = asyncio.run(run_flow(node, SLOW_CONSUMER, total))

    # The healthy client saw every event, in order, none missing, none repeated.
    assert flow.healthy == [payload(i) for i in range(total)]

    # The stall was detected while the events were still flowing (about 4.5 MiB of kernel
    # buffers plus 256 KiB of pending bytes fill after roughly 300 events), not at the end.
    assert flow.dropped_after is not None, (
        "the stalled client was not dropped while 32 MiB flowed past a 256 KiB limit"
    )
    assert flow.dropped_after <= total // 2
    assert node.gateway.metric(SLOW_CONSUMER) == 1

    # Memory stayed bounded: far below the volume that flowed through the stalled stream.
    growth = flow.rss_peak - flow.rss_before
    assert growth < 16 * 2**20, f"gateway RSS grew by {growth / 2**20:.1f} MiB"

    # The server really closed the stalled connection: draining it ends in EOF or RST, after
    # much less than everything that was published.
    received, closed = stalled.drain_until_closed()
    assert closed, "the stalled socket was never closed by the gateway"
    assert received < total * EVENT_SIZE // 2


def test_stalled_client_is_dropped_by_the_send_timeout(
    node_factory: NodeFactory, stalled_clients: list[StalledClient]
) -> None:
    # The pending limit is far above what flows: only the send timeout can fire.
    node = node_factory(
        "--max-pending-bytes", str(256 * 2**20), "--send-timeout", "1", "--heartbeat", "60",
        max_events=50,
    )  # fmt: skip
    stalled = StalledClient(node.gateway.port, TOPIC)
    stalled_clients.append(stalled)

    # 800 x 16 KiB = 12.5 MiB: enough to fill the kernel buffers so a write blocks.
    total = 800
    flow = asyncio.run(run_flow(node, SEND_TIMEOUT, total))

    assert flow.healthy == [payload(i) for i in range(total)]

    def dropped_count() -> float:
        return node.gateway.metric(SEND_TIMEOUT) + node.gateway.metric(SLOW_CONSUMER)

    with contextlib.suppress(AssertionError):  # checked below, with the count
        wait_until(lambda: dropped_count() >= 1, "a dropped client", 10, step=0.2)
    dropped = dropped_count()
    assert dropped == 1, "a client whose writes block past --send-timeout was not dropped"

    received, closed = stalled.drain_until_closed()
    assert closed, "the stalled socket was never closed by the gateway"
    assert received < total * EVENT_SIZE


def test_a_reading_client_is_never_dropped_at_the_same_limits(node_factory: NodeFactory) -> None:
    """The limits shed only clients that stop reading: one that reads is served to the end."""
    node = node_factory("--max-pending-bytes", "262144", "--send-timeout", "1", max_events=50)
    total = 400

    async def scenario() -> list[str]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client:
            stream, reading = open_stream(client, node.url, [TOPIC])
            try:
                await warm_up(node, stream)
                for start in range(0, total, BATCH):
                    batch = [(TOPIC, payload(i)) for i in range(start, start + BATCH)]
                    await asyncio.to_thread(node.publisher.publish_many, batch)
                    await stream.wait_for(_received_at_least(start + BATCH), 30)
                assert not stream.closed_by_server
                return [e.data for e in stream.events if e.event == "message"]
            finally:
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)

    assert asyncio.run(scenario()) == [payload(i) for i in range(total)]
    assert node.gateway.metric(SLOW_CONSUMER) == 0
    assert node.gateway.metric(SEND_TIMEOUT) == 0


def test_a_shed_client_is_let_go_at_once_not_left_flushing(
    node_factory: NodeFactory, stalled_clients: list[StalledClient]
) -> None:
    """Closing a stalled socket gracefully would wait forever to flush its buffer, pinning the
    descriptor and the memory; the gateway aborts it instead."""
    node = node_factory(
        "--max-pending-bytes", str(256 * 1024), "--send-timeout", "60", "--heartbeat", "60",
        max_events=50,
    )  # fmt: skip
    baseline = settled_sockets(node.gateway.pid)
    stalled = StalledClient(node.gateway.port, TOPIC)
    stalled_clients.append(stalled)
    assert settled_sockets(node.gateway.pid) == baseline + 1

    payload = "x" * EVENT_SIZE
    deadline = time.monotonic() + 30
    while node.gateway.metric(SLOW_CONSUMER) < 1:
        assert time.monotonic() < deadline, "the stalled client was never shed"
        for _ in range(50):
            node.publish(TOPIC, payload)

    wait_until(
        lambda: open_sockets(node.gateway.pid) <= baseline,
        "the gateway to let go of the shed client's socket",
        3,
    )
