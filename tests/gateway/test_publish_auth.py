"""``POST /publish`` in token mode (acceptance 6).

With ``--jwt-secret`` configured, publishing needs ``Authorization: Bearer <token>`` whose
``sse.publish`` patterns cover every topic of the event. A token in ``?token=`` or in a cookie
does not count for publishing (CSRF and log safety). The HTTP publisher (``Publisher.from_url``
with an ``http://`` URL and a token) round-trips events to a subscriber on either engine, and
raises ``PublishError`` naming the status when the gateway refuses.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest

from publisher import AsyncPublisher, Publisher, PublishError
from publisher.protocol import id_key
from tests.conftest import GatewayFactory
from tests.support.gateway import GatewayProcess
from tests.support.sse import SSEStream

SECRET = "acceptance-6-publish-secret-0123456789abcdef"
OTHER_SECRET = "not-the-gateway-secret-0123456789abcdef"
ID_RE = re.compile(r"[0-9]+-[0-9]+")
REALM = 'Bearer realm="sse-gateway"'
INVALID_TOKEN_CHALLENGE = 'Bearer realm="sse-gateway", error="invalid_token"'


def mint(
    sub: str | None = "writer",
    *,
    subscribe: Sequence[str] | None = None,
    publish: Sequence[str] | None = None,
    ttl: float = 3600,
    secret: str = SECRET,
    **claims: Any,
) -> str:
    """An HS256 token; ``sse`` carries only the rights given (no rights: no ``sse`` claim)."""
    body: dict[str, Any] = {"exp": int(time.time() + ttl), **claims}
    if sub is not None:
        body["sub"] = sub
    rights: dict[str, list[str]] = {}
    if subscribe is not None:
        rights["subscribe"] = list(subscribe)
    if publish is not None:
        rights["publish"] = list(publish)
    if rights:
        body["sse"] = rights
    return jwt.encode(body, secret, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def assert_json_error(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict), body
    assert body.get("error") == error, body
    assert isinstance(body.get("message"), str), body
    assert body["message"], body
    assert "Traceback" not in response.text
    return body


def assert_valid_id(event_id: object) -> str:
    """``<ms>-<seq>`` whose milliseconds are the current time."""
    assert isinstance(event_id, str), event_id
    assert ID_RE.fullmatch(event_id), event_id
    ms = int(event_id.split("-")[0])
    assert abs(ms - time.time() * 1000) < 60_000, event_id
    return event_id


@dataclass
class Secured:
    """A token-mode gateway (``--jwt-secret``) on one engine, and a client for it."""

    engine: str
    gateway: GatewayProcess
    http: httpx.Client

    @property
    def url(self) -> str:
        return self.gateway.url

    def published(self) -> float:
        return self.gateway.metric("sse_events_published_total")


@pytest.fixture(scope="module", params=["redis", "memory"])
def secured(request: pytest.FixtureRequest) -> Iterator[Secured]:
    """One token-mode gateway per engine, shared by the tests that leave no state behind."""
    args = ["--jwt-secret", SECRET]
    redis_url = None
    if request.param == "redis":
        redis_url = request.getfixturevalue("redis_url")
        args += ["--prefix", "t" + uuid.uuid4().hex[:10]]
    gateway = GatewayProcess(*args, redis_url=redis_url)
    try:
        gateway.start()
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            yield Secured(request.param, gateway, client)
    finally:
        gateway.close()


def post(secured: Secured, body: Any, token: str | None = None, **options: Any) -> httpx.Response:
    headers = bearer(token) if token is not None else {}
    if isinstance(body, bytes):
        return secured.http.post("/publish", content=body, headers=headers, **options)
    return secured.http.post("/publish", json=body, headers=headers, **options)


WRITER = mint(publish=["jobs:*"])
EVERYTHING = mint("admin", publish=["*"])


# -- who may publish ----------------------------------------------------------------------------


def test_without_a_token_publish_is_a_401_token_required_with_a_bearer_challenge(
    secured: Secured,
) -> None:
    before = secured.published()
    response = post(secured, {"topic": "jobs:1", "data": 1})
    assert_json_error(response, 401, "token_required")
    assert response.headers["www-authenticate"] == REALM
    assert secured.published() == before


BAD_TOKENS: list[tuple[str, str]] = [
    ("garbage", "not-a-jwt"),
    ("three garbage parts", "aaa.bbb.ccc"),
    ("wrong secret", mint(publish=["*"], secret=OTHER_SECRET)),
    ("expired beyond the leeway", mint(publish=["*"], ttl=-3600)),
    ("no sub", mint(None, publish=["*"])),
    ("publish claim of the wrong type", jwt.encode(
        {"sub": "w", "exp": int(time.time() + 600), "sse": {"publish": "jobs:*"}},
        SECRET, algorithm="HS256",
    )),
    ("alg none", jwt.encode(
        {"sub": "w", "exp": int(time.time() + 600), "sse": {"publish": ["*"]}},
        "", algorithm="none",  # PyJWT takes "" as no key
    )),
    ("oversized (> 8192 bytes)", mint(publish=["*"], padding="x" * 9000)),
]  # fmt: skip


@pytest.mark.parametrize("token", [t for _, t in BAD_TOKENS], ids=[n for n, _ in BAD_TOKENS])
def test_a_bad_token_is_a_401_invalid_token(secured: Secured, token: str) -> None:
    before = secured.published()
    response = post(secured, {"topic": "jobs:1", "data": 1}, token)
    assert_json_error(response, 401, "invalid_token")
    assert response.headers["www-authenticate"] == INVALID_TOKEN_CHALLENGE
    assert token not in response.text
    assert secured.published() == before


@pytest.mark.parametrize(
    ("topics", "first_refused"),
    [
        (["orders:1"], "orders:1"),
        (["jobs:1", "orders:1"], "orders:1"),
        (["jobs:1", "orders:1", "jobs:2", "users:9"], "orders:1"),
        (["jobs"], "jobs"),
        (["jobsx:1"], "jobsx:1"),
    ],
    ids=["outside", "second-of-two", "first-of-two-refused", "prefix-without-colon", "lookalike"],
)
def test_a_topic_outside_sse_publish_is_a_403_naming_it(
    secured: Secured, topics: list[str], first_refused: str
) -> None:
    before = secured.published()
    response = post(secured, {"topics": topics, "data": 1}, WRITER)
    body = assert_json_error(response, 403, "forbidden_topic")
    assert body["topic"] == first_refused
    assert secured.published() == before


@pytest.mark.parametrize("topic", ["room:1", "room:a/b", "room:"])
def test_a_pattern_grants_any_run_of_characters_after_its_prefix(
    secured: Secured, topic: str
) -> None:
    response = post(secured, {"topic": topic, "data": 1}, mint(publish=["room:*"]))
    assert response.status_code == 200, response.text
    assert_valid_id(response.json()["id"])


@pytest.mark.parametrize(
    "token",
    [
        mint("reader", subscribe=["*"]),
        mint("reader", subscribe=["jobs:*"], publish=[]),
        mint("nobody"),
    ],
    ids=["subscribe-only", "empty-publish-list", "no-sse-claim"],
)
def test_a_token_without_publish_rights_cannot_publish(secured: Secured, token: str) -> None:
    before = secured.published()
    body = assert_json_error(post(secured, {"topic": "jobs:1", "data": 1}, token), 403,
                             "forbidden_topic")  # fmt: skip
    assert body["topic"] == "jobs:1"
    assert secured.published() == before


def test_a_token_in_the_query_or_a_cookie_is_not_accepted_for_publish(secured: Secured) -> None:
    before = secured.published()
    body = {"topic": "jobs:1", "data": 1}
    in_query = secured.http.post("/publish", params={"token": WRITER}, json=body)
    assert_json_error(in_query, 401, "token_required")
    assert in_query.headers["www-authenticate"] == REALM

    in_cookie = secured.http.post("/publish", headers={"cookie": f"sse_token={WRITER}"}, json=body)
    assert_json_error(in_cookie, 401, "token_required")
    assert secured.published() == before

    # the same token in the Authorization header is accepted
    assert post(secured, body, WRITER).status_code == 200


# -- what may be published ----------------------------------------------------------------------


def test_an_authorised_publish_is_a_200_with_a_fresh_id(secured: Secured) -> None:
    before = secured.published()
    ids = []
    for data in ({"n": 1}, "two", None):
        response = post(secured, {"topic": "jobs:ok", "data": data}, WRITER)
        assert response.status_code == 200, response.text
        reply = response.json()
        assert set(reply) == {"id"}
        ids.append(assert_valid_id(reply["id"]))
    assert [id_key(i) for i in ids] == sorted({id_key(i) for i in ids})
    multi = post(secured, {"topics": ["jobs:a", "jobs:b"], "event": "done", "data": 1}, WRITER)
    assert multi.status_code == 200, multi.text
    assert id_key(assert_valid_id(multi.json()["id"])) > id_key(ids[-1])
    assert secured.published() == before + 4


def test_a_body_over_the_default_64_kib_is_a_413(secured: Secured) -> None:
    big = {"topic": "jobs:big", "data": "x" * (64 * 1024)}
    assert_json_error(post(secured, big, EVERYTHING), 413, "body_too_large")
    under = {"topic": "jobs:big", "data": "x" * (60 * 1024)}
    assert post(secured, under, EVERYTHING).status_code == 200


def test_malformed_json_is_a_400(secured: Secured) -> None:
    assert_json_error(post(secured, b'{"topic": "jobs:1", "data": ', EVERYTHING), 400,
                      "invalid_json")  # fmt: skip


@pytest.mark.parametrize(
    "topic",
    ["jobs:a\r\nb", "jobs:a\nb", "jobs:a\rb", "j" * 257, ""],
    ids=["crlf", "lf", "cr", "257-chars", "empty"],
)
def test_a_bad_topic_is_a_400_invalid_topic_naming_the_field(secured: Secured, topic: str) -> None:
    for body in ({"topic": topic, "data": 1}, {"topics": ["jobs:ok", topic], "data": 1}):
        reply = assert_json_error(post(secured, body, EVERYTHING), 400, "invalid_topic")
        assert reply.get("field") in ("topic", "topics"), reply


def test_more_topics_than_the_default_64_is_a_400_too_many_topics(secured: Secured) -> None:
    topics = [f"jobs:{n}" for n in range(65)]
    before = secured.published()
    assert_json_error(post(secured, {"topics": topics, "data": 1}, EVERYTHING), 400,
                      "too_many_topics")  # fmt: skip
    assert secured.published() == before
    assert post(secured, {"topics": topics[:64], "data": 1}, EVERYTHING).status_code == 200


def test_custom_body_and_topic_limits(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory("--jwt-secret", SECRET, "--max-publish-bytes", "1024",
                              "--max-topics", "2")  # fmt: skip
    with httpx.Client(base_url=gateway.url, timeout=10, headers=bearer(EVERYTHING)) as http:
        too_big = http.post("/publish", json={"topic": "a", "data": "x" * 1100})
        assert_json_error(too_big, 413, "body_too_large")
        assert http.post("/publish", json={"topic": "a", "data": "x" * 900}).status_code == 200

        three = http.post("/publish", json={"topics": ["a", "b", "c"], "data": 1})
        assert_json_error(three, 400, "too_many_topics")
        assert http.post("/publish", json={"topics": ["a", "b"], "data": 1}).status_code == 200


# -- the HTTP publisher -------------------------------------------------------------------------


def authorised_stream(base_url: str, topics: Sequence[str], token: str) -> SSEStream:
    stream = SSEStream(base_url, topics)
    stream.headers["authorization"] = f"Bearer {token}"
    return stream


async def read_until(
    stream: SSEStream, client: httpx.AsyncClient, scenario: Any
) -> list[tuple[str, str, str]]:
    """Subscribe ``stream``, run ``scenario()``, which returns the ids it published, and
    return the (id, event, data) the stream got."""
    task = asyncio.create_task(stream.read(client))
    try:
        await stream.until_subscribed()
        assert stream.status == 200
        ids: list[str] = await scenario()
        await stream.wait_for(lambda s: any(e.id == ids[-1] for e in s.events))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return [(e.id, e.event, e.data) for e in stream.events if e.event != "probe"]


def test_the_sync_http_publisher_round_trips_events_to_a_subscriber(secured: Secured) -> None:
    topic = f"jobs:{uuid.uuid4().hex[:8]}"
    reader = mint("reader", subscribe=["jobs:*"])

    async def run() -> tuple[list[tuple[str, str, str]], list[str]]:
        sent: list[str] = []
        with Publisher.from_url(secured.url, token=WRITER) as pub:

            async def scenario() -> list[str]:
                sent.append(await asyncio.to_thread(pub.publish, topic, {"n": 1}))
                sent.extend(await asyncio.to_thread(pub.publish_many, [
                    (topic, "second", "custom"), (topic, [3, "three"]),
                ]))  # fmt: skip
                return sent

            timeout = httpx.Timeout(10, read=None)
            async with httpx.AsyncClient(timeout=timeout) as client:
                stream = authorised_stream(secured.url, [topic], reader)
                received = await read_until(stream, client, scenario)
        return received, sent

    received, sent = asyncio.run(run())
    assert len(sent) == 3
    for event_id in sent:
        assert_valid_id(event_id)
    assert received == [
        (sent[0], "message", '{"n":1}'),
        (sent[1], "custom", "second"),
        (sent[2], "message", '[3,"three"]'),
    ]


def test_the_async_http_publisher_round_trips_events_to_a_subscriber(secured: Secured) -> None:
    topic = f"jobs:{uuid.uuid4().hex[:8]}"
    reader = mint("reader", subscribe=[topic])

    async def run() -> tuple[list[tuple[str, str, str]], list[str]]:
        sent: list[str] = []
        async with AsyncPublisher.from_url(secured.url, token=WRITER) as apub:

            async def scenario() -> list[str]:
                sent.append(await apub.publish(topic, "first", "async"))
                sent.extend(await apub.publish_many([(topic, {"n": 2}), (topic, "3", "x")]))
                return sent

            timeout = httpx.Timeout(10, read=None)
            async with httpx.AsyncClient(timeout=timeout) as client:
                stream = authorised_stream(secured.url, [topic], reader)
                received = await read_until(stream, client, scenario)
        return received, sent

    received, sent = asyncio.run(run())
    assert len(sent) == 3
    assert [id_key(assert_valid_id(i)) for i in sent] == sorted(id_key(i) for i in sent)
    assert received == [
        (sent[0], "async", "first"),
        (sent[1], "message", '{"n":2}'),
        (sent[2], "x", "3"),
    ]


def test_the_http_publisher_raises_publish_error_when_refused(secured: Secured) -> None:
    reader_only = mint("reader", subscribe=["*"])
    with (
        Publisher.from_url(secured.url, token=reader_only) as pub,
        pytest.raises(PublishError) as refused,
    ):
        pub.publish("jobs:refused", 1)
    assert refused.value.status == 403
    assert "403" in str(refused.value)
    assert "jobs:refused" in str(refused.value)

    with Publisher.from_url(secured.url) as anonymous, pytest.raises(PublishError) as no_token:
        anonymous.publish("jobs:1", 1)
    assert no_token.value.status == 401
    assert "401" in str(no_token.value)

    async def refused_async() -> PublishError:
        async with AsyncPublisher.from_url(secured.url, token=WRITER) as apub:
            with pytest.raises(PublishError) as raised:
                await apub.publish(["jobs:1", "secrets:1"], 1)
            return raised.value

    error = asyncio.run(refused_async())
    assert error.status == 403
    assert "403" in str(error)
    assert "secrets:1" in str(error)


# -- remote clients -----------------------------------------------------------------------------


def non_loopback_address() -> str | None:
    """An IPv4 address of this machine other than loopback, if it has one we can bind."""
    candidates: list[str] = []
    for target in ("10.255.255.255", "192.0.2.1"):  # a UDP connect only picks a route
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe, suppress(OSError):
            probe.connect((target, 9))
            candidates.append(probe.getsockname()[0])
    with suppress(OSError):
        infos = socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET)
        candidates += [str(info[4][0]) for info in infos]
    for address in candidates:
        if address.startswith("127.") or address == "0.0.0.0":
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((address, 0))
            except OSError:
                continue
        return str(address)
    return None


@pytest.fixture(scope="module")
def remote_address() -> str:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    return address


def remote_client(address: str, port: int) -> httpx.Client:
    """A client whose requests come from (and go to) ``address``: a non-loopback peer."""
    transport = httpx.HTTPTransport(local_address=address)
    return httpx.Client(base_url=f"http://{address}:{port}", transport=transport, timeout=10)


def test_anonymous_mode_still_accepts_publishes_from_loopback_only(
    gateway_factory: GatewayFactory, remote_address: str
) -> None:
    gateway = gateway_factory("--host", "0.0.0.0", "--allow-anonymous")
    body = {"topic": "jobs:1", "data": 1}
    with remote_client(remote_address, gateway.port) as remote:
        refused = remote.post("/publish", json=body)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == "forbidden"
    assert httpx.post(gateway.url + "/publish", json=body, timeout=10).status_code == 200


def test_token_mode_accepts_a_remote_publisher_with_a_publish_token(
    gateway_factory: GatewayFactory, remote_address: str
) -> None:
    gateway = gateway_factory("--host", "0.0.0.0", "--jwt-secret", SECRET)
    body = {"topic": "jobs:1", "data": 1}
    with remote_client(remote_address, gateway.port) as remote:
        assert_json_error(remote.post("/publish", json=body), 401, "token_required")
        accepted = remote.post("/publish", json=body, headers=bearer(WRITER))
        assert accepted.status_code == 200, accepted.text
        assert_valid_id(accepted.json()["id"])
