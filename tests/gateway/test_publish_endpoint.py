"""``POST /publish`` (the README's API): JSON in, ``{"id": ...}`` out, and every refusal is a 4xx
with a JSON body ``{"error": ..., "message": ...}``, never a 500 or a traceback."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import is_loopback_address as _is_loopback
from publisher.protocol import id_key
from tests.conftest import Node
from tests.support.gateway import GatewayProcess
from tests.support.sse import SSEStream, open_stream

LIMIT = 16 * 1024


@pytest.fixture(scope="module", params=["redis", "memory"])
def api(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    """One gateway per engine for the refusal tests, which leave no state behind."""
    args = ["--max-publish-bytes", str(LIMIT)]
    redis_url = None
    if request.param == "redis":
        redis_url = request.getfixturevalue("redis_url")
        args += ["--prefix", "t" + uuid.uuid4().hex[:10]]
    gateway = GatewayProcess(*args, redis_url=redis_url)
    try:
        gateway.start()
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            yield client
    finally:
        gateway.close()


def assert_json_error(
    response: httpx.Response, status: int, error: str | None = None
) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict)
    assert isinstance(body.get("error"), str), body
    assert body["error"], body
    assert isinstance(body.get("message"), str), body
    assert body["message"], body
    if error is not None:
        assert body["error"] == error, body
    assert "Traceback" not in response.text
    return body


async def _subscribed(
    node: Node, client: httpx.AsyncClient, topics: list[str]
) -> tuple[SSEStream, asyncio.Task[None]]:
    """Open a stream and return once it is subscribed (its ``: ok`` arrived)."""
    stream, task = open_stream(client, node.url, topics)
    await stream.until_subscribed()
    return stream, task


async def _post_and_collect(
    node: Node, topics: list[str], bodies: list[Any], settle: str
) -> tuple[list[httpx.Response], SSEStream]:
    """POST each body while subscribed to ``topics``, then publish ``settle`` (an event named
    ``settle``) and return everything the stream got before it."""
    async with httpx.AsyncClient(base_url=node.url, timeout=httpx.Timeout(10, read=None)) as client:
        stream, task = await _subscribed(node, client, topics)
        try:
            responses = []
            for body in bodies:
                content = body if isinstance(body, bytes) else None
                payload = None if isinstance(body, bytes) else body
                responses.append(await client.post("/publish", content=content, json=payload))
            await asyncio.to_thread(node.publish, topics, settle, "settle")
            await stream.wait_for(lambda s: any(e.event == "settle" for e in s.events))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    stream.events = [e for e in stream.events if e.event != "settle"]
    return responses, stream


# -- accepted publishes -------------------------------------------------------------------------


def test_publish_to_one_topic_with_json_data_reaches_a_subscriber(node: Node) -> None:
    body = {"topic": "orders", "data": {"id": 7, "items": ["a", "b"], "paid": True}}
    (response,), stream = asyncio.run(_post_and_collect(node, ["orders"], [body], "end"))

    assert response.status_code == 200, response.text
    reply = response.json()
    assert set(reply) == {"id"}
    id_key(reply["id"])  # a valid <ms>-<seq> id
    assert [(e.id, e.event, e.data) for e in stream.events] == [
        (reply["id"], "message", '{"id":7,"items":["a","b"],"paid":true}')
    ]


def test_publish_to_several_topics_with_an_event_name_and_text_data(node: Node) -> None:
    body = {"topics": ["a", "b"], "event": "x", "data": "two\nlines"}
    (response,), stream_a = asyncio.run(_post_and_collect(node, ["a"], [body], "end"))
    assert response.status_code == 200, response.text
    first = response.json()["id"]
    assert [(e.id, e.event, e.data) for e in stream_a.events] == [(first, "x", "two\nlines")]

    (response,), stream_b = asyncio.run(_post_and_collect(node, ["b"], [body], "end"))
    assert response.status_code == 200, response.text
    second = response.json()["id"]
    assert id_key(second) > id_key(first)
    assert [(e.id, e.event, e.data) for e in stream_b.events] == [(second, "x", "two\nlines")]


def test_a_multi_topic_publish_reaches_a_client_of_both_topics_once(node: Node) -> None:
    body = {"topics": ["a", "b"], "data": 1}
    (response,), stream = asyncio.run(_post_and_collect(node, ["a", "b"], [body], "end"))
    assert response.status_code == 200, response.text
    assert [(e.id, e.data) for e in stream.events] == [(response.json()["id"], "1")]


def test_json_null_string_and_number_data_are_published(node: Node) -> None:
    bodies = [{"topic": "t", "data": None}, {"topic": "t", "data": ""}, {"topic": "t", "data": 2.5}]
    responses, stream = asyncio.run(_post_and_collect(node, ["t"], bodies, "end"))
    assert [r.status_code for r in responses] == [200, 200, 200]
    ids = [r.json()["id"] for r in responses]
    assert [(e.id, e.data) for e in stream.events] == list(
        zip(ids, ["null", "", "2.5"], strict=True)
    )


# -- refusals -----------------------------------------------------------------------------------

BAD_BODIES: list[tuple[str, bytes | Any, str]] = [
    ("malformed json", b'{"topic": "a", "data": ', "invalid_json"),
    ("not utf-8", b'{"topic": "a", "data": "\xff\xfe"}', "invalid_json"),
    ("empty body", b"", "invalid_json"),
    ("deeply nested", b"[" * 5000 + b"]" * 5000, "invalid_json"),
    ("array body", b'["a"]', "invalid_body"),
    ("string body", b'"text"', "invalid_body"),
    ("number body", b"42", "invalid_body"),
    ("null body", b"null", "invalid_body"),
    ("topic and topics", {"topic": "a", "topics": ["b"], "data": 1}, "invalid_topics"),
    ("neither topic nor topics", {"data": 1}, "invalid_topics"),
    ("empty topics list", {"topics": [], "data": 1}, "invalid_topics"),
    ("topics not a list", {"topics": "a", "data": 1}, "invalid_topics"),
    ("topic not a string", {"topic": 5, "data": 1}, "invalid_topics"),
    ("topic as a list", {"topic": ["a"], "data": 1}, "invalid_topics"),
    ("non-string in topics", {"topics": ["a", None], "data": 1}, "invalid_topics"),
    ("missing data", {"topic": "a"}, "missing_data"),
    ("event is a number", {"topic": "a", "event": 5, "data": 1}, "invalid_event"),
    ("event is a list", {"topic": "a", "event": ["x"], "data": 1}, "invalid_event"),
    ("event with LF", {"topic": "a", "event": "x\ny", "data": 1}, "invalid_event"),
    ("event with CR", {"topic": "a", "event": "x\ry", "data": 1}, "invalid_event"),
    ("event with CRLF", {"topic": "a", "event": "x\r\n", "data": 1}, "invalid_event"),
    ("event with NUL", {"topic": "a", "event": "x\x00y", "data": 1}, "invalid_event"),
    ("empty event", {"topic": "a", "event": "", "data": 1}, "invalid_event"),
    ("event naming a topic", {"topic": "a", "event": "topic\nx", "data": 1}, "invalid_event"),
    ("data with NUL", {"topic": "a", "data": "x\x00y"}, "invalid_data"),
    ("unknown field", {"topic": "a", "data": 1, "retry": 5}, "unknown_field"),
    ("id field", {"topic": "a", "data": 1, "id": "1-1"}, "unknown_field"),
]


@pytest.mark.parametrize(("body", "error"), [(b, e) for _, b, e in BAD_BODIES],
                         ids=[name for name, _, _ in BAD_BODIES])  # fmt: skip
def test_bad_body_is_a_400_json_error(api: httpx.Client, body: Any, error: str) -> None:
    if isinstance(body, bytes):
        response = api.post("/publish", content=body)
    else:
        response = api.post("/publish", json=body)
    assert_json_error(response, 400, error)


def test_unknown_field_is_named(api: httpx.Client) -> None:
    body = assert_json_error(
        api.post("/publish", json={"topic": "a", "data": 1, "colour": "red"}), 400
    )
    assert "colour" in body["message"]


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        ({"topic": "has space", "data": 1}, "has space"),
        ({"topics": ["ok", "two words"], "data": 1}, "two words"),
        ({"topic": "bad*glob", "data": 1}, "bad*glob"),
        ({"topic": "x" * 257, "data": 1}, "x" * 257),
        ({"topic": "caf\u00e9", "data": 1}, "caf\u00e9"),
        ({"topic": "", "data": 1}, None),
    ],
    ids=["space", "second-of-two", "star", "too-long", "non-ascii", "empty"],
)
def test_invalid_topic_is_a_400_naming_it(
    api: httpx.Client, payload: dict[str, Any], named: str | None
) -> None:
    body = assert_json_error(api.post("/publish", json=payload), 400, "invalid_topic")
    if named is not None:
        assert named in body["message"], body


def test_a_refused_publish_publishes_nothing(node: Node) -> None:
    """An event name with a line break would let a publisher inject frames; it is refused
    and no subscriber sees any trace of it (no extra frame, no extra field)."""
    bodies = [
        {"topic": "t", "event": "x\ndata: injected\n\nevent: y", "data": "payload"},
        {"topic": "t", "event": "x\rid: 999-0", "data": "payload"},
        {"topic": "t", "event": "x\r\n", "data": "payload"},
        {"topic": "t", "data": "x\x00y"},
        {"topics": ["t", "bad topic"], "data": "payload"},
    ]
    responses, stream = asyncio.run(_post_and_collect(node, ["t"], bodies, "end"))
    for response in responses:
        assert_json_error(response, 400)
    assert stream.events == []
    assert stream.parser.last_id != "999-0"


def test_body_over_the_limit_is_a_413(api: httpx.Client) -> None:
    big = {"topic": "a", "data": "x" * LIMIT}
    assert_json_error(api.post("/publish", json=big), 413, "body_too_large")


def test_chunked_body_over_the_limit_is_a_413(api: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"topic": "a", "data": "'
        for _ in range(4):
            yield b"x" * (LIMIT // 3)
        yield b'"}'

    response = api.post("/publish", content=chunks())
    assert response.request.headers.get("transfer-encoding") == "chunked"
    assert "content-length" not in response.request.headers
    assert_json_error(response, 413, "body_too_large")


def test_body_at_the_limit_is_accepted(api: httpx.Client) -> None:
    head, tail = b'{"topic":"a","data":"', b'"}'
    exact = head + b"x" * (LIMIT - len(head) - len(tail)) + tail
    assert len(exact) == LIMIT
    response = api.post("/publish", content=exact)
    assert response.status_code == 200, response.text

    def chunks() -> Iterator[bytes]:
        yield exact[:5000]
        yield exact[5000:]

    assert api.post("/publish", content=chunks()).status_code == 200


def test_declared_length_over_the_limit_is_a_413_before_the_body_is_read(
    api: httpx.Client,
) -> None:
    port = api.base_url.port
    assert port is not None
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"POST /publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 99999999\r\n\r\n{"
        )
        received = b""
        while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), received
    assert orjson.loads(body)["error"] == "body_too_large"


def test_get_publish_is_a_405_json_error(api: httpx.Client) -> None:
    response = api.get("/publish")
    assert_json_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers.get("allow", "")


def test_unknown_route_is_a_404_json_error(api: httpx.Client) -> None:
    assert_json_error(api.get("/nope"), 404, "not_found")
    assert_json_error(api.post("/events/publish", json={}), 404, "not_found")


def test_published_counter_counts_accepted_publishes_only(node: Node) -> None:
    before = node.gateway.metric("sse_events_published_total")
    with httpx.Client(base_url=node.url, timeout=10) as api:
        assert api.post("/publish", json={"topic": "c", "data": 1}).status_code == 200
        assert api.post("/publish", json={"topic": "c"}).status_code == 400
    assert node.gateway.metric("sse_events_published_total") == before + 1


# -- who may publish ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("192.168.1.20", False),
        ("::ffff:10.0.0.1", False),
        ("2001:db8::1", False),
        ("localhost", False),
        ("not an address", False),
        ("", False),
        (None, False),
    ],
)
def test_loopback_rule(host: str | None, loopback: bool) -> None:
    assert _is_loopback(host) is loopback
