"""``--workers N``: N processes serve one port, each with its own hub; clients spread over them,
every client gets every event whatever worker holds it, and SIGTERM stops them all within the
drain window."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from publisher import Publisher
from tests.support.gateway import GatewayProcess, open_sockets
from tests.support.sse import SSEStream, open_stream, subscribed
from tests.support.waiting import wait_until

STREAMS = 12


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(child) for child in f.read().split()]


def _workers(pid: int) -> list[int]:
    """The gateway workers (not multiprocessing's resource tracker)."""
    workers = []
    for child in _children(pid):
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                workers.append(child)
    return workers


@pytest.fixture
def node(redis_url: str, prefix: str) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(
        "--workers", "2", "--prefix", prefix, "--drain-seconds", "1", redis_url=redis_url
    ).start()
    try:
        wait_until(lambda: len(_workers(gateway.pid)) >= 2 and _all_ready(gateway), "workers", 15)
    except AssertionError:
        raise AssertionError(f"workers did not start:\n{gateway.output()}") from None
    yield gateway
    gateway.close()


def _all_ready(gateway: GatewayProcess) -> bool:
    try:
        return all(
            httpx.get(gateway.url + "/readyz", timeout=1).status_code == 200 for _ in range(6)
        )
    except httpx.TransportError:
        return False


def test_streams_spread_over_the_workers_and_each_gets_every_event(
    node: GatewayProcess, redis_url: str, prefix: str
) -> None:
    workers = _workers(node.pid)
    before = {pid: open_sockets(pid) for pid in workers}

    async def scenario() -> list[SSEStream]:
        limits = httpx.Limits(max_connections=STREAMS * 2)
        timeout = httpx.Timeout(10, read=None)
        clients = [httpx.AsyncClient(timeout=timeout, limits=limits) for _ in range(STREAMS)]
        opened = [open_stream(client, node.url, ["orders"]) for client in clients]
        streams = [stream for stream, _ in opened]
        try:
            await subscribed(*streams)
            held = {pid: open_sockets(pid) - before[pid] for pid in workers}
            assert all(count > 0 for count in held.values()), f"streams per worker: {held}"
            with Publisher.from_url(redis_url, prefix=prefix) as pub:
                ids = [pub.publish("orders", {"n": n}) for n in range(5)]
            for stream in streams:
                await stream.wait_for(lambda s: len(s.events) >= len(ids))
                assert [e.id for e in stream.events] == ids
            return streams
        finally:
            for _, task in opened:
                task.cancel()
            await asyncio.gather(*(task for _, task in opened), return_exceptions=True)
            for client in clients:
                await client.aclose()

    assert len(asyncio.run(scenario())) == STREAMS


def test_sigterm_stops_every_worker_within_the_drain_window(node: GatewayProcess) -> None:
    workers = _workers(node.pid)
    started = time.monotonic()
    assert node.stop(signal.SIGTERM, timeout=15) is not None
    took = time.monotonic() - started
    assert took < 1 + 2 + 3, f"took {took:.1f}s"
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid), f"worker {pid} left"


def test_a_worker_that_dies_is_replaced(node: GatewayProcess) -> None:
    first = _workers(node.pid)
    os.kill(first[0], signal.SIGKILL)

    def replaced() -> bool:
        now = _workers(node.pid)
        return len(now) == 2 and first[0] not in now

    wait_until(replaced, "a replacement worker", 15, step=0.1)
    wait_until(lambda: _all_ready(node), "the new worker ready", 15, step=0.1)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_more_than_one_worker_needs_redis() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--workers", "2", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "--workers above 1 needs --redis-url" in result.stderr
