"""Batch publishing over HTTP (issue 11): ``publish_many`` through a gateway is one request.

``POST /publish`` takes a JSON list of the objects it takes one at a time and answers
``{"results": [{"id": ...}, ...]}`` in order. A batch is checked whole (shape, each event's
topics against the token, the publish rate counting each event) before anything is stored: a bad
event is a 4xx whose ``index`` names it. Idempotency keys work per event.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest

from publisher import Publisher, make_message
from publisher._http import HttpTransport
from publisher.protocol import id_key
from tests.conftest import GatewayFactory, Node
from tests.support.sse import collect
from tests.support.tokens import SECRET, hs256


def post(url: str, body: Any, token: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(url + "/publish", json=body, headers=headers, timeout=10)


def position(url: str, token: str | None = None, topic: str | None = None) -> str:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    params = {"topic": topic} if topic else {}
    answer = httpx.get(url + "/position", headers=headers, params=params, timeout=5)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["id"])


def test_a_list_is_published_in_one_request_with_ids_in_order(node: Node) -> None:
    """Issue 11: a JSON list is answered with one result per event, in order, and a stream
    gets the events in that order, on both engines."""
    topic = f"batch:{uuid.uuid4().hex[:8]}"
    items = [
        {"topic": topic, "data": {"n": 0}},
        {"topics": [topic, "elsewhere"], "data": "one", "event": "named"},
        {"topic": topic, "data": "two", "idempotency_key": "k-2"},
    ]
    answer = post(node.url, items)
    assert answer.status_code == 200, answer.text
    ids = [result["id"] for result in answer.json()["results"]]
    assert len(ids) == 3
    assert [id_key(i) for i in ids] == sorted({id_key(i) for i in ids})

    stream = asyncio.run(collect(node.url, [topic], lambda s: len(s.events) >= 3, since=0))
    assert [(e.id, e.event, e.data) for e in stream.events] == [
        (ids[0], "message", '{"n":0}'), (ids[1], "named", "one"), (ids[2], "message", "two"),
    ]  # fmt: skip


def test_publish_many_over_http_is_one_request(gateway_factory: GatewayFactory) -> None:
    """Issue 11: ``publish_many`` through a gateway sends one ``POST /publish`` for the
    batch (counted at the client), and the events keep their order and data."""
    gateway = gateway_factory()
    transport = HttpTransport(gateway.url)
    requests: list[str] = []
    original = transport._request

    def counting(conn: Any, method: str, path: str, body: bytes | None) -> Any:
        requests.append(f"{method} {path}")
        return original(conn, method, path, body)

    transport._request = counting  # type: ignore[method-assign]
    pub = Publisher(transport)
    ids = pub.publish_many([("t", n) for n in range(200)])
    assert requests == ["POST /publish"]
    assert len(ids) == 200
    assert [id_key(i) for i in ids] == sorted({id_key(i) for i in ids})
    metrics = httpx.get(gateway.url + "/metrics", timeout=5).text
    assert "sse_events_published_total 200.0" in metrics


def test_a_bad_event_refuses_the_whole_batch_and_names_it(node: Node) -> None:
    """Issue 11: one invalid event is a 400 naming its index; nothing of the batch is
    stored. An empty list and a list of non-objects are 400s too."""
    before = position(node.url)
    answer = post(node.url, [{"topic": "ok", "data": 1}, {"topic": "bad topic", "data": 2}])
    assert answer.status_code == 400
    body = answer.json()
    assert body["error"] == "invalid_topic"
    assert body["index"] == 1
    assert body["message"].startswith("event 1: ")
    assert position(node.url) == before
    for bad in ([], [1, 2], [{"topic": "ok"}]):
        refused = post(node.url, bad)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] in ("invalid_body", "missing_data")
    assert position(node.url) == before


def test_a_batch_holds_at_most_a_thousand_events(gateway_factory: GatewayFactory) -> None:
    """Issue 11: more than 1000 events in one request is a 400 ``batch_too_large``."""
    gateway = gateway_factory("--max-publish-bytes", "200000", "--publish-rate", "0")
    refused = post(gateway.url, [{"topic": "t", "data": n} for n in range(1001)])
    assert refused.status_code == 400
    assert refused.json()["error"] == "batch_too_large"
    accepted = post(gateway.url, [{"topic": "t", "data": n} for n in range(1000)])
    assert accepted.status_code == 200, accepted.text
    assert len(accepted.json()["results"]) == 1000


def test_each_event_of_a_batch_is_authorized(gateway_factory: GatewayFactory) -> None:
    """Issue 11: in token mode every event's topics must be granted; the first that is not
    is a 403 naming its index, and nothing is stored."""
    gateway = gateway_factory("--jwt-secret", SECRET)
    token = hs256(subscribe=["jobs:*"], publish=["jobs:*"])
    before = position(gateway.url, token, "jobs:1")
    answer = post(gateway.url, [{"topic": "jobs:1", "data": 1}, {"topic": "user:bob", "data": 2}],
                  token)  # fmt: skip
    assert answer.status_code == 403
    assert answer.json()["error"] == "forbidden_topic"
    assert answer.json()["index"] == 1
    assert position(gateway.url, token, "jobs:1") == before
    assert post(gateway.url, [{"topic": "jobs:1", "data": 1}]).status_code == 401
    with Publisher.from_url(gateway.url, token=token) as pub:
        ids = pub.publish_many([("jobs:1", 1), ("jobs:2", 2)])
    assert position(gateway.url, token, "jobs:1") == ids[-1]


def test_the_publish_rate_counts_each_event_of_a_batch(gateway_factory: GatewayFactory) -> None:
    """Issue 11: ``--publish-rate`` counts events, not requests: at 5/s (bursts of 10) a batch
    of 10 passes, the next batch waits (429 with Retry-After), and a batch larger than the
    burst, which could never pass, is a 400 ``batch_too_large``."""
    gateway = gateway_factory("--publish-rate", "5")
    too_large = post(gateway.url, [{"topic": "t", "data": n} for n in range(11)])
    assert too_large.status_code == 400
    assert too_large.json()["error"] == "batch_too_large"
    assert post(gateway.url, [{"topic": "t", "data": n} for n in range(10)]).status_code == 200
    limited = post(gateway.url, [{"topic": "t", "data": n} for n in range(3)])
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1


def test_idempotency_keys_work_per_event(node: Node) -> None:
    """Issue 11: sending a batch again with the same keys returns the same ids and stores
    nothing twice; two events of one batch with one key are one event."""
    topic = f"idem:{uuid.uuid4().hex[:8]}"
    items = [
        {"topic": topic, "data": "a", "idempotency_key": "order-1"},
        {"topic": topic, "data": "b", "idempotency_key": "order-2"},
        {"topic": topic, "data": "a again", "idempotency_key": "order-1"},
    ]
    first = [r["id"] for r in post(node.url, items).json()["results"]]
    again = [r["id"] for r in post(node.url, items).json()["results"]]
    assert first == again
    assert first[0] == first[2] != first[1]
    stream = asyncio.run(collect(node.url, [topic], lambda s: len(s.events) >= 2, since=0))
    assert [e.data for e in stream.events] == ["a", "b"]
    assert position(node.url) == first[1]


def test_a_batch_too_large_for_the_body_limit_is_split_by_the_publisher(
    gateway_factory: GatewayFactory,
) -> None:
    """Issue 11: a gateway with a smaller ``--max-publish-bytes`` refuses a batch with 413;
    the publisher splits it and sends the halves, so every event is published once, in
    order."""
    gateway = gateway_factory("--max-publish-bytes", "4000")
    events = [("split", "x" * 300 + str(n)) for n in range(40)]
    with Publisher.from_url(gateway.url) as pub:
        ids = pub.publish_many(events)
    assert len(ids) == 40
    stream = asyncio.run(collect(gateway.url, ["split"], lambda s: len(s.events) >= 40, since=0))
    assert [e.data for e in stream.events] == [data for _, data in events]
    assert [e.id for e in stream.events] == ids


@pytest.mark.parametrize("count", [1, 3])
def test_single_events_keep_the_old_answer(gateway_factory: GatewayFactory, count: int) -> None:
    """Issue 11: a JSON object is still answered ``{"id"}``; the publisher sends one event
    that way and several as a list."""
    gateway = gateway_factory()
    assert set(post(gateway.url, {"topic": "t", "data": 1}).json()) == {"id"}
    ids = HttpTransport(gateway.url).send([make_message("t", n) for n in range(count)])
    assert len(ids) == count
    assert position(gateway.url) == ids[-1]


def test_a_storage_failure_in_a_batch_says_that_other_events_may_be_stored(
    gateway_factory: GatewayFactory, redis_url: str, redis_client: Any, prefix: str
) -> None:
    """Issue 11: the Redis engine stores each event of a batch on its own. When one fails
    for good (a topic whose key is not a stream: 409), the answer says that other events of
    the batch may have been stored, and they were, once each."""
    gateway = gateway_factory("--prefix", prefix, redis_url=redis_url)
    redis_client.set(f"{prefix}:s:broken", "not a stream")
    items = [
        {"topic": "fine", "data": "a", "idempotency_key": "a"},
        {"topic": "broken", "data": "b", "idempotency_key": "b"},
        {"topic": "fine", "data": "c", "idempotency_key": "c"},
    ]
    for _ in range(2):
        answer = post(gateway.url, items)
        assert answer.status_code == 409, answer.text
        body = answer.json()
        assert body["error"] == "topic_storage_conflict"
        assert "may have been stored" in body["batch"]
    assert post(gateway.url, {"topic": "fine", "data": "end"}).status_code == 200
    done = asyncio.run(
        collect(gateway.url, ["fine"], lambda s: any(e.data == "end" for e in s.events), since=0)
    )
    assert [e.data for e in done.events] == ["a", "c", "end"]
