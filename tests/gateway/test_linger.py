"""Subscriptions follow the clients (docs/architecture.md §6, the hub), seen from Redis itself.

One node holds one pub/sub subscription per topic, whatever the number of local clients; it
subscribes when the first client arrives and unsubscribes once the last one has been gone for
``--linger`` seconds. A client that arrives within the linger reuses the subscription. Idle
clients that disconnect must release it: nothing is left subscribed forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis

from publisher import Publisher
from tests.conftest import GatewayFactory
from tests.support.gateway import GatewayProcess
from tests.support.sse import SSEStream, open_stream
from tests.support.waiting import let_time_pass, let_time_pass_async, wait_until, wait_until_async

TOPIC = "room:1"


class Scene:
    """A Redis-engine gateway, a publisher on the same prefix, and a view of PUBSUB NUMSUB."""

    def __init__(self, gateway: GatewayProcess, client: redis.Redis, prefix: str, url: str):
        self.gateway = gateway
        self.client = client
        self.channel = f"{prefix}:c:{TOPIC}"
        self.publisher = Publisher.from_url(url, prefix=prefix)

    def numsub(self) -> int:
        ((_, count),) = self.client.pubsub_numsub(self.channel)
        return int(count)

    def wait_numsub(self, expected: int, timeout: float = 5.0) -> float:
        """Wait until NUMSUB is ``expected``; return when it got there (monotonic)."""
        wait_until(lambda: self.numsub() == expected, f"NUMSUB {expected}", timeout, step=0.02)
        return time.monotonic()


@pytest.fixture
def scene_factory(
    gateway_factory: GatewayFactory, redis_url: str, redis_client: redis.Redis, prefix: str
) -> Iterator[Callable[[float], Scene]]:
    scenes: list[Scene] = []

    def make(linger: float) -> Scene:
        gateway = gateway_factory(
            "--prefix", prefix, "--linger", str(linger), "--heartbeat", "60", redis_url=redis_url
        )
        scene = Scene(gateway, redis_client, prefix, redis_url)
        scenes.append(scene)
        return scene

    yield make
    for scene in scenes:
        scene.publisher.close()


async def _connected(
    client: httpx.AsyncClient, scene: Scene
) -> tuple[SSEStream, asyncio.Task[None]]:
    """Open a stream and return once its preamble arrived: it is subscribed."""
    stream, task = open_stream(client, scene.gateway.url, [TOPIC])
    await stream.until_subscribed()
    assert stream.status == 200
    return stream, task


async def _close(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def _poll(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    await wait_until_async(lambda: asyncio.to_thread(condition), what, timeout, step=0.02)


def _client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=httpx.Timeout(10, read=None))


def test_idle_client_that_disconnects_releases_the_subscription_after_the_linger(
    scene_factory: Callable[[float], Scene],
) -> None:
    linger = 1.5
    scene = scene_factory(linger)
    assert scene.numsub() == 0

    async def scenario() -> float:
        async with _client() as client:
            _, task = await _connected(client, scene)
            await _poll(lambda: scene.numsub() == 1, "the first client did not subscribe")
            await let_time_pass_async(0.3, "an idle client: its subscription stays")
            assert await asyncio.to_thread(scene.numsub) == 1
            await _close(task)
        return time.monotonic()

    left = asyncio.run(scenario())
    # Within the linger the subscription is kept for a client that may come back...
    let_time_pass(0.3, "a part of the linger")
    assert scene.numsub() == 1, "the subscription was dropped without any linger"
    # ...and after it, released.
    released = scene.wait_numsub(0, timeout=linger + 5)
    assert released - left >= linger * 0.8, "released before the linger elapsed"


def test_short_linger_releases_within_a_few_seconds(
    scene_factory: Callable[[float], Scene],
) -> None:
    scene = scene_factory(0.5)

    async def scenario() -> None:
        async with _client() as client:
            _, task = await _connected(client, scene)
            await _poll(lambda: scene.numsub() == 1, "the client did not subscribe")
            await _close(task)

    asyncio.run(scenario())
    scene.wait_numsub(0, timeout=3)
    assert scene.gateway.metric("sse_hub_topics") == 0
    assert scene.gateway.metric("sse_connections ") == 0


def test_client_arriving_within_the_linger_reuses_the_subscription(
    scene_factory: Callable[[float], Scene],
) -> None:
    linger = 1.0
    scene = scene_factory(linger)
    counts: list[int] = []

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():
            counts.append(await asyncio.to_thread(scene.numsub))
            await let_time_pass_async(0.01, "NUMSUB sampled every 10 ms")

    async def scenario() -> list[str]:
        async with _client() as client:
            _, first = await _connected(client, scene)
            await _poll(lambda: scene.numsub() == 1, "the first client did not subscribe")
            stop = asyncio.Event()
            watcher = asyncio.create_task(watch(stop))
            await _close(first)
            await let_time_pass_async(linger / 4, "the second client comes within the linger")
            second, task = await _connected(client, scene)
            # Past the first client's linger: the subscription must still be live.
            await let_time_pass_async(linger * 2, "past the first client's linger")
            stop.set()
            await watcher
            ids = [
                await asyncio.to_thread(scene.publisher.publish, TOPIC, f"after-{i}")
                for i in range(3)
            ]
            await second.wait_for(lambda s: len(s.events) >= 3, timeout=5)
            assert [e.id for e in second.events] == ids
            await _close(task)
            return second.data()

    assert asyncio.run(scenario()) == ["after-0", "after-1", "after-2"]
    assert counts, "NUMSUB was never sampled"
    assert set(counts) == {1}, f"the subscription was not kept across the handover: {counts}"
    scene.wait_numsub(0, timeout=linger + 5)


def test_clients_of_one_topic_share_one_subscription(
    scene_factory: Callable[[float], Scene],
) -> None:
    scene = scene_factory(0.5)

    async def scenario() -> None:
        async with _client() as client:
            opened = [await _connected(client, scene) for _ in range(3)]
            await _poll(lambda: scene.numsub() >= 1, "no subscription")
            await let_time_pass_async(0.3, "three held clients: no second subscription appears")
            assert await asyncio.to_thread(scene.numsub) == 1
            event_id = await asyncio.to_thread(scene.publisher.publish, TOPIC, "to all")
            for stream, _ in opened:
                await stream.wait_for(lambda s: len(s.events) >= 1, timeout=5)
                assert [(e.id, e.data) for e in stream.events] == [(event_id, "to all")]
            # One leaves: the others still hold the subscription, well past the linger.
            await _close(opened[0][1])
            await let_time_pass_async(1.2, "well past the linger")
            assert await asyncio.to_thread(scene.numsub) == 1
            for _, task in opened[1:]:
                await _close(task)

    asyncio.run(scenario())
    scene.wait_numsub(0, timeout=5)


def test_connect_disconnect_cycles_leave_nothing_subscribed(
    scene_factory: Callable[[float], Scene],
) -> None:
    scene = scene_factory(0.5)

    async def scenario() -> None:
        async with _client() as client:
            for cycle in range(6):
                streams = [await _connected(client, scene) for _ in range(1 + cycle % 3)]
                await _poll(lambda: scene.numsub() == 1, f"cycle {cycle}: not subscribed")
                for _, task in streams:
                    await _close(task)
                # Alternate between coming back within the linger and after it.
                await let_time_pass_async(
                    0.1 if cycle % 2 == 0 else 0.8, "back within the linger, or after it"
                )

    asyncio.run(scenario())
    scene.wait_numsub(0, timeout=5)
    wait_until(lambda: scene.gateway.metric("sse_connections ") == 0, "connections released", 5)
    assert scene.gateway.metric("sse_hub_topics") == 0
