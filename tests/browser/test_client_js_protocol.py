"""Issue 11: ``/client.js`` against answers written byte by byte, in Chromium.

Playwright answers every request of the page: ``/client.js`` from the package, ``/events``
from a script of answers, so each rule of the client is checked on exactly the stream that
tests it: the WHATWG parse (split at every byte), no id twice (ids compared as numbers, a
replay that overlaps), the position lines, refusals, terminal errors and ``reset``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import gateway

ORIGIN = "http://127.0.0.1:9"  # never reached: Playwright answers every request
CLIENT = (Path(gateway.__file__).parent / "static" / "client.js").read_bytes()
WAIT_MS = 10_000

Answer = tuple[int, str, str]  # status, content type, body
STREAM = "text/event-stream"


def refusal(reason: str, retry_ms: int) -> Answer:
    data = json.dumps({"reason": reason, "message": "not now", "retry_ms": retry_ms})
    return 200, STREAM, f"retry: {retry_ms}\n: refused: {reason}\nevent: refused\ndata: {data}\n\n"


def error(status: int, code: str) -> Answer:
    return status, "application/json", json.dumps({"error": code, "message": f"{code}!"})


BAD_REQUEST = error(400, "invalid_id")


class Server:
    """Answers the page's ``/events`` requests from a script; the last answer repeats."""

    def __init__(self, page: Any, answers: list[Answer]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, dict[str, str], float]] = []
        page.route(f"{ORIGIN}/events**", self.answer)

    def answer(self, route: Any) -> None:
        request = route.request
        self.requests.append((request.url, request.headers, time.monotonic()))
        status, content_type, body = self.answers[min(len(self.requests), len(self.answers)) - 1]
        route.fulfill(status=status, content_type=content_type, body=body)


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context()
    page = context.new_page()
    page.route(
        f"{ORIGIN}/page.html",
        lambda r: r.fulfill(body="<!doctype html><title>t</title>", content_type="text/html"),
    )
    page.route(
        f"{ORIGIN}/client.js",
        lambda r: r.fulfill(body=CLIENT, content_type="application/javascript"),
    )
    page.goto(f"{ORIGIN}/page.html")
    yield page
    context.close()


FOLLOW = """(options) => import("/client.js").then(({ subscribe }) => {
  const rec = window.rec = {events: [], statuses: [], errors: [], resets: []};
  const record = (data, ev) => rec.events.push([ev.type, data, ev.id, ev.data]);
  window.sub = subscribe("/events", {
    ...options,
    on: {message: record, n: record},
    onStatus: (s) => rec.statuses.push(s),
    onError: (e) => rec.errors.push(e),
    onReset: (info) => rec.resets.push(info),
  });
})"""


def follow(page: Any, **options: Any) -> None:
    page.evaluate(FOLLOW, {"topics": ["t"], "backoff": {"initial": 50, "max": 100}, **options})


def wait_closed(page: Any) -> dict[str, Any]:
    page.wait_for_function("() => window.sub.status === 'closed'", timeout=WAIT_MS)
    record: dict[str, Any] = page.evaluate("() => window.rec")
    return record


TRANSPORTS = pytest.mark.parametrize("transport", ["eventsource", "fetch"])


PARSE = """([chunks]) => import("/client.js").then(({ EventStreamParser }) => {
  const out = [];
  const parser = new EventStreamParser({
    onEvent: (ev) => out.push(["event", ev.type, ev.data, ev.id]),
    onId: (id) => out.push(["id", id]),
    onComment: (text) => out.push(["comment", text]),
    onRetry: (ms) => out.push(["retry", ms]),
  });
  for (const chunk of chunks) parser.push(chunk);
  return out;
})"""

RAW = (
    "\ufeffretry: 1500\r\n"
    ": ok\r"
    "id: 1-0\r\n"
    "data: first\r"
    "data:second\n"
    "data:  indented\n"
    "\r\n"
    "id: 2-0\n"
    "\n"
    "event: n\n"
    "data\n"
    "\n"
    "id: 3\x000\n"
    'data: {"a": 1}\n'
    "\n"
    "event: ignored\n"
    "\n"
    "retry: soon\n"
    "unknown: field\n"
    "id\n"
    "data: last\n"
    "\n"
    "data: never dispatched"
)
PARSED = [
    ["retry", 1500],
    ["comment", "ok"],
    ["event", "message", "first\nsecond\n indented", "1-0"],
    ["id", "2-0"],
    ["event", "n", "", ""],
    ["event", "message", '{"a": 1}', ""],  # an id holding NUL is ignored
    ["event", "message", "last", ""],  # `id` with no value sets an empty id
]


