"""Losing the pub/sub link loses nothing: the node reconnects, re-subscribes and backfills
every topic from its stream, so SSE clients stay connected and receive every event once, in
order. When the history itself was lost meanwhile, only the streams of the topics concerned
are ended, and their clients are told ``reset`` when they come back. A self-probe through
pub/sub finds a link that went silent without closing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
import redis

from publisher import Publisher
from tests.conftest import GatewayFactory
from tests.support.gateway import GatewayProcess
from tests.support.proxy import FreezingProxy
from tests.support.sse import SSEStream, open_stream
from tests.support.waiting import let_time_pass_async, wait_until


class Publishing:
    """A thread publishing round robin to ``a``, ``b`` and both, until stopped."""

    ROTATION = (["a"], ["b"], ["a", "b"])

    def __init__(self, redis_url: str, prefix: str, rate: float = 200) -> None:
        self.publisher = Publisher.from_url(redis_url, prefix=prefix)
        self.period = 1 / rate
        self.ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            topics = self.ROTATION[len(self.ids) % 3]
            self.ids.append(self.publisher.publish(topics, f"e{len(self.ids)}"))
            time.sleep(self.period)  # the publisher's pace

    def publish(self, topics: list[str], data: str) -> str:
        event_id = self.publisher.publish(topics, data)
        self.ids.append(event_id)
        return event_id

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()

    def close(self) -> None:
        self.stop()
        self.publisher.close()


@pytest.fixture
def publishing(redis_url: str, prefix: str) -> Iterator[Publishing]:
    scene = Publishing(redis_url, prefix)
    yield scene
    scene.close()


def subscribed(client: redis.Redis, prefix: str, topics: list[str]) -> bool:
    counts = client.pubsub_numsub(*(f"{prefix}:c:{t}" for t in topics))
    return all(count == 1 for _, count in counts)


def ids(stream: SSEStream) -> list[str]:
    return [e.id for e in stream.events]


async def stop_reading(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_clients_stay_connected_through_pubsub_kills_and_miss_nothing(
    redis_url: str,
    prefix: str,
    redis_client: redis.Redis,
    gateway_factory: GatewayFactory,
    publishing: Publishing,
) -> None:
    gateway = gateway_factory("--prefix", prefix, "--log-level", "info", redis_url=redis_url)
    start = publishing.publish(["a"], "start")

    async def scenario() -> SSEStream:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
            stream, task = open_stream(http, gateway.url, ["a", "b"], last_event_id=start)
            try:
                ready = await asyncio.to_thread(publishing.publish, ["a", "b"], "ready")
                await stream.wait_for(lambda s: ready in ids(s))
                publishing.start()
                for _ in range(3):
                    await let_time_pass_async(0.4, "events flow between two kills")
                    killed = redis_client.client_kill_filter(_type="pubsub")
                    assert killed >= 1
                    await asyncio.to_thread(
                        wait_until,
                        lambda: subscribed(redis_client, prefix, ["a", "b"]),
                        "the node subscribed again",
                    )
                await let_time_pass_async(0.4, "events flow after the last kill")
                await asyncio.to_thread(publishing.stop)
                end = await asyncio.to_thread(publishing.publish, ["a", "b"], "end")
                await stream.wait_for(lambda s: s.closed_by_server or end in ids(s))
            finally:
                await stop_reading(task)
        return stream

    stream = asyncio.run(scenario())
    assert not stream.closed_by_server, "the stream was closed: the client had to reconnect"
    expected = publishing.ids[1:]
    received = ids(stream)
    assert received == expected, (
        f"{len(received)} received of {len(expected)}, "
        f"{len(received) - len(set(received))} duplicates, "
        f"missing {sorted(set(expected) - set(received))[:5]}"
    )
    assert gateway.metric("sse_connections_opened_total") == 1
    log = gateway.output()
    assert log.count("pub/sub link lost") >= 3, log
    assert "pub/sub link restored" in log, log
    assert "Traceback" not in log


@contextlib.contextmanager
def frozen(gateway: GatewayProcess) -> Iterator[None]:
    """Stop the node's process (SIGSTOP) so that faults happen while it cannot react."""
    os.kill(gateway.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(gateway.pid, signal.SIGCONT)


def test_history_lost_during_an_outage_ends_only_the_streams_of_that_topic(
    redis_url: str, prefix: str, redis_client: redis.Redis, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory("--prefix", prefix, "--log-level", "info", redis_url=redis_url)
    pub = Publisher.from_url(redis_url, prefix=prefix)
    start = pub.publish(["a", "b"], "start")

    async def scenario() -> tuple[SSEStream, SSEStream, SSEStream]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
            on_a, task_a = open_stream(http, gateway.url, ["a"], last_event_id=start)
            on_b, task_b = open_stream(http, gateway.url, ["b"], last_event_id=start)
            try:
                before = await asyncio.to_thread(pub.publish, ["a", "b"], "before")
                for stream in (on_a, on_b):
                    await stream.wait_for(lambda s: before in ids(s))

                with frozen(gateway):
                    assert redis_client.client_kill_filter(_type="pubsub") >= 1
                    pub.publish("a", "a-lost")
                    pub.publish("a", "a-kept")
                    pub.publish("b", "b-during")
                    # Retention trims what the node never saw on topic a.
                    redis_client.xtrim(f"{prefix}:s:a", maxlen=1, approximate=False)

                await on_a.wait_for(lambda s: s.closed_by_server, timeout=10)
                await on_b.wait_for(lambda s: "b-during" in s.data())
                position = on_a.parser.last_id
                again, task_again = open_stream(http, gateway.url, ["a"], last_event_id=position)
                try:
                    await again.wait_for(lambda s: "a-kept" in s.data())
                    await asyncio.to_thread(pub.publish, ["a", "b"], "after")
                    await again.wait_for(lambda s: "after" in s.data())
                    await on_b.wait_for(lambda s: "after" in s.data())
                finally:
                    await stop_reading(task_again)
            finally:
                await stop_reading(task_a)
                await stop_reading(task_b)
        return on_a, on_b, again

    try:
        on_a, on_b, again = asyncio.run(scenario())
    finally:
        pub.close()
    assert on_a.data() == ["before"]
    assert [(e.event, e.data) for e in again.events][:1] == [
        ("reset", orjson.dumps({"reason": "trimmed", "topics": ["a"]}).decode())
    ]
    assert again.data()[1:] == ["a-kept", "after"]
    assert not on_b.closed_by_server
    assert on_b.data() == ["before", "b-during", "after"]
    log = gateway.output()
    assert "pub/sub link restored" in log, log
    assert "lost history" in log, log


def test_each_running_node_listens_on_a_probe_channel_of_its_own(
    redis_url: str, prefix: str, redis_client: redis.Redis, gateway_factory: GatewayFactory
) -> None:
    nodes = [
        gateway_factory("--prefix", prefix, "--probe-interval", "1", redis_url=redis_url)
        for _ in range(2)
    ]

    def probe_channels() -> list[bytes]:
        return sorted(
            c.encode() if isinstance(c, str) else c
            for c in redis_client.pubsub_channels(f"{prefix}:probe:*")
        )

    wait_until(lambda: len(probe_channels()) == 2, "both nodes listen on a probe channel")
    channels = probe_channels()
    assert all(count == 1 for _, count in redis_client.pubsub_numsub(*channels))

    # The probes are sent: each channel carries a message about every second.
    listener = redis_client.pubsub()
    listener.psubscribe(f"{prefix}:probe:*")
    heard: dict[bytes, int] = {}
    deadline = time.monotonic() + 5
    while len(heard) < 2 or min(heard.values()) < 2:
        assert time.monotonic() < deadline, f"probes heard: {heard}"
        message = listener.get_message(timeout=0.5)
        if message and message["type"] == "pmessage":
            heard[message["channel"]] = heard.get(message["channel"], 0) + 1
    listener.close()
    assert sorted(heard) == channels

    nodes[0].stop()
    wait_until(lambda: len(probe_channels()) == 1, "the stopped node left its probe channel")


@pytest.fixture
def proxy(redis_url: str) -> Iterator[FreezingProxy]:
    upstream = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    if upstream.get("host") not in ("127.0.0.1", "localhost"):
        pytest.skip("the freezing proxy needs a loopback Redis")
    scene = FreezingProxy(int(upstream["port"]), "backfill-freezing-proxy")
    yield scene
    scene.close()


def test_the_self_probe_replaces_a_silent_link_and_backfills_what_it_missed(
    redis_url: str,
    prefix: str,
    redis_client: redis.Redis,
    gateway_factory: GatewayFactory,
    publishing: Publishing,
    proxy: FreezingProxy,
) -> None:
    gateway = gateway_factory(
        "--prefix", prefix, "--probe-interval", "1", "--log-level", "info", redis_url=proxy.url
    )
    start = publishing.publish(["a"], "start")

    def pubsub_ports() -> set[int]:
        return {
            int(client["addr"].rsplit(":", 1)[1])
            for client in redis_client.client_list(_type="pubsub")
        }

    async def scenario() -> SSEStream:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
            stream, task = open_stream(http, gateway.url, ["a", "b"], last_event_id=start)
            try:
                ready = await asyncio.to_thread(publishing.publish, ["a", "b"], "ready")
                await stream.wait_for(lambda s: ready in ids(s))
                (link,) = pubsub_ports() & set(proxy.upstream_ports)
                publishing.start()
                await let_time_pass_async(0.3, "events flow before the link goes silent")
                proxy.freeze(link)
                await asyncio.to_thread(
                    wait_until,
                    lambda: bool(pubsub_ports() & set(proxy.upstream_ports) - {link}),
                    "the node opened a new pub/sub link",
                    8,
                )
                await let_time_pass_async(0.5, "events flow on the new link")
                await asyncio.to_thread(publishing.stop)
                end = await asyncio.to_thread(publishing.publish, ["a", "b"], "end")
                await stream.wait_for(lambda s: s.closed_by_server or end in ids(s))
            finally:
                await stop_reading(task)
        return stream

    stream = asyncio.run(scenario())
    assert not stream.closed_by_server
    expected = publishing.ids[1:]
    received = ids(stream)
    assert received == expected, (
        f"{len(received)} received of {len(expected)}, "
        f"{len(received) - len(set(received))} duplicates, "
        f"missing {sorted(set(expected) - set(received))[:5]}"
    )
    log = gateway.output()
    assert "pub/sub link is silent" in log, log
    assert "pub/sub link restored" in log, log
