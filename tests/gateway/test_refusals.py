"""Issue 10 A: browsers are never stranded by a refusal.

A native ``EventSource`` that gets anything but a 200 ``text/event-stream`` fails for good.
So every temporary refusal of ``GET /events`` (node full, per-subject and per-address limits,
connect rates, draining, key server or engine unavailable) reaches a client that asked for
``text/event-stream`` as a finished 200 event stream: a jittered ``retry:``, a comment and
``event: refused`` naming the reason, no ``id:``. Clients that did not ask for an event stream
keep the status code (503/429 + ``Retry-After``) and JSON; permanent refusals (400, 401, 403)
stay JSON for everyone. Each refusal is counted by reason in ``/metrics``.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import httpx
import pytest

from gateway.config import Settings
from gateway.errors import HTTPError
from gateway.limits import PUBLIC_ADDRESS_RATE, PUBLIC_ADDRESS_STREAMS, Admission, is_public
from tests.conftest import GatewayFactory
from tests.support import redis_server
from tests.support.gateway import GatewayProcess
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.refusals import EVENT_STREAM, Refusal, refusal_of
from tests.support.tokens import SECRET, assert_error, claims, hs256, rsa_key, sign
from tests.support.waiting import wait_until

TIMEOUT = httpx.Timeout(10, read=None)


def refused(http: httpx.Client, query: str = "topic=t", **headers: str) -> Refusal:
    """``GET /events`` as an EventSource sends it; the answer must be a refusal."""
    with http.stream("GET", "/events?" + query, headers={**EVENT_STREAM, **headers}) as response:
        assert response.headers.get("connection") == "close", response.headers
        return refusal_of(response)


def plain(http: httpx.Client, query: str = "topic=t", **headers: str) -> httpx.Response:
    """``GET /events`` from a client that did not ask for an event stream (curl, an API)."""
    with http.stream("GET", "/events?" + query, headers=headers) as response:
        response.read()
    return response


@contextlib.contextmanager
def held(http: httpx.Client, query: str = "topic=t", **headers: str) -> Iterator[None]:
    """An accepted stream, open until the block ends."""
    with http.stream("GET", "/events?" + query, headers={**EVENT_STREAM, **headers}) as response:
        assert response.status_code == 200, response.read()
        chunks = response.iter_raw()  # kept: a dropped iterator would close the stream
        head = b""
        while b"\n\n" not in head:
            head += next(chunks)
        # a refusal is a 200 that starts with ``retry:`` too: only the preamble says "ok"
        assert head.startswith(b"retry: "), head
        assert b"\n: ok\n" in head, head
        yield


def open_streams(http: httpx.Client) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("sse_connections "):
            return float(line.split()[1])
    raise AssertionError("no sse_connections gauge")


def wait_open_streams(http: httpx.Client, most: float) -> None:
    """Returns once the node counts at most ``most`` open streams (a stream the client closed
    is open for the node until it reads the close)."""
    wait_until(lambda: open_streams(http) <= most, "the node to see the stream close", 5, 0.01)


def assert_accepted(http: httpx.Client, query: str = "topic=t", **headers: str) -> None:
    """Accepted; returns once the node has seen the stream close again."""
    before = open_streams(http)
    with held(http, query, **headers):
        pass
    wait_open_streams(http, before)


def metric(gateway: GatewayProcess, name: str, **labels: str) -> float:
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    return gateway.metric(f"{name}{{{selector}}}" if selector else name)


def test_a_full_node_gives_an_event_stream_client_a_jittered_retried_refusal(
    gateway_factory: GatewayFactory,
) -> None:
    """Issue 10 A: node full (``too_many_connections``): 200 + ``retry:`` + ``event: refused``
    for EventSource, 503 JSON + Retry-After for a plain client; counted by reason."""
    origin = "https://app.example"
    gateway = gateway_factory(
        "--max-connections", "1", "--retry-ms", "1000", "--cors-origin", origin
    )
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT) as http:
        with held(http):
            refusals = [refused(http) for _ in range(5)]
            with http.stream("GET", "/events?topic=t", headers={**EVENT_STREAM, "origin": origin}
                             ) as response:  # fmt: skip
                # a page of another origin can read it (else the browser fails it for good)
                assert response.headers["access-control-allow-origin"] == origin
                refusals.append(refusal_of(response))
            for refusal in refusals:
                assert refusal.reason == "too_many_connections", refusal
                assert 500 <= refusal.retry_ms < 1500, refusal
            assert len({r.retry_ms for r in refusals}) > 1, "the retry delay is not jittered"

            response = plain(http)
            assert_error(response, 503, "too_many_connections")
            assert response.headers["retry-after"].isdigit()

            head = http.head("/events?topic=t", headers=EVENT_STREAM)
            assert head.status_code == 503, head

        wait_open_streams(http, 0)
        assert_accepted(http)  # the slot is free again

        refused_total = metric(gateway, "sse_streams_refused_total", reason="too_many_connections")
        assert refused_total == 8
        assert metric(gateway, "sse_requests_rejected_total", status="503") == 2


def test_subject_limits_are_retried_refusals(gateway_factory: GatewayFactory) -> None:
    """Issue 10 A: the per-subject cap and the per-subject connect rate."""
    gateway = gateway_factory(
        "--jwt-secret", SECRET, "--max-connections-per-subject", "1", "--connect-rate", "1",
        "--retry-ms", "200",
    )  # fmt: skip
    alice = {"authorization": "Bearer " + hs256(sub="alice", subscribe=["t"])}
    bob = {"authorization": "Bearer " + hs256(sub="bob", subscribe=["t"])}
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT) as http:
        with held(http, **alice):
            assert refused(http, **alice).reason == "too_many_subject_connections"
            assert_error(plain(http, **alice), 429, "too_many_subject_connections")

        assert_accepted(http, **bob)
        assert_accepted(http, **bob)  # a burst of twice the rate
        limited = refused(http, **bob)
        assert limited.reason == "rate_limited", limited
        # at least as long as the limiter asks (Retry-After, whole seconds), jittered
        assert 500 <= limited.retry_ms < 1500, limited
        assert_error(plain(http, **bob), 429, "rate_limited")

    assert metric(gateway, "sse_streams_refused_total", reason="rate_limited") == 2
    assert metric(gateway, "sse_streams_refused_total", reason="too_many_subject_connections") == 2
    assert metric(gateway, "sse_requests_rejected_total", status="429") == 2


def test_per_address_limits_key_on_the_address_a_trusted_proxy_forwards(
    gateway_factory: GatewayFactory,
) -> None:
    """Issue 10 A and E: ``--max-connections-per-address`` (new) and
    ``--connect-rate-per-address`` count the client's address, which behind a trusted proxy
    (``FORWARDED_ALLOW_IPS``, default 127.0.0.1) is its ``X-Forwarded-For``."""
    gateway = gateway_factory(
        "--max-connections-per-address", "1", "--connect-rate-per-address", "1",
        "--retry-ms", "200",
    )  # fmt: skip
    one = {"x-forwarded-for": "203.0.113.7"}
    other = {"x-forwarded-for": "203.0.113.8"}
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT) as http:
        with held(http, **one):
            assert refused(http, **one).reason == "too_many_address_connections"
            assert_error(plain(http, **one), 429, "too_many_address_connections")
            assert_accepted(http, **other)
        assert_accepted(http, **other)  # the second of its burst of 2
        assert refused(http, **other).reason == "rate_limited"
        assert_error(plain(http, **other), 429, "rate_limited")
    reason = "too_many_address_connections"
    assert metric(gateway, "sse_streams_refused_total", reason=reason) == 2


def test_the_per_address_cap_counts_an_ipv6_client_by_its_64() -> None:
    """Issue 10 E: one host cannot take every slot by changing address within its /64."""
    admission = Admission(Settings(max_connections_per_address=1))
    first, same_64, other_64 = "2001:db8:1:2::1", "2001:db8:1:2:ffff::2", "2001:db8:1:3::1"
    admission.check_address(first)
    admission.opened(None, first)
    with pytest.raises(HTTPError) as refusal:
        admission.check_address(same_64)
    assert (refusal.value.status, refusal.value.error) == (429, "too_many_address_connections")
    admission.check_address(other_64)
    admission.check_address("::ffff:192.0.2.1")  # an IPv4 client seen through IPv6
    admission.closed(None, first)
    admission.check_address(same_64)
    assert admission.by_address_open == {}


def test_by_default_one_address_is_not_limited_as_a_balancer_may_be_every_client(
    gateway_factory: GatewayFactory,
) -> None:
    """Issue 10 A: a reconnect wave through one balancer address is not refused by the
    default limits (per-address limits are off by default; the subject rate stays on)."""
    gateway = gateway_factory()
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT) as http:
        statuses: list[int] = []
        for _ in range(120):
            with http.stream("GET", "/events?topic=t", headers=EVENT_STREAM) as response:
                statuses.append(response.status_code)
                first = next(response.iter_raw())
                assert b"event: refused" not in first, first
    assert statuses == [200] * 120
    assert metric(gateway, "sse_streams_refused_total") == 0


def test_by_default_a_public_address_cannot_fill_a_node_but_a_balancer_s_can(
    gateway_factory: GatewayFactory,
) -> None:
    """Issue 10 E: one address could take every stream slot of a node reachable without a
    proxy. With no per-address option set, a public address gets a built-in cap and connect
    rate; a balancer's private or loopback address (one address, many clients) gets neither."""
    gateway = gateway_factory()
    public = {"x-forwarded-for": "8.8.8.8"}
    balancer = {"x-forwarded-for": "10.1.2.3"}
    burst = int(2 * PUBLIC_ADDRESS_RATE)
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT) as http:
        for _ in range(burst + 20):
            assert http.head("/events?topic=t", headers=balancer).status_code == 200
        accepted = 0  # the burst, plus what refills while these requests run
        while (answer := http.head("/events?topic=t", headers=public)).status_code == 200:
            accepted += 1
            assert accepted < 10 * burst, "a public address was never paced"
        assert accepted >= burst
        assert answer.status_code == 429
        assert int(answer.headers["retry-after"]) >= 1
    assert metric(gateway, "sse_streams_refused_total", reason="rate_limited") == 1


