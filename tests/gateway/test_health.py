"""Liveness, readiness and metrics (the README's API), and what clients see while Redis is away.

``/healthz`` says the process is alive and stays 200 whatever Redis does; ``/readyz`` says the
node can serve (engine reachable, not draining) so a load balancer stops sending clients to a
node that cannot serve them, and takes it back once Redis returns.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from publisher import Publisher
from tests.conftest import GatewayFactory, Node
from tests.support import redis_server
from tests.support.gateway import GatewayProcess
from tests.support.redis_server import RedisServer
from tests.support.sse import SSEStream, first_event, open_stream
from tests.support.waiting import elapsed_until, let_time_pass_async, wait_until_async

TOPIC = "jobs:1"


def test_healthz_is_200(node: Node) -> None:
    response = httpx.get(node.url + "/healthz", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_is_200_and_names_the_engine(node: Node) -> None:
    response = httpx.get(node.url + "/readyz", timeout=5)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    assert body["engine"] == node.engine


def test_metrics_is_prometheus_text_that_counts_open_streams(node: Node) -> None:
    response = httpx.get(node.url + "/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert "# TYPE sse_connections gauge" in response.text
    assert node.gateway.metric("sse_connections ") == 0

    async def scenario() -> tuple[float, float]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
            streams = [open_stream(client, node.url, [TOPIC]) for _ in range(2)]
            for stream, _ in streams:
                await stream.until_subscribed()
            while_open = await asyncio.to_thread(node.gateway.metric, "sse_connections ")
            for _, task in streams:
                task.cancel()
            await asyncio.gather(*(t for _, t in streams), return_exceptions=True)

        async def no_streams() -> bool:
            return await asyncio.to_thread(node.gateway.metric, "sse_connections ") == 0

        await wait_until_async(no_streams, "sse_connections back to 0", 5)
        after = await asyncio.to_thread(node.gateway.metric, "sse_connections ")
        return while_open, after

    while_open, after = asyncio.run(scenario())
    assert while_open == 2
    assert after == 0
    assert node.gateway.metric("sse_connections_opened_total") == 2


# -- Redis goes away and comes back --------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may stop and restart on its port."""
    with redis_server.own_redis() as server:
        yield server


@pytest.fixture
def outage_gateway(
    gateway_factory: GatewayFactory, own_redis: RedisServer, prefix: str
) -> GatewayProcess:
    return gateway_factory(
        "--prefix", prefix, "--linger", "60", "--heartbeat", "60", "--subscribe-timeout", "2",
        redis_url=own_redis.url,
    )  # fmt: skip


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=3).status_code
    except httpx.TransportError:
        return None


async def _subscribed_stream(
    client: httpx.AsyncClient, url: str, redis_url: str, prefix: str
) -> tuple[SSEStream, asyncio.Task[None]]:
    """Open a stream on TOPIC and return once it is live: subscribed and past its replay, with
    an event published to Redis received."""
    stream, task = open_stream(client, url, [TOPIC])
    with Publisher.from_url(redis_url, prefix=prefix) as pub:
        await first_event(stream, lambda: pub.publish(TOPIC, "probe", "probe"))
    return stream, task


async def _stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def test_readiness_follows_redis_and_streams_work_again_after_it_returns(
    outage_gateway: GatewayProcess, own_redis: RedisServer, prefix: str
) -> None:
    gateway = outage_gateway
    ready, healthy = gateway.url + "/readyz", gateway.url + "/healthz"
    assert _status(ready) == 200

    async def scenario() -> list[str]:
        client = httpx.AsyncClient(timeout=httpx.Timeout(10, read=None))
        # A browser is connected to the topic when Redis goes away.
        _, task = await _subscribed_stream(client, gateway.url, own_redis.url, prefix)
        try:
            await asyncio.to_thread(own_redis.stop)
            took = await asyncio.to_thread(
                elapsed_until, lambda: _status(ready) == 503, "/readyz to turn 503", 5
            )
            assert took < 5
            assert await asyncio.to_thread(_status, healthy) == 200
            # Still not ready a little later, and still alive.
            await let_time_pass_async(0.5, "Redis stays away a while")
            assert await asyncio.to_thread(_status, ready) == 503
            assert await asyncio.to_thread(_status, healthy) == 200

            await asyncio.to_thread(own_redis.start)
            await asyncio.to_thread(
                elapsed_until, lambda: _status(ready) == 200, "/readyz to return to 200", 15
            )
            assert await asyncio.to_thread(_status, healthy) == 200

            # A browser (re)connecting to the same topic gets events end to end again.
            fresh, fresh_task = open_stream(client, gateway.url, [TOPIC])
            try:
                await fresh.until_subscribed()
                with Publisher.from_url(own_redis.url, prefix=prefix) as pub:
                    ids = [await asyncio.to_thread(pub.publish, TOPIC, "after")]
                    await fresh.wait_for(
                        lambda s: s.closed_by_server or any(e.data == "after" for e in s.events)
                    )
                    assert not fresh.closed_by_server, "the new stream was ended"
                assert fresh.events[0].id in ids
                return fresh.data()
            finally:
                await _stop(fresh_task)
        finally:
            await _stop(task)
            await client.aclose()

    received = asyncio.run(scenario())
    assert set(received) == {"after"}


def test_a_stream_open_when_redis_goes_away_is_not_left_silently_dead(
    outage_gateway: GatewayProcess, own_redis: RedisServer, prefix: str
) -> None:
    """Either the gateway ends the stream (the browser reconnects with its Last-Event-ID and
    replays), or it keeps it and delivers what is published once Redis is back. A stream that
    stays open and never delivers again is the failure."""
    gateway = outage_gateway

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
            stream, task = await _subscribed_stream(client, gateway.url, own_redis.url, prefix)
            try:
                await asyncio.to_thread(own_redis.stop)
                try:
                    await stream.wait_for(lambda s: s.closed_by_server, timeout=5)
                    return  # closed: the browser reconnects
                except TimeoutError:
                    pass
                await asyncio.to_thread(own_redis.start)
                with Publisher.from_url(own_redis.url, prefix=prefix) as pub:
                    # No signal says when the node has subscribed again: publish until an
                    # event arrives (or the stream is ended).
                    async def delivered_again() -> bool:
                        if stream.closed_by_server or any(e.data == "back" for e in stream.events):
                            return True
                        await asyncio.to_thread(pub.publish, TOPIC, "back")
                        return False

                    try:
                        await wait_until_async(delivered_again, "an event after Redis returned", 15)
                    except AssertionError:
                        pytest.fail(
                            "the stream stayed open after Redis went away and never "
                            "delivered an event again"
                        )
            finally:
                await _stop(task)

    asyncio.run(scenario())


def test_a_stream_requested_while_redis_is_down_ends_promptly(
    outage_gateway: GatewayProcess, own_redis: RedisServer
) -> None:
    """The gateway cannot serve it: the response ends (the browser retries after ``retry``)
    instead of hanging as a stream that will never deliver anything."""
    gateway = outage_gateway
    own_redis.stop()
    elapsed_until(lambda: _status(gateway.url + "/readyz") == 503, "/readyz to turn 503", 5)

    async def scenario() -> SSEStream:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
            stream, task = open_stream(client, gateway.url, ["never:seen"])
            try:
                await stream.wait_for(lambda s: s.closed_by_server, timeout=8)
            finally:
                await _stop(task)
            return stream

    stream = asyncio.run(scenario())
    assert stream.closed_by_server
    assert [e.event for e in stream.events] == ["refused"]  # a refusal without an id
    assert stream.parser.last_id == ""
    assert _status(gateway.url + "/healthz") == 200
