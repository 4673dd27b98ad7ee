"""Issue 13, acceptance 2: under ``--workers 2`` streams spread over both processes and one
scrape of whichever worker answers reports the whole node; a worker killed and restarted drops
out of the live gauges, while the counters keep what it counted."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from publisher import Publisher
from tests.gateway.metrics_support import Samples, wait_for
from tests.support.gateway import GatewayProcess, open_sockets
from tests.support.sse import open_stream
from tests.support.waiting import wait_until

STREAMS = 12
SCRAPES = 8
"""Scrapes per check: each lands on either worker (the kernel picks), all must agree."""


def _workers(pid: int) -> list[int]:
    """The gateway workers (not multiprocessing's resource tracker)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(child) for child in f.read().split()]
    workers = []
    for child in children:
        with open(f"/proc/{child}/cmdline", "rb") as f:
            if b"spawn_main" in f.read():
                workers.append(child)
    return workers


def _environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {name.decode(): value.decode() for name, value in pairs}


def every_scrape(url: str, check: dict[str, float], timeout: float = 15.0) -> Samples:
    """Scrape until ``SCRAPES`` scrapes in a row (from either worker) all show ``check``."""
    shown: list[dict[str, float | None]] = []

    def all_show() -> Samples | None:
        seen = [wait_for(url, lambda s: True) for _ in range(SCRAPES)]
        shown[:] = [{name: s.get(name) for name in check} for s in seen]
        return seen[-1] if all(values == check for values in shown) else None

    try:
        samples = wait_until(all_show, str(check), timeout)
    except AssertionError:
        raise AssertionError(f"never {check}: {shown}") from None
    assert samples is not None
    return samples


def start_node(redis_url: str, prefix: str, env: dict[str, str] | None = None) -> GatewayProcess:
    gateway = GatewayProcess(
        "--workers", "2", "--prefix", prefix, "--drain-seconds", "1", "--linger", "0",
        redis_url=redis_url, env=env,
    )  # fmt: skip
    gateway.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if env:
        gateway.env.update(env)
    gateway.start()
    try:
        wait_until(lambda: len(_workers(gateway.pid)) >= 2, "two workers", 15)
    except AssertionError:
        raise AssertionError(f"workers did not start:\n{gateway.output()}") from None
    return gateway


@pytest.fixture
def node(redis_url: str, prefix: str) -> Iterator[GatewayProcess]:
    gateway = start_node(redis_url, prefix)
    yield gateway
    gateway.close()


def test_one_scrape_reports_every_worker_and_a_dead_worker_drops_out(
    node: GatewayProcess, redis_url: str, prefix: str
) -> None:
    workers = _workers(node.pid)
    directory = Path(_environ(workers[0])["PROMETHEUS_MULTIPROC_DIR"])
    assert directory.is_dir()
    every_scrape(node.url, {"sse_node_ready": 1, "sse_engine_link_up": 1, "sse_connections": 0})
    before = {pid: open_sockets(pid) for pid in workers}

    async def scenario() -> int:
        limits = httpx.Limits(max_connections=1)
        timeout = httpx.Timeout(10, read=None)
        clients = [httpx.AsyncClient(timeout=timeout, limits=limits) for _ in range(STREAMS)]
        opened = [open_stream(client, node.url, ["orders"]) for client in clients]
        streams = [stream for stream, _ in opened]
        try:
            for stream in streams:
                await stream.wait_for(lambda s: s.status is not None)
            await asyncio.to_thread(
                every_scrape, node.url,
                {"sse_connections": STREAMS, "sse_connections_opened_total": STREAMS,
                 'sse_connection_attempts_total{outcome="accepted"}': STREAMS,
                 "sse_hub_topics": 2},
            )  # fmt: skip
            held = {pid: open_sockets(pid) - before[pid] for pid in workers}
            assert all(count > 0 for count in held.values()), f"sockets per worker: {held}"

            with Publisher.from_url(redis_url, prefix=prefix) as pub:
                event_id = pub.publish("orders", "one")
            for stream in streams:
                await stream.wait_for(lambda s: any(e.id == event_id for e in s.events))
            # each worker received the frame once and queued it to its own streams
            await asyncio.to_thread(
                every_scrape,
                node.url,
                {"sse_live_frames_total": 2, "sse_events_delivered_total": STREAMS},
            )

            victim = workers[0]
            os.kill(victim, signal.SIGKILL)
            await asyncio.to_thread(
                wait_for,
                node.url,
                lambda s: len(_workers(node.pid)) == 2 and victim not in _workers(node.pid),
                what="the killed worker restarted",
            )
            # the supervisor restarts a second after the death: every stream of the dead
            # worker has ended by then (the kernel closed its sockets)
            lost = sum(task.done() for _, task in opened)
            assert 0 < lost < STREAMS, f"the killed worker held {lost} of {STREAMS} streams"
            # the dead worker's streams and topic left the sums; its counters did not
            await asyncio.to_thread(
                every_scrape, node.url,
                {"sse_connections": STREAMS - lost, "sse_hub_topics": 1, "sse_node_ready": 1,
                 "sse_connections_opened_total": STREAMS, "sse_live_frames_total": 2},
            )  # fmt: skip
            return victim
        finally:
            for _, task in opened:
                task.cancel()
            await asyncio.gather(*(task for _, task in opened), return_exceptions=True)
            for client in clients:
                await client.aclose()

    victim = asyncio.run(scenario())
    assert not list(directory.glob(f"gauge_live*_{victim}.db"))
    every_scrape(node.url, {"sse_connections": 0})
    node.stop()
    assert not directory.exists(), "the private metrics directory was left behind"


def test_an_operators_metrics_directory_is_emptied_at_start(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """Files of an earlier run describe processes that are gone: they are removed (a stale
    file would be summed into every scrape); other files are left alone."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    (directory / "counter_1.db").write_bytes(b"stale")
    (directory / "README").write_text("kept")
    gateway = start_node(redis_url, prefix, {"PROMETHEUS_MULTIPROC_DIR": str(directory)})
    try:
        every_scrape(gateway.url, {"sse_node_ready": 1, "sse_connections": 0})
        assert not (directory / "counter_1.db").exists()
        assert (directory / "README").read_text() == "kept"
        workers = _workers(gateway.pid)
        assert all(list(directory.glob(f"*_{pid}.db")) for pid in workers)
        response = httpx.get(gateway.url + "/metrics", timeout=5)
        assert "sse_build_info" in response.text
    finally:
        gateway.close()
    assert directory.is_dir(), "an operator's directory is theirs to remove"
