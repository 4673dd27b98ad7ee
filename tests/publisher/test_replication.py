"""Publishing that survives a failover: ``wait_replicas`` acknowledges a publish only once that
many replicas hold it; a primary that refuses writes (``NOREPLICAS``) is retried; and a retry of
a publish whose first id was never confirmed takes that id again where it can, so subscribers
who saw it live see it once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
import redis.exceptions

from publisher import Message, NotReplicated, Publisher, Retention
from publisher.protocol import Keys, make_message
from publisher.redis_transport import RedisTransport, is_transient
from tests.support.gateway import GatewayProcess
from tests.support.redis_server import RedisServer, server_binary
from tests.support.waiting import wait_until


@pytest.fixture
def primary() -> Iterator[RedisServer]:
    server = RedisServer(server_binary())
    server.start()
    yield server
    server.close()


def _replica_of(primary: RedisServer) -> RedisServer:
    replica = RedisServer(server_binary(), "--replicaof", "127.0.0.1", str(primary.port))
    replica.start()
    with redis.Redis(port=replica.port) as client:
        wait_until(
            lambda: client.info("replication").get("master_link_status") == "up",
            "the replica to sync",
        )
    return replica


def _entries(server: RedisServer, prefix: str, topic: str) -> list[str]:
    with redis.Redis(port=server.port) as client:
        return [entry_id.decode() for entry_id, _ in client.xrange(f"{prefix}:s:{topic}")]


def test_with_a_replica_a_publish_is_acknowledged_once_the_replica_holds_it(
    primary: RedisServer, prefix: str
) -> None:
    replica = _replica_of(primary)
    try:
        with Publisher.from_url(primary.url, prefix=prefix, wait_replicas=1) as pub:
            ids = [pub.publish("orders", {"n": n}) for n in range(20)]
            ids += pub.publish_many([("orders", {"n": n}) for n in range(20, 30)])
        assert _entries(replica, prefix, "orders") == ids
    finally:
        replica.close()


def test_without_the_replicas_asked_for_the_publish_fails_after_its_retries(
    primary: RedisServer, prefix: str
) -> None:
    """It may have been stored (on the primary alone): the error says it was not confirmed."""
    with Publisher.from_url(
        primary.url, prefix=prefix, wait_replicas=1, wait_timeout=0.05, retry_for=0.3
    ) as pub:
        started = time.monotonic()
        with pytest.raises(NotReplicated, match="0 of 1 replicas"):
            pub.publish("orders", "unconfirmed", idempotency_key="order-1")
        assert time.monotonic() - started < 3
    assert len(_entries(primary, prefix, "orders")) == 1, "retries store nothing twice"


def test_a_publish_waits_out_a_primary_that_refuses_writes_until_a_replica_attaches(
    prefix: str,
) -> None:
    primary = RedisServer(server_binary(), "--min-replicas-to-write", "1")
    primary.start()
    replica: list[RedisServer] = []
    try:
        with Publisher.from_url(primary.url, prefix=prefix, retry_for=15) as pub:
            attach = threading.Timer(0.5, lambda: replica.append(_replica_of(primary)))
            attach.start()
            started = time.monotonic()
            event_id = pub.publish("orders", "after the replica came")
            attach.join()
            assert time.monotonic() - started >= 0.4
        assert _entries(primary, prefix, "orders") == [event_id]
    finally:
        for server in replica:
            server.close()
        primary.close()


def test_noreplicas_and_connection_errors_are_transient_other_errors_are_not() -> None:
    assert is_transient(redis.exceptions.ResponseError("NOREPLICAS Not enough good replicas"))
    assert is_transient(redis.exceptions.ConnectionError("reset"))
    assert is_transient(NotReplicated(["1-0"], 0, 1))
    assert not is_transient(redis.exceptions.ResponseError("WRONGTYPE Operation against a key"))
    assert not is_transient(ValueError("bad"))


# -- the id of an unconfirmed first attempt ------------------------------------------------------


def _transport(server: RedisServer, prefix: str) -> RedisTransport:
    return RedisTransport(redis.Redis(port=server.port), Keys(prefix), Retention())


def _send(transport: RedisTransport, key: str, prior: str) -> str:
    message = make_message("orders", {}, "e", key)
    return transport._send_once([message], [prior])[0]


def test_a_retry_takes_its_earlier_id_again_when_that_id_is_above_the_clock(
    primary: RedisServer, prefix: str
) -> None:
    """As after a failover that lost the first attempt: the new primary's clock is below it."""
    transport = _transport(primary, prefix)
    first = _send(transport, "a", "")
    ms = int(first.split("-")[0])
    earlier_attempt = f"{ms + 5000}-3"

    again = _send(transport, "b", earlier_attempt)
    after = _send(transport, "c", "")

    assert again == earlier_attempt
    assert _entries(primary, prefix, "orders") == [first, again, after]
    assert int(after.split("-")[0]) >= ms + 5000, "ids keep rising after the reused one"
    transport.close()


