"""Issue 10 D: the publish script validates everything before its first write.

Redis does not roll a script back, so a script that fails half way leaves what it wrote. The
clock, the origin, the idempotency key, every stream and every argument are checked first; a
refusal names the problem, writes nothing, and the next publish after a repair works.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator

import pytest
import redis
import redis.exceptions

from publisher import NotReplicated, Publisher
from publisher.protocol import id_key
from tests.support import redis_server
from tests.support.redis_server import RedisServer, stream_entries

U64 = (1 << 64) - 1


@pytest.fixture
def publisher(redis_url: str, prefix: str) -> Iterator[Publisher]:
    with Publisher.from_url(redis_url, prefix=prefix, retry_for=5) as pub:
        yield pub


def snapshot(client: redis.Redis, prefix: str) -> dict[bytes, object]:
    """Every key under ``prefix`` with its type and content (a write would change this)."""
    state: dict[bytes, object] = {}
    for key in sorted(client.scan_iter(match=f"{prefix}:*")):
        kind = client.type(key)
        content = client.get(key) if kind == b"string" else client.dump(key)
        state[key] = (kind, content, client.pttl(key) > 0)
    return state


@pytest.mark.parametrize(
    "clock",
    [f"{U64}-{U64}", f"{1 << 53}-0", "oops", "12-", "-1-0", "1-2-3", "0x10-0", "1" * 30 + "-0"],
    ids=["max-id", "ms-beyond-2^53", "garbage", "no-seq", "negative", "three-parts", "hex",
         "30-digit-ms"],
)  # fmt: skip
def test_a_clock_the_script_cannot_advance_is_refused_with_no_write(
    publisher: Publisher, redis_client: redis.Redis, prefix: str, clock: str
) -> None:
    """Issue 10 D: the clock. A clock at the maximum id overflowed (Lua numbers are doubles)
    and was stored as a negative pair, and every publish failed afterwards."""
    redis_client.set(f"{prefix}:clock", clock)
    before = snapshot(redis_client, prefix)

    with pytest.raises(redis.exceptions.ResponseError, match="clock") as refused:
        publisher.publish("orders", "x", idempotency_key="k1")

    assert "user_script" not in str(refused.value)
    assert snapshot(redis_client, prefix) == before, "the refused publish wrote something"
    redis_client.delete(f"{prefix}:clock")
    event_id = publisher.publish("orders", "after the repair", idempotency_key="k1")
    assert redis_client.get(f"{prefix}:clock") == event_id.encode()


def test_a_sequence_beyond_double_precision_is_advanced_exactly(
    publisher: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    """Issue 10 D: the clock. Sequence numbers up to 2^64-1 are compared and incremented as
    integers, never as doubles (which would issue the same id twice)."""
    far = 99_999_999_999_999
    for seq in [(1 << 53) + 1, U64 - 1, U64]:
        redis_client.set(f"{prefix}:clock", f"{far}-{seq}")
        event_id = publisher.publish("orders", "x")
        expected = f"{far}-{seq + 1}" if seq < U64 else f"{far + 1}-0"
        assert event_id == expected
        assert redis_client.get(f"{prefix}:clock") == event_id.encode()


def test_a_stream_ahead_of_the_clock_raises_the_id_instead_of_failing_half_way(
    publisher: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    """Issue 10 D: the clock. A clock set back behind a stream (restored, or edited) made
    XADD fail after the clock and the other topics were already written."""
    ahead = "99999999999999-5"
    redis_client.xadd(f"{prefix}:s:ahead", {"f": b"data: old\n\n", "p": "0-0"}, id=ahead)
    publisher.publish("warm", "sets the clock")

    event_id = publisher.publish(["behind", "ahead"], "both")

    assert id_key(event_id) > id_key(ahead)
    for topic in ("behind", "ahead"):
        newest = stream_entries(redis_client, f"{prefix}:s:{topic}", count=1, newest_first=True)
        assert newest[0][0] == event_id
    assert redis_client.get(f"{prefix}:clock") == event_id.encode()


@pytest.mark.parametrize("key", ["clock", "origin", "idem"])
def test_a_wrong_type_on_the_clock_origin_or_key_is_refused_with_no_write(
    publisher: Publisher, redis_client: redis.Redis, prefix: str, key: str
) -> None:
    """Issue 10 D: the clock. Every key the script writes is checked before the first write."""
    publisher.publish("orders", "first", idempotency_key="k1")
    if key == "idem":
        [name] = redis_client.scan_iter(match=f"{prefix}:idem:*")
    else:
        name = f"{prefix}:{key}".encode()
    redis_client.delete(name)
    redis_client.hset(name, "x", "y")
    before = snapshot(redis_client, prefix)
    # The idempotency key is the one retried; a clock or origin fails any new publish.
    key = "k1" if key == "idem" else "k2"
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        publisher.publish("orders", "again", idempotency_key=key)
    assert snapshot(redis_client, prefix) == before


def test_a_refused_publish_names_no_script_internals(
    publisher: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    """Issue 10 D: permanent errors. A wrong-type stream is refused before anything is
    written, naming the kind of key, never the script."""
    publisher.publish("other", "sets the clock")
    redis_client.set(f"{prefix}:s:bad", "oops")
    clock = redis_client.get(f"{prefix}:clock")
    with pytest.raises(redis.exceptions.ResponseError) as refused:
        publisher.publish(["good", "bad"], "x")
    assert str(refused.value).startswith("WRONGTYPE")
    assert not re.search(r"[0-9a-f]{40}", str(refused.value)), "the script's SHA leaked"
    assert redis_client.get(f"{prefix}:clock") == clock
    assert not redis_client.exists(f"{prefix}:s:good")


# -- out of memory and replicas ----------------------------------------------------------------


@pytest.fixture
def own_redis(prefix: str) -> Iterator[RedisServer]:
    """A Redis of this test's own, to fill up or to run without replicas."""
    with redis_server.own_redis("--maxmemory-policy", "noeviction") as server:
        yield server


