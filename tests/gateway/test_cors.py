"""CORS (acceptance 7): browsers on other origins may read streams and publish.

With ``--cors-origin`` (repeatable) every response to a request from a listed origin, the
``/events`` stream and its refusals included, carries ``access-control-allow-origin`` (the
origin echoed), ``access-control-allow-credentials: true`` and ``vary: Origin``; a preflight
``OPTIONS`` is a 204 naming the allowed methods and headers. Any other origin gets no
``access-control-*`` header at all and its preflight is a 403. ``--cors-origin '*'`` allows
every origin without credentials; without ``--cors-origin`` there are no CORS headers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest

from tests.support.gateway import GatewayProcess

SECRET = "acceptance-7-cors-secret-0123456789abcdef"
APP = "https://app.example"
OTHER = "https://other.example"
EVIL = "https://evil.example"
NOT_ALLOWED = [
    EVIL,
    "http://app.example",
    "https://app.example:8443",
    "https://app.example.evil.example",
    "https://sub.app.example",
    "https://app.exampl",
    "null",
]


def mint(sub: str, subscribe: list[str] | None = None, publish: list[str] | None = None) -> str:
    rights = {"subscribe": subscribe or [], "publish": publish or []}
    claims = {"sub": sub, "exp": int(time.time() + 3600), "sse": rights}
    return jwt.encode(claims, SECRET, algorithm="HS256")


READER = mint("reader", subscribe=["room:*"])
WRITER = mint("writer", publish=["room:*"])


@dataclass
class Reply:
    """A response's status and headers (and JSON body when it is not a stream)."""

    status: int
    headers: httpx.Headers
    body: Any = None

    @property
    def error(self) -> Any:
        return self.body.get("error") if isinstance(self.body, dict) else None


def get_events(http: httpx.Client, query: str, headers: dict[str, str] | None = None) -> Reply:
    """``GET /events?<query>``: a 200 stream is closed as soon as its headers arrive."""
    with http.stream("GET", "/events?" + query, headers=headers) as response:
        if response.status_code == 200:
            return Reply(200, response.headers)
        response.read()
        return Reply(response.status_code, response.headers, response.json())


def preflight(
    http: httpx.Client, path: str, origin: str, method: str, request_headers: str
) -> httpx.Response:
    return http.options(path, headers={
        "origin": origin,
        "access-control-request-method": method,
        "access-control-request-headers": request_headers,
    })  # fmt: skip


def tokens(value: str | None) -> set[str]:
    """The comma-separated items of a header, lower-cased."""
    return {item.strip().lower() for item in (value or "").split(",") if item.strip()}


def vary(headers: httpx.Headers) -> set[str]:
    return tokens(",".join(headers.get_list("vary")))


def cors_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower().startswith("access-control-")}


def assert_allowed(headers: httpx.Headers, origin: str) -> None:
    assert headers.get("access-control-allow-origin") == origin, cors_headers(headers)
    assert headers.get("access-control-allow-credentials") == "true", cors_headers(headers)
    assert "origin" in vary(headers), headers.get_list("vary")


def assert_no_cors(headers: httpx.Headers) -> None:
    assert cors_headers(headers) == {}


def assert_preflight_ok(response: httpx.Response) -> None:
    assert response.status_code == 204, (response.status_code, response.text)
    methods = {m.upper() for m in tokens(response.headers.get("access-control-allow-methods"))}
    assert {"GET", "POST"} <= methods, response.headers
    allowed = tokens(response.headers.get("access-control-allow-headers"))
    assert {"authorization", "last-event-id", "content-type"} <= allowed, response.headers
    max_age = response.headers.get("access-control-max-age", "")
    assert max_age.isdigit(), response.headers
    assert int(max_age) > 0


def serve(*flags: str) -> Iterator[httpx.Client]:
    gateway = GatewayProcess("--connect-rate", "0", *flags)
    try:
        gateway.start()
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            yield http
    finally:
        gateway.close()


@pytest.fixture(scope="module")
def listed() -> Iterator[httpx.Client]:
    """A token-mode gateway that allows two origins."""
    yield from serve("--jwt-secret", SECRET, "--cors-origin", APP, "--cors-origin", OTHER)


@pytest.fixture(scope="module")
def wildcard() -> Iterator[httpx.Client]:
    yield from serve("--cors-origin", "*")


@pytest.fixture(scope="module")
def no_cors() -> Iterator[httpx.Client]:
    yield from serve()


# -- listed origins -----------------------------------------------------------------------------


@pytest.mark.parametrize("origin", [APP, OTHER])
@pytest.mark.parametrize("auth", ["header", "cookie", "query"])
def test_a_listed_origin_reads_a_stream_with_credentialed_cors_headers(
    listed: httpx.Client, origin: str, auth: str
) -> None:
    headers = {"origin": origin}
    query = "topic=room:1"
    if auth == "header":
        headers["authorization"] = f"Bearer {READER}"
    elif auth == "cookie":
        headers["cookie"] = f"sse_token={READER}"
    else:
        query += f"&token={READER}"
    reply = get_events(listed, query, headers)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert_allowed(reply.headers, origin)


