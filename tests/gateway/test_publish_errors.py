"""Issue 10 D: permanent errors are not retried.

A publish that cannot succeed however often it is sent (a topic whose key holds another type, a
clock the script refuses, a Redis out of memory) is answered with a clear JSON error that names
no key, script or Redis text, without ``Retry-After``; the HTTP publisher raises at once instead
of retrying for ``retry_for``. The raw cause is logged by the gateway.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest
import redis

from publisher import Publisher, PublishError
from tests.conftest import GatewayFactory
from tests.support import redis_server
from tests.support.gateway import GatewayProcess
from tests.support.redis_server import RedisServer

LEAKS = re.compile(r"WRONGTYPE|OOM|script|[0-9a-f]{40}|:s:|:clock|user_script", re.IGNORECASE)


def assert_clean_refusal(response: httpx.Response, status: int, error: str, prefix: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == error, body
    assert body["message"], body
    assert "retry-after" not in response.headers
    assert prefix not in response.text, response.text
    assert not LEAKS.search(body["message"]), body["message"]


@pytest.fixture
def node(gateway_factory: GatewayFactory, redis_url: str, prefix: str) -> GatewayProcess:
    return gateway_factory("--prefix", prefix, redis_url=redis_url)


def test_a_topic_whose_key_holds_another_type_is_a_409(
    node: GatewayProcess, redis_client: redis.Redis, prefix: str
) -> None:
    """Issue 10 D: permanent errors. WRONGTYPE came back as a 503 with ``Retry-After`` and the
    key name, and the HTTP publisher retried it for ``retry_for``."""
    redis_client.set(f"{prefix}:s:bad", "oops")
    response = httpx.post(node.url + "/publish", json={"topic": "bad", "data": 1}, timeout=10)
    assert_clean_refusal(response, 409, "topic_storage_conflict", prefix)

    with Publisher.from_url(node.url, retry_for=10) as pub:
        started = time.monotonic()
        with pytest.raises(PublishError) as refused:
            pub.publish("bad", "x")
        assert time.monotonic() - started < 1.0, "a permanent error was retried"
    assert refused.value.status == 409
    assert "WRONGTYPE" in node.output(), "the cause is logged"
    ok = httpx.post(node.url + "/publish", json={"topic": "good", "data": 1}, timeout=10)
    assert ok.status_code == 200, "other topics are not affected"


def test_a_clock_the_script_refuses_is_a_500_that_names_no_internals(
    node: GatewayProcess, redis_client: redis.Redis, prefix: str
) -> None:
    """Issue 10 D: the clock. A clock at the maximum id is refused with a clear error."""
    redis_client.set(f"{prefix}:clock", f"{(1 << 64) - 1}-{(1 << 64) - 1}")
    response = httpx.post(node.url + "/publish", json={"topic": "t", "data": 1}, timeout=10)
    assert_clean_refusal(response, 500, "storage_error", prefix)
    redis_client.delete(f"{prefix}:clock")
    ok = httpx.post(node.url + "/publish", json={"topic": "t", "data": 1}, timeout=10)
    assert ok.status_code == 200, ok.text


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    with redis_server.own_redis("--maxmemory-policy", "noeviction") as server:
        yield server


def test_a_full_redis_is_a_507_that_the_http_publisher_does_not_retry(
    gateway_factory: GatewayFactory, own_redis: RedisServer, prefix: str
) -> None:
    """Issue 10 D: permanent errors. Out of memory came back as a 503 with ``Retry-After``
    and the raw Redis text, and was retried."""
    node = gateway_factory("--prefix", prefix, redis_url=own_redis.url)
    with redis.Redis(port=own_redis.port) as client:
        client.config_set("maxmemory", 1)
        response = httpx.post(node.url + "/publish", json={"topic": "t", "data": 1}, timeout=10)
        assert_clean_refusal(response, 507, "storage_full", prefix)
        with Publisher.from_url(node.url, retry_for=10) as pub:
            started = time.monotonic()
            with pytest.raises(PublishError) as refused:
                pub.publish("t", "x")
            assert time.monotonic() - started < 1.0, "a full Redis was retried"
        assert refused.value.status == 507
        client.config_set("maxmemory", 0)
    ok = httpx.post(node.url + "/publish", json={"topic": "t", "data": 1}, timeout=10)
    assert ok.status_code == 200, ok.text