def test_the_built_in_cap_counts_public_addresses_only() -> None:
    """Issue 10 E: the built-in open-stream cap (no per-address option set) holds a public
    address at :data:`PUBLIC_ADDRESS_STREAMS` and never counts a private one."""
    admission = Admission(Settings())
    for address in ("203.0.113.5", "8.8.4.4", "10.0.0.1", "::ffff:8.8.4.4"):
        assert is_public(address) == (address.endswith("8.8.4.4")), address
    admission.by_address = None  # the cap alone, not the connect rate
    for _ in range(PUBLIC_ADDRESS_STREAMS):
        admission.check_address("8.8.4.4")
        admission.opened(None, "8.8.4.4")
        admission.check_address("10.0.0.1")
        admission.opened(None, "10.0.0.1")
    with pytest.raises(HTTPError) as refusal:
        admission.check_address("::ffff:8.8.4.4")
    assert (refusal.value.status, refusal.value.error) == (429, "too_many_address_connections")
    admission.check_address("10.0.0.1")
    assert admission.by_address_open == {"8.8.4.4": PUBLIC_ADDRESS_STREAMS}
    admission.closed(None, "8.8.4.4")
    admission.check_address("8.8.4.4")


def test_a_draining_node_gives_event_stream_clients_a_retried_refusal(
    gateway_factory: GatewayFactory,
) -> None:
    """Issue 10 A: a draining node still listens (a balancer may not know yet) and answers a
    browser with ``draining`` in a retried refusal, an API client with 503 JSON."""
    gateway = gateway_factory("--drain-seconds", "3", "--retry-ms", "400")
    assert gateway.process is not None
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT) as http, held(http):
        gateway.process.send_signal(signal.SIGTERM)
        wait_until(lambda: http.get("/readyz").status_code != 200, "/readyz not 200", 2, 0.02)
        refusal = refused(http)
        assert refusal.reason == "draining", refusal
        assert 200 <= refusal.retry_ms < 600, refusal
        assert_error(plain(http), 503, "draining")
        assert metric(gateway, "sse_streams_refused_total", reason="draining") == 2
    assert gateway.process.wait(10) in (0, -signal.SIGTERM)