def test_the_parser_follows_the_whatwg_rules_however_the_stream_is_cut(page: Any) -> None:
    """CR, LF and CRLF (a CRLF split between chunks included), a leading BOM, multi-line data,
    comments, retry, an id with NUL, empty data, an unfinished event at the end."""
    assert page.evaluate(PARSE, [[RAW]]) == PARSED
    assert page.evaluate(PARSE, [list(RAW)]) == PARSED
    splits = [[[RAW[:i], RAW[i:]]] for i in range(1, len(RAW))]
    results = page.evaluate(f"(cases) => Promise.all(cases.map({PARSE}))", splits)
    for i, result in enumerate(results):
        assert result == PARSED, (i, RAW[:i])


@TRANSPORTS
def test_no_id_is_delivered_twice_and_ids_compare_as_numbers(page: Any, transport: str) -> None:
    """A replay that overlaps what was delivered, and an older id, are dropped; "10-0" comes
    after "9-0"; the reconnect asks from the last id; a 400 ends the subscription."""
    first = 'id: 9-0\nevent: n\ndata: {"seq": 1}\n\nid: 10-0\nevent: n\ndata: {"seq": 2}\n\n'
    again = (
        'id: 10-0\nevent: n\ndata: {"seq": 2}\n\n'
        'id: 9-5\nevent: n\ndata: {"seq": 0}\n\n'
        'id: 10-1\nevent: n\ndata: {"seq": 3}\n\n'
    )
    server = Server(page, [(200, STREAM, first), (200, STREAM, again), BAD_REQUEST])
    follow(page, transport=transport)
    record = wait_closed(page)
    assert [e[1]["seq"] for e in record["events"]] == [1, 2, 3], record
    assert [e[2] for e in record["events"]] == ["9-0", "10-0", "10-1"], record
    assert page.evaluate("() => window.sub.lastEventId") == "10-1"
    assert record["errors"][-1] == {"status": 400, "error": "invalid_id", "message": "invalid_id!"}
    (url1, headers1, _), (url2, headers2, _), *_ = server.requests
    if transport == "fetch":
        assert "last-event-id" not in headers1, headers1
        assert headers2["last-event-id"] == "10-0", headers2
        assert "lastEventID" not in url2, url2
    else:
        assert "lastEventID" not in url1, url1
        assert "lastEventID=10-0" in url2, url2
    assert record["statuses"][-1] == "closed", record


def test_position_lines_move_the_fetch_transport_s_resume_point(page: Any) -> None:
    """An id with no data (events skipped by `types`) is not an event, but a reconnect
    resumes after it."""
    first = 'id: 1-0\nevent: n\ndata: {"seq": 1}\n\nid: 7-0\n\n: ping\n\n'
    server = Server(page, [(200, STREAM, first), BAD_REQUEST])
    follow(page, transport="fetch", types=["n"])
    record = wait_closed(page)
    assert [e[2] for e in record["events"]] == ["1-0"], record
    assert page.evaluate("() => window.sub.lastEventId") == "7-0"
    assert server.requests[1][1]["last-event-id"] == "7-0"
    assert "types=n" in server.requests[0][0]


@TRANSPORTS
def test_data_is_parsed_json_or_the_raw_string(page: Any, transport: str) -> None:
    body = 'id: 1-0\ndata: {"a": [1]}\n\nid: 2-0\ndata: plain\ndata: text\n\n'
    Server(page, [(200, STREAM, body), BAD_REQUEST])
    follow(page, transport=transport)
    record = wait_closed(page)
    assert record["events"] == [
        ["message", {"a": [1]}, "1-0", '{"a": [1]}'],
        ["message", "plain\ntext", "2-0", "plain\ntext"],
    ], record


@TRANSPORTS
def test_a_refusal_is_reported_and_retried_no_sooner_than_it_asks(
    page: Any, transport: str
) -> None:
    server = Server(
        page,
        [
            refusal("too_many_connections", 700),
            (200, STREAM, 'id: 1-0\nevent: n\ndata: {"seq": 1}\n\n'),
            BAD_REQUEST,
        ],
    )
    follow(page, transport=transport)
    record = wait_closed(page)
    first, second = record["errors"][:2]
    assert first == {"error": "too_many_connections", "message": "not now"}, record
    assert second.get("status") is None or second["status"] != 400, record
    assert [e[1]["seq"] for e in record["events"]] == [1], record
    assert record["statuses"][:3] == ["connecting", "reconnecting", "open"], record
    assert record["statuses"][-1] == "closed", record
    waited = server.requests[1][2] - server.requests[0][2]
    assert waited >= 0.65, waited  # the refusal's retry_ms (700), not the 50 ms backoff


