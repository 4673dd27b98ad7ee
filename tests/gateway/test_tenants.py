"""Issue 10 C: tenants are isolated.

An idempotency key names one publish of one publisher to one set of topics: another tenant's
key can never suppress, answer for or reveal a publish. Publishing over HTTP is paced per token
subject (``--publish-rate``), and the history of topics that go quiet expires after the
retention age instead of living forever, on both engines.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import jwt
import pytest
import redis

from gateway.engines.memory import MemoryEngine
from publisher import Publisher, Retention, make_message
from tests.conftest import GatewayFactory, Node
from tests.support.gateway import GatewayProcess
from tests.support.sse import collect
from tests.support.waiting import wait_until, wait_until_async

SECRET = "issue-10-tenants-secret-0123456789abcdef0123"
KEY = "order-17-shipped"


def mint(sub: str, publish: list[str]) -> str:
    body = {"sub": sub, "exp": int(time.time() + 3600), "sse": {"publish": publish}}
    return jwt.encode(body, SECRET, algorithm="HS256")


def post(url: str, body: dict[str, Any], token: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + "/publish", json=body, headers=headers, timeout=10)


def replayed(url: str, topics: list[str], until: str) -> list[str]:
    stream = asyncio.run(collect(url, topics, lambda s: until in s.data(), last_event_id="0-0"))
    return stream.data()


# -- C1: idempotency keys are scoped ----------------------------------------------------------


def test_the_same_key_on_other_topics_is_another_publish(node: Node) -> None:
    """Issue 10 C: idempotency keys are global. Tenant A's key on ``a:junk`` made tenant B's
    publish to ``b:orders`` with the same key return A's id, and B's event was never stored
    or delivered."""
    with node.new_publisher() as tenant_a, node.new_publisher() as tenant_b:
        junk = tenant_a.publish("a:junk", "junk", idempotency_key=KEY)
        shipped = tenant_b.publish("b:orders", "ORDER 17 SHIPPED", idempotency_key=KEY)
        retried = tenant_b.publish("b:orders", "ORDER 17 SHIPPED", idempotency_key=KEY)

    assert shipped != junk, "tenant B got tenant A's id"
    assert retried == shipped, "a retry to the same topics must still return the first id"
    assert replayed(node.url, ["b:orders"], "ORDER 17 SHIPPED") == ["ORDER 17 SHIPPED"]
    assert replayed(node.url, ["a:junk"], "junk") == ["junk"]


def test_a_key_is_scoped_to_the_set_of_topics_not_their_order(node: Node) -> None:
    """Issue 10 C: a retry names its topics in any order and is still recognised."""
    with node.new_publisher() as pub:
        first = pub.publish(["x:1", "x:2"], "both", idempotency_key="k")
        again = pub.publish(["x:2", "x:1"], "both", idempotency_key="k")
        subset = pub.publish(["x:1"], "one", idempotency_key="k")
    assert again == first
    assert subset != first


@pytest.fixture(params=["redis", "memory"])
def secured(request: pytest.FixtureRequest, gateway_factory: GatewayFactory) -> GatewayProcess:
    args = ["--jwt-secret", SECRET, "--public-topics", "shared:*"]
    url = None
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        args += ["--prefix", request.getfixturevalue("prefix")]
    return gateway_factory(*args, redis_url=url)


def test_over_http_the_same_key_of_two_subjects_is_two_publishes(secured: GatewayProcess) -> None:
    """Issue 10 C: idempotency keys are global. Over HTTP a key is scoped by the token's
    subject: tenant B's publish is stored and delivered with its own id even on a topic that
    both may write, and tenant A cannot learn that B used the key."""
    tenant_a = mint("tenant-a", ["shared:*", "a:*"])
    tenant_b = mint("tenant-b", ["shared:*", "b:*"])
    body = {"topic": "shared:orders", "data": "from A", "idempotency_key": KEY}

    first_a = post(secured.url, body, tenant_a)
    from_b = post(secured.url, {**body, "data": "from B"}, tenant_b)
    again_a = post(secured.url, body, tenant_a)
    again_b = post(secured.url, {**body, "data": "from B"}, tenant_b)

    for response in (first_a, from_b, again_a, again_b):
        assert response.status_code == 200, response.text
    assert from_b.json()["id"] != first_a.json()["id"]
    assert again_a.json()["id"] == first_a.json()["id"]
    assert again_b.json()["id"] == from_b.json()["id"]
    assert replayed(secured.url, ["shared:orders"], "from B") == ["from A", "from B"]


# -- C2: a publish rate per subject ----------------------------------------------------------


def test_publishing_is_paced_per_subject_with_a_429_and_retry_after(
    gateway_factory: GatewayFactory,
) -> None:
    """Issue 10 C: no publish quota. One subject is paced by ``--publish-rate`` and gets a 429
    ``rate_limited`` with ``Retry-After``; another subject is not affected."""
    node = gateway_factory("--jwt-secret", SECRET, "--publish-rate", "1")
    flooder = mint("flooder", ["f:*"])
    answers = [post(node.url, {"topic": f"f:{n}", "data": n}, flooder) for n in range(10)]

    codes = [r.status_code for r in answers]
    assert 200 in codes, codes
    assert 429 in codes, codes
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.headers["content-type"].startswith("application/json")
    assert refused.json()["error"] == "rate_limited"
    assert int(refused.headers["retry-after"]) >= 1
    other = post(node.url, {"topic": "o:1", "data": 1}, mint("other", ["o:*"]))
    assert other.status_code == 200, other.text


def test_anonymous_publishing_is_paced_per_client_address(
    gateway_factory: GatewayFactory,
) -> None:
    """Issue 10 C: without tokens the publish rate applies per client address."""
    node = gateway_factory("--publish-rate", "1")
    codes = [post(node.url, {"topic": "t", "data": n}).status_code for n in range(10)]
    assert 200 in codes, codes
    assert 429 in codes, codes


def test_the_http_publisher_waits_out_a_429(gateway_factory: GatewayFactory) -> None:
    """Issue 10 C: a paced publisher is slowed down, not failed, within ``retry_for``."""
    node = gateway_factory("--publish-rate", "2")
    with Publisher.from_url(node.url, retry_for=10) as pub:
        ids = [pub.publish("t", n) for n in range(8)]
    assert len(set(ids)) == 8


# -- C2: quiet topics expire -----------------------------------------------------------------


def test_a_quiet_topics_stream_expires_after_the_retention_age(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """Issue 10 C: no key expiry. A stream that is no longer published to expires after
    ``max_age``; the clock and origin never expire."""
    with Publisher.from_url(redis_url, prefix=prefix, retention=Retention(max_age=60)) as pub:
        pub.publish(["quiet", "other"], "x")
    ttl = redis_client.pttl(f"{prefix}:s:quiet")
    assert 55_000 < ttl <= 60_000, ttl
    assert redis_client.pttl(f"{prefix}:clock") == -1
    assert redis_client.pttl(f"{prefix}:origin") == -1

    with Publisher.from_url(redis_url, prefix=prefix, retention=Retention(max_age=0.3)) as pub:
        pub.publish("quiet", "y")
    wait_until(lambda: not redis_client.exists(f"{prefix}:s:quiet"), "the quiet stream expired", 5)
    assert redis_client.exists(f"{prefix}:clock", f"{prefix}:origin") == 2


def test_without_an_age_limit_streams_do_not_expire(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """Issue 10 C: ``max_age=0`` keeps history without an age limit, as documented."""
    with Publisher.from_url(redis_url, prefix=prefix, retention=Retention(max_age=0)) as pub:
        pub.publish("kept", "x")
    assert redis_client.pttl(f"{prefix}:s:kept") == -1


def test_the_memory_engine_forgets_quiet_topics_after_the_retention_age() -> None:
    """Issue 10 C: the embedded engine's memory is bounded too: the history of a topic that
    is no longer published to is dropped after ``max_age``."""

    async def scenario() -> int:
        engine = MemoryEngine(Retention(max_age=0.2))
        for n in range(500):
            await engine.publish(make_message(f"burst:{n}", n))

        async def forgotten() -> bool:
            if len(engine._histories) <= 1:
                return True
            await engine.publish(make_message("busy", "tick"))  # its eviction runs on publish
            return False

        await wait_until_async(forgotten, "the quiet topics forgotten", 5)
        return len(engine._histories)

    assert asyncio.run(scenario()) == 1


def test_a_publish_without_a_key_leaves_no_key_behind(
    gateway_factory: GatewayFactory, redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """Issue 10 C: no key expiry. A flood of ``POST /publish`` without idempotency keys left
    one remembered key per event for the idempotency TTL, though no client could ever retry
    with those keys. Publishes that carry a key are still remembered."""
    node = gateway_factory("--prefix", prefix, redis_url=redis_url)
    for n in range(20):
        assert post(node.url, {"topic": f"t:{n}", "data": n}).status_code == 200
    assert list(redis_client.scan_iter(match=f"{prefix}:idem:*")) == []
    keyed = post(node.url, {"topic": "t", "data": 1, "idempotency_key": "k"})
    again = post(node.url, {"topic": "t", "data": 1, "idempotency_key": "k"})
    assert again.json()["id"] == keyed.json()["id"]
    assert len(list(redis_client.scan_iter(match=f"{prefix}:idem:*"))) == 1