def test_an_unreachable_key_server_is_a_retried_refusal(gateway_factory: GatewayFactory) -> None:
    """Issue 10 A: no key to verify the token with (the JWKS cannot be read): a retried
    ``auth_unavailable`` refusal, a 503 for plain clients."""
    jwks = f"http://127.0.0.1:{free_port()}/jwks.json"
    gateway = gateway_factory("--jwks-url", jwks, "--jwks-timeout", "1")
    token = sign(claims(subscribe=["t"]), rsa_key(), "RS256", headers={"kid": "k1"})
    bearer = {"authorization": "Bearer " + token}
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT) as http:
        assert refused(http, **bearer).reason == "auth_unavailable"
        assert_error(plain(http, **bearer), 503, "auth_unavailable")


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, to stop under a node."""
    with redis_server.own_redis() as server:
        yield server


def test_an_unreachable_engine_ends_the_stream_with_the_same_refusal(
    gateway_factory: GatewayFactory, own_redis: RedisServer
) -> None:
    """Issue 10 A: the engine is found unreachable after the stream started (subscribing):
    the stream ends with the same ``refused`` event, without an id, and is counted."""
    gateway = gateway_factory("--subscribe-timeout", "1", redis_url=own_redis.url)
    own_redis.stop()
    with (
        httpx.Client(base_url=gateway.url, timeout=TIMEOUT) as http,
        http.stream("GET", "/events?topic=fresh", headers=EVENT_STREAM) as response,
    ):
        refusal = refusal_of(response)
    assert refusal.reason == "engine_unavailable", refusal
    # ``: ok`` says "subscribed to every topic": a stream whose subscribe failed never gets it
    assert "ok" not in refusal.comments
    assert metric(gateway, "sse_streams_refused_total", reason="engine_unavailable") == 1


def test_permanent_refusals_stay_json_for_event_stream_clients(
    gateway_factory: GatewayFactory,
) -> None:
    """Issue 10 A: 400, 401 and 403 are permanent: a browser must not retry them."""
    gateway = gateway_factory("--jwt-secret", SECRET)
    alice = {"authorization": "Bearer " + hs256(sub="alice", subscribe=["user:alice"])}
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT) as http:
        assert_error(plain(http, "topic=bad%20topic", **EVENT_STREAM, **alice), 400,
                     "invalid_topic")  # fmt: skip
        assert_error(plain(http, "topic=user:alice", **EVENT_STREAM), 401, "token_required")
        assert_error(plain(http, "topic=user:bob", **EVENT_STREAM, **alice), 403,
                     "forbidden_topic")  # fmt: skip
    assert metric(gateway, "sse_streams_refused_total") == 0
