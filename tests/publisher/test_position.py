"""``position()``: a snapshot and a stream without a race (issue 11, acceptance 3).

An app reads the position, then its state, then opens the page's stream with
``lastEventId`` set to the position. Every event published between the read and the stream's
open arrives first, exactly once, on both engines and through both publisher transports (Redis
directly, and a gateway's ``GET /position``). Over HTTP, ``GET /position`` takes the same
access rules as ``GET /events``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import httpx
import pytest

from publisher import AsyncPublisher, Publisher
from publisher.protocol import BEGINNING, id_key
from tests.conftest import GatewayFactory, Node
from tests.support.sse import open_stream
from tests.support.tokens import SECRET, hs256


@pytest.fixture(params=["redis", "http"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def publisher(node: Node, transport: str) -> Iterator[Publisher]:
    if transport == "redis" and node.engine != "redis":
        pytest.skip("a Redis publisher reaches only the Redis engine")
    pub = node.new_publisher() if transport == "redis" else Publisher.from_url(node.url)
    yield pub
    pub.close()


async def stream_from(
    url: str, topic: str, position: str, publish_after: Publisher, expect_before: int
) -> list[tuple[str, str]]:
    """Open the stream after ``position``; once ``expect_before`` events came, publish three
    more and an ``end``, and return every (id, data) the stream got up to ``end``."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
        stream, task = open_stream(client, url, [topic], last_event_id=position)
        try:
            await stream.wait_for(lambda s: len(s.events) >= expect_before)
            for n in range(3):
                await asyncio.to_thread(publish_after.publish, topic, f"after-{n}")
            await asyncio.to_thread(publish_after.publish, topic, "end")
            await stream.wait_for(lambda s: any(e.data == "end" for e in s.events))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert stream.status == 200
    return [(e.id, e.data) for e in stream.events]


def test_events_between_position_and_stream_arrive_first_exactly_once(
    node: Node, publisher: Publisher
) -> None:
    """Issue 11 acceptance 3: position(), then publishes (one at a time and as a batch, and
    on another topic), then a stream from the position: it gets exactly those events, first
    and once each, then the live ones."""
    topic = f"snap:{uuid.uuid4().hex[:8]}"
    publisher.publish(topic, "before-0")
    publisher.publish(topic, "before-1")
    position = publisher.position(topic)
    between = [publisher.publish(topic, f"between-{n}") for n in range(4)]
    publisher.publish(f"other:{uuid.uuid4().hex[:8]}", "not this topic")
    between += publisher.publish_many([(topic, "between-4"), (topic, "between-5", "named")])
    assert all(id_key(event_id) > id_key(position) for event_id in between)

    got = asyncio.run(stream_from(node.url, topic, position, publisher, len(between)))

    data = [d for _, d in got]
    expected = [f"between-{n}" for n in range(6)] + [f"after-{n}" for n in range(3)] + ["end"]
    assert data == expected, data
    assert [i for i, _ in got][:6] == between
    keys = [id_key(i) for i, _ in got]
    assert keys == sorted(set(keys))


def test_position_before_anything_is_published_is_the_beginning(
    node: Node, publisher: Publisher
) -> None:
    """Issue 11 acceptance 3: on an empty store the position is ``0-0``, and a stream from it
    gets everything published since."""
    assert publisher.position() == BEGINNING
    topic = "fresh"
    first = publisher.publish(topic, "between-0")
    assert publisher.position() == first
    got = asyncio.run(stream_from(node.url, topic, BEGINNING, publisher, 1))
    assert [d for _, d in got] == ["between-0", "after-0", "after-1", "after-2", "end"]


def test_async_position_matches_the_last_publish(node: Node, transport: str) -> None:
    """Issue 11: ``AsyncPublisher.position()`` reads the same clock, on both transports."""
    if transport == "redis" and node.engine != "redis":
        pytest.skip("a Redis publisher reaches only the Redis engine")
    url = node.extra["redis_url"] if transport == "redis" else node.url

    async def run() -> tuple[str, str]:
        async with AsyncPublisher.from_url(url, prefix=node.prefix) as pub:
            event_id = await pub.publish("a", "x")
            return event_id, await pub.position(["a"])

    event_id, position = asyncio.run(run())
    assert position == event_id


# -- GET /position: the same access as reading ---------------------------------------------------


def test_position_on_an_anonymous_node_is_open(gateway_factory: GatewayFactory) -> None:
    """Issue 11: an anonymous node answers anyone, with or without topics; bad topics are a
    400 naming the problem."""
    gateway = gateway_factory()
    with httpx.Client(base_url=gateway.url, timeout=5) as client:
        answer = client.get("/position")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"id": BEGINNING}
        assert answer.headers["cache-control"] == "no-store"
        event_id = Publisher.from_url(gateway.url).publish("t", "x")
        assert client.get("/position", params={"topic": "t"}).json() == {"id": event_id}
        bad = client.get("/position", params={"topic": "no spaces"})
        assert bad.status_code == 400
        assert bad.json()["error"] == "invalid_topic"
        assert client.post("/position").status_code == 405


def test_position_in_token_mode_needs_a_token_that_may_read(
    gateway_factory: GatewayFactory,
) -> None:
    """Issue 11: in token mode ``GET /position`` is refused as ``GET /events`` would be: no
    topic is a 400, no token a 401, a token without the topic a 403; a granting token (as a
    header, a query parameter or through the publisher) and a public topic are answered."""
    gateway = gateway_factory("--jwt-secret", SECRET, "--public-topics", "news:*")
    token = hs256(subscribe=["user:alice"], publish=["user:alice"])
    with httpx.Client(base_url=gateway.url, timeout=5) as client:
        auth = {"authorization": f"Bearer {token}"}
        missing = client.get("/position", headers=auth)
        assert missing.status_code == 400
        assert missing.json()["error"] == "missing_topic"
        anonymous = client.get("/position", params={"topic": "user:alice"})
        assert anonymous.status_code == 401
        assert anonymous.json()["error"] == "token_required"
        other = client.get("/position", params={"topic": "user:bob"}, headers=auth)
        assert other.status_code == 403
        assert other.json()["error"] == "forbidden_topic"
        invalid = client.get("/position", params={"topic": "user:alice", "token": "x.y.z"})
        assert invalid.status_code == 401
        public = client.get("/position", params={"topic": "news:today"})
        assert public.status_code == 200, public.text

        with Publisher.from_url(gateway.url, token=token) as pub:
            event_id = pub.publish("user:alice", "hello")
            assert pub.position("user:alice") == event_id
        assert client.get("/position", params={"topic": "user:alice"}, headers=auth).json() == {
            "id": event_id
        }
        by_query = client.get("/position", params={"topic": "user:alice", "token": token})
        assert by_query.json() == {"id": event_id}