def test_a_retry_gets_a_new_id_when_its_earlier_id_is_not_above_the_clock(
    primary: RedisServer, prefix: str
) -> None:
    transport = _transport(primary, prefix)
    first = _send(transport, "a", "")
    second = _send(transport, "b", first)
    assert second != first
    assert _entries(primary, prefix, "orders") == [first, second]
    transport.close()


def test_a_retry_whose_key_is_known_returns_the_stored_id_whatever_it_carries(
    primary: RedisServer, prefix: str
) -> None:
    transport = _transport(primary, prefix)
    first = _send(transport, "a", "")
    assert _send(transport, "a", "99999999999999-0") == first
    assert _entries(primary, prefix, "orders") == [first]
    transport.close()


def test_an_unconfirmed_publish_is_retried_with_its_first_id(
    primary: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transport hands the ids of an unconfirmed attempt to the next one."""
    transport = RedisTransport(
        redis.Redis(port=primary.port), Keys(prefix), Retention(),
        wait_replicas=1, wait_timeout=0.02, retry_for=1.0, sleep=lambda _: None,
    )  # fmt: skip
    seen: list[list[str]] = []
    send_once = transport._send_once

    def spy(messages: list[Message], priors: list[str]) -> Any:
        seen.append(list(priors))
        return send_once(messages, priors)

    monkeypatch.setattr(transport, "_send_once", spy)
    message = make_message("orders", "x", None, "k")
    with pytest.raises(NotReplicated) as failure:
        transport.send([message])
    assert seen[0] == [""]
    assert len(seen) > 1
    assert all(priors == failure.value.ids for priors in seen[1:])
    transport.close()


# -- through the gateway ---------------------------------------------------------------------------


def test_the_gateway_answers_a_publish_once_the_replicas_asked_for_hold_it(
    primary: RedisServer, prefix: str
) -> None:
    """Issue 10 D: ``wait_replicas`` with no replicas. The 503 says that the event was stored
    and delivered, with its id, and a retry with the same key returns that id."""
    node = GatewayProcess(
        "--prefix", prefix, "--publish-replicas", "1", redis_url=primary.url
    ).start()
    try:
        body = {"topic": "orders", "data": "x", "idempotency_key": "order-9"}
        refused = httpx.post(node.url + "/publish", json=body, timeout=10)
        assert refused.status_code == 503
        assert refused.headers["retry-after"]
        assert refused.json()["error"] == "not_replicated"
        stored = refused.json()["id"]
        assert stored in refused.json()["message"]
        assert "stored and delivered" in refused.json()["message"]
        assert _entries(primary, prefix, "orders") == [stored]

        replica = _replica_of(primary)
        try:
            accepted = httpx.post(node.url + "/publish", json=body, timeout=10)
            assert accepted.status_code == 200
            assert accepted.json()["id"] == stored, "the retry is the same event"
            assert _entries(replica, prefix, "orders") == [stored]
        finally:
            replica.close()
    finally:
        node.close()