@TRANSPORTS
@pytest.mark.parametrize(
    ("answer", "code"),
    [(error(403, "forbidden_topic"), "forbidden_topic"), (error(401, "invalid_token"), None)],
)
def test_a_permanent_refusal_ends_the_subscription(
    page: Any, transport: str, answer: Answer, code: str | None
) -> None:
    """403, and a 401 when no token function can give another token: "closed", once."""
    server = Server(page, [answer])
    follow(page, transport=transport, token="static-token")
    record = wait_closed(page)
    assert record["statuses"] == ["connecting", "closed"], record
    assert len(record["errors"]) == 1, record
    assert record["errors"][0]["status"] == answer[0], record
    assert record["errors"][0]["error"] == json.loads(answer[2])["error"], record
    if transport == "fetch":
        assert len(server.requests) == 1, server.requests
        assert server.requests[0][1]["authorization"] == "Bearer static-token"
        assert "token" not in server.requests[0][0]
    else:  # the EventSource's request, then the one that learns the status
        assert len(server.requests) == 2, server.requests
        assert "token=static-token" in server.requests[0][0]
    del code


@TRANSPORTS
def test_a_reset_is_reported_once_and_lets_ids_start_over(page: Any, transport: str) -> None:
    """After `reset` (history lost: the ids may start over) lower ids are delivered again."""
    first = 'id: 50-0\nevent: n\ndata: {"seq": 1}\n\n'
    reset = json.dumps({"reason": "history_lost", "topics": ["t"]})
    second = f'event: reset\ndata: {reset}\n\nid: 3-0\nevent: n\ndata: {{"seq": 2}}\n\n'
    Server(page, [(200, STREAM, first), (200, STREAM, second), BAD_REQUEST])
    follow(page, transport=transport)
    record = wait_closed(page)
    assert record["resets"] == [{"reason": "history_lost", "topics": ["t"]}], record
    assert [e[2] for e in record["events"]] == ["50-0", "3-0"], record
    assert page.evaluate("() => window.sub.lastEventId") == "3-0"


def test_a_503_is_retried_by_the_fetch_transport(page: Any) -> None:
    server = Server(
        page,
        [
            error(503, "draining"),
            (200, STREAM, 'id: 1-0\nevent: n\ndata: {"seq": 1}\n\n'),
            BAD_REQUEST,
        ],
    )
    follow(page, transport="fetch")
    record = wait_closed(page)
    assert record["errors"][0] == {"status": 503, "error": "draining", "message": "draining!"}
    assert [e[1]["seq"] for e in record["events"]] == [1], record
    assert len(server.requests) == 3


def test_subscribe_checks_its_options(page: Any) -> None:
    messages = page.evaluate(
        """() => import("/client.js").then(({ subscribe }) => [
          {}, {topics: []}, {topics: ["t"], transport: "websocket"},
        ].map((options) => { try { subscribe("/events", options); return null; }
                             catch (e) { return e.constructor.name + ": " + e.message; } }))"""
    )
    assert all(m and m.startswith("TypeError: subscribe: ") for m in messages), messages


@TRANSPORTS
def test_the_request_names_topics_since_types_and_token(page: Any, transport: str) -> None:
    """`since` is sent until an id is known; the token comes from the function each time."""
    answers = [(200, STREAM, 'id: 4-0\nevent: n\ndata: {"seq": 1}\n\n'), BAD_REQUEST]
    server = Server(page, answers)
    page.evaluate("() => { window.calls = 0; }")
    page.evaluate(
        FOLLOW.replace("...options,", "...options, token: async () => `tok${++window.calls}`,"),
        {"topics": ["a", "b:c"], "since": 1795240893212, "types": ["n", "message"],
         "transport": transport, "backoff": {"initial": 50, "max": 100}},
    )  # fmt: skip
    wait_closed(page)
    (first, headers1, _), (second, headers2, _), *_ = server.requests
    common = "topic=a&topic=b%3Ac"
    assert first.startswith(f"{ORIGIN}/events?{common}&since=1795240893212&types=n%2Cmessage")
    assert "since" not in second, second
    if transport == "fetch":
        assert "token" not in first + second
        assert headers1["authorization"] == "Bearer tok1"
        assert headers2["authorization"] == "Bearer tok2"
    else:
        assert first.endswith("&token=tok1"), first
        assert second == f"{ORIGIN}/events?{common}&lastEventID=4-0&types=n%2Cmessage&token=tok2"