def test_out_of_memory_is_not_retried(own_redis: RedisServer, prefix: str) -> None:
    """Issue 10 D: permanent errors are not retried. A full Redis answers at once instead of
    after ``retry_for``, and nothing is written."""
    with Publisher.from_url(own_redis.url, prefix=prefix, retry_for=10) as pub:
        pub.publish("warm", "x")
        with redis.Redis(port=own_redis.port) as client:
            client.config_set("maxmemory", 1)
            clock = client.get(f"{prefix}:clock")
            started = time.monotonic()
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                pub.publish("orders", "x")
            assert time.monotonic() - started < 1.0
            assert client.get(f"{prefix}:clock") == clock
            assert not client.exists(f"{prefix}:s:orders")


def test_not_replicated_says_the_event_was_stored_and_delivered(
    own_redis: RedisServer, prefix: str
) -> None:
    """Issue 10 D: ``wait_replicas`` with no replicas. The error says that the event was
    stored and delivered, with its id, and how many replicas confirmed it."""
    with (
        Publisher.from_url(
            own_redis.url, prefix=prefix, wait_replicas=1, wait_timeout=0.05, retry_for=0.2
        ) as pub,
        pytest.raises(NotReplicated) as failure,
    ):
        pub.publish("orders", "x", idempotency_key="order-1")
    text = str(failure.value)
    assert failure.value.ids
    assert failure.value.ids[0] in text
    assert "stored and delivered" in text
    assert "0 of 1" in text
    assert "0 replicas attached" in text


def test_a_publisher_warns_once_when_fewer_replicas_are_attached_than_it_waits_for(
    own_redis: RedisServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10 D: ``wait_replicas`` with no replicas. The publisher says so at its first
    publish, instead of only failing each publish after ``retry_for``."""
    caplog.set_level(logging.WARNING, logger="publisher")
    with Publisher.from_url(
        own_redis.url, prefix=prefix, wait_replicas=1, wait_timeout=0.02, retry_for=0
    ) as pub:
        for _ in range(3):
            with pytest.raises(NotReplicated):
                pub.publish("orders", "x")
    warnings = [r.getMessage() for r in caplog.records if r.name == "publisher"]
    assert len(warnings) == 1, warnings
    assert "wait_replicas=1" in warnings[0]
    assert "0 replicas attached" in warnings[0]
