"""Publishing is safe to retry: an idempotency key names each publish, so sending it again
returns the first id and stores nothing twice; transient Redis errors are retried for
``retry_for`` seconds, other errors at once; Sentinel URLs name their sentinels and service."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.exceptions

from publisher import AsyncPublisher, Publisher
from publisher.protocol import Keys, idempotency_digest
from publisher.redis_transport import sentinel_target
from tests.conftest import Node
from tests.support import redis_server
from tests.support.redis_server import RedisServer, stream_entries
from tests.support.sse import collect, open_stream
from tests.support.tokens import assert_error
from tests.support.waiting import let_time_pass, wait_until

BAD_KEYS = ["has space", "line\r\nbreak", "new\nline", "k" * 200, ""]


def stream_key(prefix: str, topic: str) -> str:
    return f"{prefix}:s:{topic}"


@pytest.fixture
def publisher(redis_url: str, prefix: str) -> Iterator[Publisher]:
    with Publisher.from_url(redis_url, prefix=prefix) as pub:
        yield pub


# -- explicit keys against Redis ---------------------------------------------------------------


def test_the_same_key_twice_returns_the_first_id_and_stores_one_entry(
    publisher: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    first = publisher.publish("orders", {"n": 1}, idempotency_key="order-17-shipped")
    again = publisher.publish("orders", {"n": 1}, idempotency_key="order-17-shipped")

    assert again == first
    entries = stream_entries(redis_client, stream_key(prefix, "orders"))
    assert [entry_id for entry_id, _ in entries] == [first]


def test_a_retry_is_recognised_by_its_key_alone(
    publisher: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    """What a retry carries besides its key and topics does not matter: the key names the
    publish (among this publisher's publishes to these topics)."""
    first = publisher.publish("orders", "shipped", idempotency_key="k-17")
    again = publisher.publish("orders", "something else", "other", idempotency_key="k-17")

    assert again == first
    assert redis_client.xlen(stream_key(prefix, "orders")) == 1


def test_different_keys_are_different_publishes(
    publisher: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    one = publisher.publish("orders", "same data", idempotency_key="k-1")
    two = publisher.publish("orders", "same data", idempotency_key="k-2")

    assert one != two
    assert redis_client.xlen(stream_key(prefix, "orders")) == 2


def test_without_a_key_every_publish_is_a_new_event(
    publisher: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    ids = {publisher.publish("orders", "same data") for _ in range(3)}

    assert len(ids) == 3
    assert redis_client.xlen(stream_key(prefix, "orders")) == 3


def test_a_multi_topic_publish_is_deduplicated_on_every_topic(
    publisher: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    first = publisher.publish(["a", "b"], "both", idempotency_key="both-1")
    again = publisher.publish(["a", "b"], "both", idempotency_key="both-1")

    assert again == first
    assert redis_client.xlen(stream_key(prefix, "a")) == 1
    assert redis_client.xlen(stream_key(prefix, "b")) == 1


def test_a_key_is_forgotten_after_the_idempotency_ttl(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    with Publisher.from_url(redis_url, prefix=prefix, idempotency_ttl=0.5) as pub:
        first = pub.publish("orders", "once", idempotency_key="short-lived")
        name = Keys(prefix).idempotency(idempotency_digest("", ["orders"], "short-lived"))
        remembered = redis_client.pttl(name)
        assert 0 < remembered <= 500

        wait_until(lambda: not redis_client.exists(name), "the idempotency key to expire", 5)
        later = pub.publish("orders", "once", idempotency_key="short-lived")

    assert later != first
    assert redis_client.xlen(stream_key(prefix, "orders")) == 2


def test_the_async_publisher_deduplicates_the_same_way(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    async def scenario() -> list[str]:
        async with AsyncPublisher.from_url(redis_url, prefix=prefix) as pub:
            return [
                await pub.publish("orders", "x", idempotency_key="async-1"),
                await pub.publish("orders", "x", idempotency_key="async-1"),
                await pub.publish("orders", "x", idempotency_key="async-2"),
            ]

    one, again, other = asyncio.run(scenario())
    assert again == one
    assert other != one
    assert redis_client.xlen(stream_key(prefix, "orders")) == 2


def test_sync_and_async_publishers_share_the_keys(
    redis_url: str, redis_client: redis.Redis, prefix: str, publisher: Publisher
) -> None:
    first = publisher.publish("orders", "x", idempotency_key="shared-1")

    async def retry_elsewhere() -> str:
        async with AsyncPublisher.from_url(redis_url, prefix=prefix) as pub:
            return await pub.publish("orders", "x", idempotency_key="shared-1")

    assert asyncio.run(retry_elsewhere()) == first
    assert redis_client.xlen(stream_key(prefix, "orders")) == 1


@pytest.mark.parametrize("key", BAD_KEYS, ids=["space", "crlf", "lf", "200-chars", "empty"])
def test_an_invalid_key_is_refused_before_anything_is_sent(
    publisher: Publisher, redis_client: redis.Redis, prefix: str, key: str
) -> None:
    with pytest.raises(ValueError, match="idempotency key"):
        publisher.publish("orders", "x", idempotency_key=key)

    async def publish_async() -> None:
        async with AsyncPublisher.from_url("redis://127.0.0.1:1/0", prefix=prefix) as pub:
            await pub.publish("orders", "x", idempotency_key=key)

    with pytest.raises(ValueError, match="idempotency key"):
        asyncio.run(publish_async())
    assert redis_client.exists(stream_key(prefix, "orders")) == 0


def test_the_longest_key_and_every_allowed_character_are_accepted(
    publisher: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    longest = "k" * 128
    allowed = "AZaz09_.:/@+=-"
    assert publisher.publish("orders", 1, idempotency_key=longest)
    assert publisher.publish("orders", 2, idempotency_key=allowed)
    assert redis_client.xlen(stream_key(prefix, "orders")) == 2


def test_a_failed_publish_does_not_use_up_its_key(
    publisher: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    """A publish that raised stored nothing, so the same key must publish for real later:
    the id a retry returns must name an event that exists."""
    publisher.publish("elsewhere", "the clock is running")
    redis_client.set(stream_key(prefix, "orders"), "not a stream")
    with pytest.raises(redis.exceptions.ResponseError):
        publisher.publish("orders", "x", idempotency_key="after-failure")
    redis_client.delete(stream_key(prefix, "orders"))

    event_id = publisher.publish("orders", "x", idempotency_key="after-failure")

    stored = [
        entry_id for entry_id, _ in stream_entries(redis_client, stream_key(prefix, "orders"))
    ]
    assert stored == [event_id], "the retry returned an id that was never stored"


# -- POST /publish, on both engines ------------------------------------------------------------


def post(node: Node, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(node.url + "/publish", json=body, timeout=10)


def test_post_publish_with_the_same_key_twice_delivers_the_event_once(node: Node) -> None:
    before = node.publish("t", "before")
    body = {"topic": "t", "data": "once", "idempotency_key": "k1"}

    async def scenario() -> tuple[list[str], list[str]]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
            live, task = open_stream(http, node.url, ["t"], last_event_id=before)
            try:
                await live.wait_for(lambda s: s.status == 200)
                first = await asyncio.to_thread(post, node, body)
                again = await asyncio.to_thread(post, node, body)
                assert first.status_code == again.status_code == 200, first.text
                assert first.json()["id"] == again.json()["id"]
                await asyncio.to_thread(node.publish, "t", "after")
                await live.wait_for(lambda s: "after" in s.data())
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        replay = await collect(node.url, ["t"], lambda s: "after" in s.data(), last_event_id=before)
        return live.data(), replay.data()

    live, replay = asyncio.run(scenario())
    assert live == ["once", "after"]
    assert replay == ["once", "after"]


def test_post_publish_without_a_key_publishes_each_time(node: Node) -> None:
    ids = {post(node, {"topic": "t", "data": "same"}).json()["id"] for _ in range(2)}
    assert len(ids) == 2


def test_the_http_publisher_passes_its_key_on(node: Node) -> None:
    with Publisher.from_url(node.url) as pub:
        first = pub.publish("t", "x", idempotency_key="via-http")
        again = pub.publish("t", "x", idempotency_key="via-http")
    assert again == first


@pytest.mark.parametrize(
    "key", [*BAD_KEYS, 17, ["k"], None], ids=["space", "crlf", "lf", "200", "empty", "int", "list",
                                                "null"]
)  # fmt: skip
def test_post_publish_refuses_a_bad_key(node: Node, key: object) -> None:
    response = post(node, {"topic": "t", "data": "x", "idempotency_key": key})
    if key is None:
        # JSON null is the same as no key at all.
        assert response.status_code == 200, response.text
        return
    body = assert_error(response, 400, "invalid_idempotency_key")
    assert body.get("field") == "idempotency_key"


# -- retries -------------------------------------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop and start again on the same port."""
    with redis_server.own_redis() as server:
        yield server


def test_a_publish_during_a_short_outage_is_retried_until_it_succeeds(
    own_redis: RedisServer, prefix: str
) -> None:
    with Publisher.from_url(own_redis.url, prefix=prefix, retry_for=10) as pub:
        pub.publish("t", "before the outage")
        own_redis.stop()
        result: dict[str, Any] = {}

        def publish() -> None:
            started = time.monotonic()
            try:
                result["id"] = pub.publish("t", "during the outage")
            except Exception as exc:  # reported below
                result["error"] = exc
            result["took"] = time.monotonic() - started

        thread = threading.Thread(target=publish)
        thread.start()
        let_time_pass(1.0, "Redis stays down while the publish retries")
        assert thread.is_alive(), f"the publish gave up while Redis was down: {result}"
        own_redis.start()
        thread.join(15)

    assert "error" not in result, result
    assert 0.9 <= result["took"] < 10
    with redis.Redis.from_url(own_redis.url) as client:
        entries = client.xrange(stream_key(prefix, "t"))
    # The restarted server has no persistence: only the retried publish is there, once.
    assert [(entry_id.decode(), fields[b"f"]) for entry_id, fields in entries] == [
        (result["id"], b"data: during the outage\n\n")
    ]


def test_with_retry_for_zero_an_outage_raises_at_once(own_redis: RedisServer, prefix: str) -> None:
    with Publisher.from_url(own_redis.url, prefix=prefix, retry_for=0) as pub:
        pub.publish("t", "before the outage")
        own_redis.stop()
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ConnectionError):
            pub.publish("t", "during the outage")
        assert time.monotonic() - started < 1.0


def test_an_outage_longer_than_retry_for_raises_after_retry_for(
    own_redis: RedisServer, prefix: str
) -> None:
    with Publisher.from_url(own_redis.url, prefix=prefix, retry_for=1.0) as pub:
        own_redis.stop()
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ConnectionError):
            pub.publish("t", "during the outage")
        assert 0.9 <= time.monotonic() - started < 3.0


def test_a_non_transient_error_is_not_retried(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    redis_client.set(stream_key(prefix, "t"), "a string, not a stream")
    with Publisher.from_url(redis_url, prefix=prefix, retry_for=10) as pub:
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            pub.publish("t", "x")
        assert time.monotonic() - started < 1.0
        # Also once the clock exists (the script then fails at a later step).
        pub.publish("elsewhere", "x")
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
            pub.publish("t", "x")
        assert time.monotonic() - started < 1.0


# -- Sentinel URLs -------------------------------------------------------------------------------


def test_a_sentinel_url_names_its_sentinels_service_database_and_password() -> None:
    target = sentinel_target("redis+sentinel://:pw@h1:26379,h2:26380/mymaster/2")

    assert target is not None
    assert target.sentinels == [("h1", 26379), ("h2", 26380)]
    assert target.service == "mymaster"
    assert target.db == 2
    assert target.password == "pw"
    assert target.username is None


def test_a_sentinel_url_defaults_to_database_zero_and_no_credentials() -> None:
    target = sentinel_target("redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/mymaster")

    assert target is not None
    assert target.sentinels == [("127.0.0.1", 26379), ("127.0.0.1", 26380)]
    assert (target.service, target.db, target.username, target.password) == (
        "mymaster",
        0,
        None,
        None,
    )


def test_a_sentinel_url_without_a_service_is_refused() -> None:
    with pytest.raises(ValueError, match="service"):
        sentinel_target("redis+sentinel://h1:26379,h2:26380")
    with pytest.raises(ValueError, match="service"):
        sentinel_target("redis+sentinel://h1:26379/")


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://h:6380/1", "unix:///tmp/redis.sock"]
)
def test_a_plain_redis_url_is_not_a_sentinel_url(url: str) -> None:
    assert sentinel_target(url) is None
