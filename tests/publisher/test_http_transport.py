"""Publisher.from_url("http://…") publishes through a gateway's POST /publish: for processes
that cannot reach Redis. Here the gateway runs the in-memory engine (no Redis at all)."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import Awaitable, Callable, Sequence

import httpx
import pytest

from gateway.client import ServerEvent
from publisher import AsyncPublisher, Message, Publisher, PublishError
from publisher._http import HttpTransport
from publisher.protocol import id_key, serialize_data
from tests.conftest import GatewayFactory
from tests.support.ports import free_port
from tests.support.sse import open_stream


async def publish_while_subscribed(
    base_url: str,
    topics: Sequence[str],
    publish: Callable[[], Awaitable[list[str]]],
    expect: int,
) -> tuple[list[str], list[ServerEvent]]:
    """Open a stream (replaying from the beginning, so no publish can slip past it), publish,
    and read until ``expect`` events arrived."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
        stream, task = open_stream(client, base_url, topics, since=0)
        try:
            await stream.until_subscribed()
            ids = await publish()
            await stream.wait_for(lambda s: len(s.events) >= expect)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert stream.status == 200
    return ids, stream.events


def test_sync_publisher_over_http_reaches_a_subscriber(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()

    async def publish() -> list[str]:
        def work() -> list[str]:
            with Publisher.from_url(gateway.url) as pub:
                first = pub.publish("jobs:7", {"progress": 50}, event="progress")
                second = pub.publish(["jobs:7", "elsewhere"], "line 1\nline 2")
                many = pub.publish_many([("jobs:7", 1), ("elsewhere", 2), ("jobs:7", [3], "n")])
            return [first, second, *many]

        return await asyncio.to_thread(work)

    ids, events = asyncio.run(publish_while_subscribed(gateway.url, ["jobs:7"], publish, 4))
    assert len(ids) == 5
    assert [id_key(i) for i in ids] == sorted({id_key(i) for i in ids}), "increasing ids"
    assert events == [
        ServerEvent("progress", '{"progress":50}', ids[0]),
        ServerEvent("message", "line 1\nline 2", ids[1]),
        ServerEvent("message", "1", ids[2]),
        ServerEvent("n", "[3]", ids[4]),
    ]


def test_async_publisher_over_http_reaches_a_subscriber(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()

    async def publish() -> list[str]:
        async with AsyncPublisher.from_url(gateway.url + "/") as pub:
            one = await pub.publish("user:alice", {"hello": "world"}, event="greet")
            many = await pub.publish_many([("user:alice", "a"), ("user:alice", None)])
        return [one, *many]

    ids, events = asyncio.run(publish_while_subscribed(gateway.url, ["user:alice"], publish, 3))
    assert [id_key(i) for i in ids] == sorted({id_key(i) for i in ids}), "increasing ids"
    assert events == [
        ServerEvent("greet", '{"hello":"world"}', ids[0]),
        ServerEvent("message", "a", ids[1]),
        ServerEvent("message", "null", ids[2]),
    ]


@pytest.mark.parametrize(
    "data",
    [b"caf\xc3\xa9 bytes", datetime.datetime(2024, 5, 6, 7, 8, 9), uuid.UUID(int=7)],
    ids=["bytes", "datetime", "uuid"],
)
def test_data_reaches_subscribers_as_the_same_text_as_over_redis(
    gateway_factory: GatewayFactory, data: object
) -> None:
    """Whatever the transport, a value is encoded once by the same rules (serialize_data):
    bytes are UTF-8 text, and values orjson renders as JSON strings keep their quotes."""
    gateway = gateway_factory()

    async def publish() -> list[str]:
        with Publisher.from_url(gateway.url) as pub:
            return [await asyncio.to_thread(pub.publish, "typed", data)]

    ids, events = asyncio.run(publish_while_subscribed(gateway.url, ["typed"], publish, 1))
    assert events == [ServerEvent("message", serialize_data(data), ids[0])]


def test_a_publish_the_gateway_refuses_raises_publish_error_with_the_status(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory("--max-publish-bytes", "200")
    with Publisher.from_url(gateway.url) as pub:
        assert pub.publish("small", "fits")
        with pytest.raises(PublishError) as info:
            pub.publish("big", "x" * 1000)
    assert info.value.status == 413
    assert "413" in str(info.value)
    assert "at most 200 bytes" in str(info.value)


def test_a_bad_request_from_the_gateway_is_a_publish_error_naming_the_problem(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory()
    # What the gateway refuses with 400 (here: a topic the local checks would have caught).
    raw = httpx.post(gateway.url + "/publish", json={"topic": "no spaces", "data": 1}, timeout=5)
    assert raw.status_code == 400
    assert "no spaces" in raw.json()["message"]
    # A transport handed such a message (e.g. from an older client) reports the 400.
    message = Message(("no spaces",), 1, None, "1", b"data: 1\n\n", "k1")
    with pytest.raises(PublishError) as info:
        HttpTransport(gateway.url).send([message])
    assert info.value.status == 400
    assert "invalid topic" in str(info.value)


def test_a_url_that_is_not_a_gateway_is_a_publish_error(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    with Publisher.from_url(gateway.url + "/not-here") as pub, pytest.raises(PublishError) as info:
        pub.publish("t", 1)
    assert info.value.status == 404


def test_invalid_input_is_refused_locally_before_any_request() -> None:
    # Nothing listens on this port: a ValueError proves no connection was attempted.
    with Publisher.from_url(f"http://127.0.0.1:{free_port()}") as pub:
        with pytest.raises(ValueError, match="invalid topic"):
            pub.publish("bad topic", 1)
        with pytest.raises(ValueError, match="event name"):
            pub.publish("t", 1, event="a\nb")
        with pytest.raises(ValueError, match="JSON"):
            pub.publish("t", {1, 2})


def test_an_unreachable_gateway_raises_a_connection_error() -> None:
    pub = Publisher.from_url(f"http://127.0.0.1:{free_port()}")
    with pub, pytest.raises(ConnectionRefusedError):
        pub.publish("t", 1)


def test_a_non_http_url_is_rejected() -> None:
    with pytest.raises(ValueError, match="not an http"):
        HttpTransport("ftp://example.com")
