"""Limits (acceptance 8): each limit refuses with its status (and ``Retry-After`` where the
client should come back later), and the node keeps serving its other clients meanwhile.

| limit                              | refusal                                               |
|------------------------------------|-------------------------------------------------------|
| ``--max-connections``              | 503 ``too_many_connections`` + Retry-After             |
| ``--max-connections-per-subject``  | 429 ``too_many_subject_connections`` + Retry-After     |
| ``--connect-rate`` (address, sub)  | 429 ``rate_limited`` + Retry-After (integer >= 1)     |
| ``--max-topics``                   | 400 ``too_many_topics``                               |
| topic rules (1-256 of A-Za-z0-9_.:/@-) | 400 ``invalid_topic``                             |
| ``--max-query-bytes``              | 414 ``query_too_long``                                |
| ``--max-header-bytes``             | 431 ``headers_too_large``                             |
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import orjson
import pytest

from publisher import Publisher
from tests.conftest import GatewayFactory
from tests.support.gateway import GatewayProcess
from tests.support.sse import SSEStream
from tests.support.waiting import wait_until_async

SECRET = "acceptance-8-limits-secret-0123456789abcdef"
STREAM_TIMEOUT = httpx.Timeout(10, read=None)


def mint(sub: str, subscribe: Sequence[str] = (), publish: Sequence[str] = ()) -> str:
    claims = {
        "sub": sub,
        "exp": int(time.time() + 3600),
        "sse": {"subscribe": list(subscribe), "publish": list(publish)},
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@dataclass
class Outcome:
    """How the gateway answered one ``GET /events``."""

    status: int
    headers: httpx.Headers
    body: Any = None

    @property
    def error(self) -> Any:
        return self.body.get("error") if isinstance(self.body, dict) else None

    def retry_after(self) -> int:
        value = self.headers.get("retry-after", "")
        assert value.isdigit(), (self.status, self.body, dict(self.headers))
        return int(value)


def _outcome(status: int, headers: httpx.Headers, raw: bytes) -> Outcome:
    try:
        body: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = raw.decode("utf-8", "replace")
    return Outcome(status, headers, body)


async def attempt(
    http: httpx.AsyncClient, base_url: str, query: str, headers: dict[str, str] | None = None
) -> Outcome:
    """One connect: a 200 stream is closed as soon as its headers arrive."""
    async with http.stream("GET", f"{base_url}/events?{query}", headers=headers) as response:
        if response.status_code == 200:
            return Outcome(200, response.headers)
        return _outcome(response.status_code, response.headers, await response.aread())


def get_events(http: httpx.Client, query: str, headers: dict[str, str] | None = None) -> Outcome:
    """The same, blocking."""
    with http.stream("GET", "/events?" + query, headers=headers) as response:
        if response.status_code == 200:
            return Outcome(200, response.headers)
        return _outcome(response.status_code, response.headers, response.read())


def from_address(address: str, timeout: httpx.Timeout | float = 10) -> httpx.AsyncClient:
    """A client whose connections come from ``address`` (any 127.x.y.z is loopback on Linux)."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(transport=transport, timeout=timeout)


def topics_query(*topics: str) -> str:
    return urllib.parse.urlencode([("topic", t) for t in topics])


async def open_held(
    http: httpx.AsyncClient, base_url: str, topics: Sequence[str], token: str | None = None
) -> tuple[SSEStream, asyncio.Task[None]]:
    """A stream kept open (until its task is cancelled); returns once its headers arrived."""
    stream = SSEStream(base_url, topics)
    if token is not None:
        stream.headers.update(bearer(token))
    task = asyncio.create_task(stream.read(http))
    await stream.wait_for(lambda s: s.status is not None or s.closed_by_server)
    assert stream.status == 200, stream.status
    return stream, task