@pytest.mark.parametrize(
    ("query", "token", "status", "error"),
    [
        ("topic=bad%20topic", READER, 400, "invalid_topic"),
        ("since=1", READER, 400, "missing_topic"),
        ("topic=room:1", None, 401, "token_required"),
        ("topic=room:1", "forged.token.value", 401, "invalid_token"),
        ("topic=secret:1", READER, 403, "forbidden_topic"),
    ],
    ids=["bad-topic", "no-topic", "no-token", "bad-token", "forbidden-topic"],
)
def test_stream_refusals_to_a_listed_origin_carry_the_cors_headers(
    listed: httpx.Client, query: str, token: str | None, status: int, error: str
) -> None:
    headers = {"origin": APP}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    reply = get_events(listed, query, headers)
    assert (reply.status, reply.error) == (status, error), reply.body
    assert_allowed(reply.headers, APP)


@pytest.mark.parametrize(("path", "method"), [("/events", "GET"), ("/publish", "POST")])
@pytest.mark.parametrize("origin", [APP, OTHER])
def test_a_preflight_from_a_listed_origin_is_a_204_naming_methods_and_headers(
    listed: httpx.Client, path: str, method: str, origin: str
) -> None:
    response = preflight(listed, path, origin, method, "authorization, last-event-id")
    assert_preflight_ok(response)
    assert_allowed(response.headers, origin)


def test_healthz_and_publish_answers_to_a_listed_origin_carry_the_cors_headers(
    listed: httpx.Client,
) -> None:
    health = listed.get("/healthz", headers={"origin": APP})
    assert health.status_code == 200
    assert_allowed(health.headers, APP)

    body = {"topic": "room:1", "data": "hello"}
    published = listed.post("/publish", json=body, headers={
        "origin": OTHER, "authorization": f"Bearer {WRITER}",
    })  # fmt: skip
    assert published.status_code == 200, published.text
    assert "id" in published.json()
    assert_allowed(published.headers, OTHER)

    unauthenticated = listed.post("/publish", json=body, headers={"origin": APP})
    assert unauthenticated.status_code == 401
    assert_allowed(unauthenticated.headers, APP)

    forbidden = listed.post("/publish", json={"topic": "secret:1", "data": 1}, headers={
        "origin": APP, "authorization": f"Bearer {WRITER}",
    })  # fmt: skip
    assert forbidden.status_code == 403
    assert_allowed(forbidden.headers, APP)


# -- other origins ------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", NOT_ALLOWED)
def test_an_unlisted_origin_gets_no_cors_headers_anywhere(
    listed: httpx.Client, origin: str
) -> None:
    stream = get_events(listed, "topic=room:1", {
        "origin": origin, "authorization": f"Bearer {READER}",
    })  # fmt: skip
    assert_no_cors(stream.headers)
    assert_no_cors(get_events(listed, "topic=room:1", {"origin": origin}).headers)
    assert_no_cors(get_events(listed, "topic=bad%20topic", {"origin": origin}).headers)
    assert_no_cors(listed.get("/healthz", headers={"origin": origin}).headers)
    assert_no_cors(listed.post("/publish", json={"topic": "room:1", "data": 1}, headers={
        "origin": origin, "authorization": f"Bearer {WRITER}",
    }).headers)  # fmt: skip


@pytest.mark.parametrize("origin", NOT_ALLOWED)
@pytest.mark.parametrize(("path", "method"), [("/events", "GET"), ("/publish", "POST")])
def test_a_preflight_from_an_unlisted_origin_is_a_403(
    listed: httpx.Client, origin: str, path: str, method: str
) -> None:
    response = preflight(listed, path, origin, method, "authorization, last-event-id")
    assert response.status_code == 403, (response.status_code, response.text)
    assert response.json()["error"] == "origin_not_allowed"
    assert_no_cors(response.headers)


# -- any origin, and none -----------------------------------------------------------------------


@pytest.mark.parametrize("origin", [APP, EVIL, "null"])
def test_the_wildcard_allows_any_origin_without_credentials(
    wildcard: httpx.Client, origin: str
) -> None:
    def assert_star(headers: httpx.Headers) -> None:
        assert headers.get("access-control-allow-origin") == "*", cors_headers(headers)
        assert "access-control-allow-credentials" not in headers, cors_headers(headers)

    stream = get_events(wildcard, "topic=room:1", {"origin": origin})
    assert stream.status == 200, stream.body
    assert_star(stream.headers)

    refused = get_events(wildcard, "topic=bad%20topic", {"origin": origin})
    assert (refused.status, refused.error) == (400, "invalid_topic")
    assert_star(refused.headers)

    assert_star(wildcard.get("/healthz", headers={"origin": origin}).headers)

    for path, method in (("/events", "GET"), ("/publish", "POST")):
        response = preflight(wildcard, path, origin, method, "authorization, last-event-id")
        assert_preflight_ok(response)
        assert_star(response.headers)


def test_without_cors_origin_there_are_no_cors_headers(no_cors: httpx.Client) -> None:
    stream = get_events(no_cors, "topic=room:1", {"origin": APP})
    assert stream.status == 200, stream.body
    assert_no_cors(stream.headers)
    assert_no_cors(get_events(no_cors, "topic=bad%20topic", {"origin": APP}).headers)
    assert_no_cors(no_cors.get("/healthz", headers={"origin": APP}).headers)
    published = no_cors.post("/publish", json={"topic": "room:1", "data": 1},
                             headers={"origin": APP})  # fmt: skip
    # issue 10 E: an origin that is neither the gateway's own nor listed may not publish
    assert published.status_code == 403
    assert published.json()["error"] == "origin_not_allowed"
    assert_no_cors(published.headers)
    for path, method in (("/events", "GET"), ("/publish", "POST")):
        response = preflight(no_cors, path, APP, method, "authorization, last-event-id")
        assert_no_cors(response.headers)