async def cancel(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def accepted_again(
    connect: Callable[[], Awaitable[Outcome]], refusal: tuple[int, str], timeout: float = 10
) -> None:
    """Retry ``connect()`` until it is accepted; every answer until then is ``refusal``."""

    async def accepted() -> bool:
        outcome = await connect()
        if outcome.status == 200:
            return True
        assert (outcome.status, outcome.error) == refusal, outcome.body
        return False

    await wait_until_async(accepted, "the freed slot to be given to a new client", timeout)


def has_event(name: str) -> Callable[[SSEStream], bool]:
    return lambda stream: any(e.event == name for e in stream.events)


async def still_delivering(
    streams: Sequence[SSEStream], publish: Callable[..., str], topic: str, label: str
) -> None:
    """Every open stream still receives what is published: once it is subscribed (``: ok``),
    one event of its own name, published once, reaches it."""
    for n, stream in enumerate(streams):
        await stream.until_subscribed()
        await asyncio.to_thread(publish, [topic], f"{label}-{n}", f"{label}-{n}")
        await stream.wait_for(has_event(f"{label}-{n}"))


# -- connection limits --------------------------------------------------------------------------


def test_max_connections_refuses_the_next_stream_with_503_and_frees_slots(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory("--max-connections", "3", "--connect-rate", "0")
    url = gateway.url

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=STREAM_TIMEOUT) as http:
            held = [await open_held(http, url, ["t"]) for _ in range(3)]
            try:
                for _ in range(3):
                    refused = await attempt(http, url, "topic=t")
                    assert (refused.status, refused.error) == (503, "too_many_connections")
                    assert refused.retry_after() >= 0

                health = await http.get(url + "/healthz")
                assert health.status_code == 200

                with Publisher.from_url(url) as pub:
                    await still_delivering([s for s, _ in held], pub.publish, "t", "alive")

                await cancel(held[0][1])
                await accepted_again(lambda: attempt(http, url, "topic=t"),
                                     (503, "too_many_connections"))  # fmt: skip
            finally:
                await cancel(*(task for _, task in held))

    asyncio.run(scenario())


def test_max_connections_per_subject_refuses_that_subject_only_with_429(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(
        "--jwt-secret", SECRET, "--max-connections-per-subject", "2", "--connect-rate", "0"
    )
    url = gateway.url
    alice = mint("alice", subscribe=["room:*"])
    alice_again = mint("alice", subscribe=["room:1"])
    bob = mint("bob", subscribe=["room:*"])
    refusal = (429, "too_many_subject_connections")

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=STREAM_TIMEOUT) as http:
            held = [await open_held(http, url, ["room:1"], alice) for _ in range(2)]
            try:
                third = await attempt(http, url, "topic=room:1", bearer(alice))
                assert (third.status, third.error) == refusal, third.body
                assert third.retry_after() >= 0
                # another token of the same subject, by another token source, is the same subject
                other = await attempt(http, url, f"topic=room:1&token={alice_again}")
                assert (other.status, other.error) == refusal, other.body

                assert (await attempt(http, url, "topic=room:1", bearer(bob))).status == 200

                writer = mint("writer", publish=["room:*"])
                with Publisher.from_url(url, token=writer) as pub:
                    await still_delivering([s for s, _ in held], pub.publish, "room:1", "alive")

                await cancel(held[0][1])
                await accepted_again(
                    lambda: attempt(http, url, "topic=room:1", bearer(alice)), refusal
                )
            finally:
                await cancel(*(task for _, task in held))

    asyncio.run(scenario())


# -- connect rate -------------------------------------------------------------------------------


async def connect_until_refused(
    connect: Callable[[int], Awaitable[Outcome]], limit: int = 40
) -> tuple[list[int], Outcome, float]:
    """Connect as fast as possible until one is refused: the statuses, the refusal, the time."""
    statuses: list[int] = []
    started = time.monotonic()
    for _ in range(limit):
        outcome = await connect(len(statuses))
        statuses.append(outcome.status)
        if outcome.status != 200:
            return statuses, outcome, time.monotonic() - started
    raise AssertionError(f"{limit} rapid connects were all accepted")


def assert_burst_then_rate_limited(statuses: list[int], refusal: Outcome, elapsed: float) -> int:
    """``--connect-rate 2``: a burst of 4 accepted, then 429 with a Retry-After of >= 1 s."""
    assert statuses[:4] == [200] * 4, statuses
    assert (refusal.status, refusal.error) == (429, "rate_limited"), refusal.body
    accepted = len(statuses) - 1
    assert accepted <= 4 + 2 * elapsed + 1, (statuses, elapsed)
    retry = refusal.retry_after()
    assert 1 <= retry <= 5, retry
    return retry


def test_connect_rate_limits_one_address_and_not_the_others(
    gateway_factory: GatewayFactory,
) -> None:
    url = gateway_factory("--connect-rate-per-address", "2").url

    async def scenario() -> None:
        async with from_address("127.0.0.1") as hasty, from_address("127.0.0.2") as calm:
            statuses, refusal, elapsed = await connect_until_refused(
                lambda _: attempt(hasty, url, "topic=t")
            )
            retry = assert_burst_then_rate_limited(statuses, refusal, elapsed)

            # the rate is checked before the request is parsed: bad requests count too
            bad = await attempt(hasty, url, "topic=bad%20topic")
            assert (bad.status, bad.error) == (429, "rate_limited"), bad.body

            assert (await attempt(calm, url, "topic=t")).status == 200
            assert (await hasty.get(url + "/healthz")).status_code == 200

            await asyncio.sleep(retry)  # as the server asked
            assert (await attempt(hasty, url, "topic=t")).status == 200

    asyncio.run(scenario())


def test_connect_rate_limits_one_subject_from_any_address(
    gateway_factory: GatewayFactory,
) -> None:
    url = gateway_factory("--jwt-secret", SECRET, "--connect-rate", "2").url
    carol = mint("carol", subscribe=["room:*"])
    dave = mint("dave", subscribe=["room:*"])
    addresses = (f"127.0.0.{n}" for n in range(10, 250))

    async def connect(token: str) -> Outcome:
        """Each connect from an address of its own, so only the subject's budget runs out."""
        async with from_address(next(addresses)) as http:
            return await attempt(http, url, "topic=room:1", bearer(token))

    async def scenario() -> None:
        statuses, refusal, elapsed = await connect_until_refused(lambda _: connect(carol))
        retry = assert_burst_then_rate_limited(statuses, refusal, elapsed)

        assert (await connect(dave)).status == 200
        await asyncio.sleep(retry)  # as the server asked
        assert (await connect(carol)).status == 200

    asyncio.run(scenario())


# -- request limits -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited() -> Iterator[httpx.Client]:
    gateway = GatewayProcess(
        "--max-topics", "3", "--max-query-bytes", "1024", "--max-header-bytes", "4096",
        "--connect-rate", "0",
    )  # fmt: skip
    try:
        gateway.start()
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            yield http
            assert http.get("/healthz").status_code == 200
    finally:
        gateway.close()


@pytest.fixture(scope="module")
def defaults() -> Iterator[httpx.Client]:
    gateway = GatewayProcess("--connect-rate", "0")
    try:
        gateway.start()
        with httpx.Client(base_url=gateway.url, timeout=10) as http:
            yield http
    finally:
        gateway.close()


def test_more_topics_than_max_topics_is_a_400(limited: httpx.Client) -> None:
    assert get_events(limited, topics_query("a", "b", "c")).status == 200
    refused = get_events(limited, topics_query("a", "b", "c", "d"))
    assert (refused.status, refused.error) == (400, "too_many_topics"), refused.body


def test_the_default_max_topics_is_64(defaults: httpx.Client) -> None:
    names = [f"t{n}" for n in range(65)]
    assert get_events(defaults, topics_query(*names[:64])).status == 200
    refused = get_events(defaults, topics_query(*names))
    assert (refused.status, refused.error) == (400, "too_many_topics"), refused.body


def test_a_topic_of_257_characters_is_a_400(limited: httpx.Client) -> None:
    assert get_events(limited, topics_query("x" * 256)).status == 200
    refused = get_events(limited, topics_query("x" * 257))
    assert (refused.status, refused.error) == (400, "invalid_topic"), refused.body


@pytest.mark.parametrize(
    "topic",
    ["a b", "a\nb", "a\r\nb", "a*", "a,b", "caf\u00e9", "a\x00b", "a?b", ""],
    ids=["space", "lf", "crlf", "star", "comma", "non-ascii", "nul", "question-mark", "empty"],
)
def test_a_topic_with_characters_outside_the_rules_is_a_400(
    limited: httpx.Client, topic: str
) -> None:
    refused = get_events(limited, topics_query("ok", topic))
    assert (refused.status, refused.error) == (400, "invalid_topic"), refused.body


def query_of(size: int) -> str:
    """A valid stream query of exactly ``size`` bytes."""
    head = "topic=t&pad="
    return head + "x" * (size - len(head))


def test_a_query_over_max_query_bytes_is_a_414(limited: httpx.Client) -> None:
    assert get_events(limited, query_of(1024)).status == 200
    refused = get_events(limited, query_of(1025))
    assert (refused.status, refused.error) == (414, "query_too_long"), refused.body
    # checked before the query is parsed: a long query of bad topics is still a 414
    refused = get_events(limited, topics_query(*["bad topic"] * 200))
    assert (refused.status, refused.error) == (414, "query_too_long"), refused.body


def test_headers_over_max_header_bytes_are_a_431(limited: httpx.Client) -> None:
    assert get_events(limited, "topic=t", {"x-pad": "p" * 3000}).status == 200
    refused = get_events(limited, "topic=t", {"x-pad": "p" * 6000})
    assert (refused.status, refused.error) == (431, "headers_too_large"), refused.body
    many = {f"x-pad-{n}": "p" * 150 for n in range(40)}
    refused = get_events(limited, "topic=t", many)
    assert (refused.status, refused.error) == (431, "headers_too_large"), refused.body


def test_the_default_query_and_header_limits(defaults: httpx.Client) -> None:
    assert get_events(defaults, query_of(8192)).status == 200
    refused = get_events(defaults, query_of(8193))
    assert (refused.status, refused.error) == (414, "query_too_long"), refused.body

    assert get_events(defaults, "topic=t", {"x-pad": "p" * 12_000}).status == 200
    refused = get_events(defaults, "topic=t", {"x-pad": "p" * 20_000})
    assert (refused.status, refused.error) == (431, "headers_too_large"), refused.body


# -- the node under fire ------------------------------------------------------------------------

HAMMER_SECONDS = 3.0
FEED = "feed"


@dataclass
class Hammering:
    """What the hammering clients got: (kind, status) counts, and /healthz latencies."""

    tally: Counter[tuple[str, int]]
    health: list[tuple[int, float]]


async def hammer(url: str, token: str, until: float) -> Hammering:
    """Clients from four addresses hammer /events until ``until`` (loop time): rapid connects,
    oversized queries, oversized headers and bad topics, each past its address's burst."""
    loop = asyncio.get_running_loop()
    tally: Counter[tuple[str, int]] = Counter()
    health: list[tuple[int, float]] = []
    kinds: dict[str, tuple[str, str, dict[str, str]]] = {
        "connect": ("127.0.0.2", "topic=feed", {}),
        "long-query": ("127.0.0.3", "topic=feed&pad=" + "x" * 2000, {}),
        "big-headers": ("127.0.0.4", "topic=feed", {"x-pad": "p" * 6000}),
        "bad-topic": ("127.0.0.5", "topic=bad%20topic", {}),
    }

    async def worker(kind: str) -> None:
        address, query, extra = kinds[kind]
        async with from_address(address) as http:
            while loop.time() < until:
                outcome = await attempt(http, url, query, {**bearer(token), **extra})
                tally[kind, outcome.status] += 1

    async def probe_health() -> None:
        async with from_address("127.0.0.6", timeout=5) as http:
            while loop.time() < until:
                started = loop.time()
                response = await http.get(url + "/healthz")
                health.append((response.status_code, loop.time() - started))
                await asyncio.sleep(0.2)  # a health probe every 0.2 s, as a balancer's

    await asyncio.gather(*(worker(kind) for kind in kinds for _ in range(2)), probe_health())
    return Hammering(tally, health)


def test_a_canary_misses_nothing_while_the_node_is_hammered(
    engine: str, request: pytest.FixtureRequest, gateway_factory: GatewayFactory, prefix: str
) -> None:
    args = ["--jwt-secret", SECRET, "--connect-rate", "5",
            "--max-query-bytes", "1024", "--max-header-bytes", "4096"]  # fmt: skip
    redis_url = None
    if engine == "redis":
        redis_url = request.getfixturevalue("redis_url")
        args += ["--prefix", prefix]
    url = gateway_factory(*args, redis_url=redis_url).url
    canary_token = mint("canary", subscribe=[FEED])
    hammer_token = mint("hammer", subscribe=["*"])
    sent: list[str] = []

    async def scenario() -> tuple[SSEStream, Hammering]:
        stop = threading.Event()
        with Publisher.from_url(url, token=mint("writer", publish=[FEED])) as pub:

            def publish_numbered() -> None:
                while not stop.is_set():
                    sent.append(pub.publish(FEED, {"seq": len(sent)}, "n"))
                    time.sleep(0.01)  # the publisher's pace: about 100 events a second

            async with httpx.AsyncClient(timeout=STREAM_TIMEOUT) as http:
                canary, task = await open_held(http, url, [FEED], canary_token)
                try:
                    await canary.until_subscribed()
                    publisher = threading.Thread(target=publish_numbered)
                    publisher.start()
                    try:
                        until = asyncio.get_running_loop().time() + HAMMER_SECONDS
                        hammering = await hammer(url, hammer_token, until)
                    finally:
                        stop.set()
                        await asyncio.to_thread(publisher.join)
                    last = sent[-1]
                    await canary.wait_for(
                        lambda s: s.closed_by_server or any(e.id == last for e in s.events),
                        timeout=30,
                    )
                finally:
                    await cancel(task)
        return canary, hammering

    canary, hammering = asyncio.run(scenario())

    expected = {"connect": 200, "long-query": 414, "big-headers": 431, "bad-topic": 400}
    for (kind, status), count in hammering.tally.items():
        assert status in (expected[kind], 429), (kind, status, count)
    for kind, status in expected.items():
        assert hammering.tally[kind, status] > 0, (kind, hammering.tally)
    limited = sum(n for (_, status), n in hammering.tally.items() if status == 429)
    assert limited >= 100, hammering.tally

    assert len(hammering.health) >= 3, hammering.health
    assert all(status == 200 for status, _ in hammering.health), hammering.health

    assert not canary.closed_by_server
    assert len(sent) >= 20, len(sent)
    numbered = [e for e in canary.events if e.event == "n"]
    assert [orjson.loads(e.data)["seq"] for e in numbered] == list(range(len(sent)))
    assert [e.id for e in numbered] == sent


def test_an_admission_refused_on_its_subject_keeps_no_address_token() -> None:
    """``Admission.admit`` is all or nothing: a stream opened below the request cycle that is
    refused there is checked again by the ASGI path, which must find the same state."""
    from gateway.config import Settings
    from gateway.errors import HTTPError
    from gateway.limits import Admission

    admission = Admission(Settings(connect_rate_per_address=1, connect_rate=0.5))
    address = "203.0.113.1"
    admission.admit("alice", address)  # takes 1 of the address's 2 tokens, alice's only one
    with pytest.raises(HTTPError) as refused:
        admission.admit("alice", address)
    assert refused.value.error == "rate_limited"
    admission.check_address(address)  # the token the refused admit took was given back
    with pytest.raises(HTTPError):
        admission.check_address(address)
