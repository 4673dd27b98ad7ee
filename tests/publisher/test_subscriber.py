"""publisher.subscriber against real gateway processes: resume after a cut inside a frame,
``reset`` surfaced, token refresh, terminal refusals, and backoff delays."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from publisher import Publisher
from publisher.subscriber import (
    AsyncSubscription,
    Event,
    Subscription,
    SubscriptionError,
    asubscribe,
    subscribe,
)
from tests.conftest import GatewayFactory
from tests.support.gateway import GatewayProcess
from tests.support.proxy import CuttingProxy
from tests.support.tokens import SECRET, hs256
from tests.support.waiting import wait_until, wait_until_async

DEADLINE = 30.0


def take(sub: Subscription, count: int, timeout: float = DEADLINE) -> list[Event]:
    """The first ``count`` events of ``sub``; the subscription is closed if they take longer
    than ``timeout`` (so a missing event fails the test instead of hanging it)."""
    watchdog = threading.Timer(timeout, sub.close)
    watchdog.start()
    events: list[Event] = []
    try:
        for event in sub:
            events.append(event)
            if len(events) >= count:
                break
    finally:
        watchdog.cancel()
    assert len(events) == count, f"only {len(events)} of {count} events in {timeout}s"
    return events


async def atake(sub: AsyncSubscription, count: int, timeout: float = DEADLINE) -> list[Event]:
    events: list[Event] = []

    async def read() -> None:
        async for event in sub:
            events.append(event)
            if len(events) >= count:
                return

    try:
        await asyncio.wait_for(read(), timeout)
    finally:
        await sub.aclose()
    return events


@pytest.fixture
def cut_twice(gateway_factory: GatewayFactory) -> Iterator[tuple[CuttingProxy, list[str]]]:
    """Ten events on a node, and a proxy whose first two connections are cut inside the frames
    of events 4 and 7 (after their ``id:`` lines, inside their ``data:`` lines)."""
    gateway = gateway_factory()
    with Publisher.from_url(gateway.url) as pub:
        ids = [pub.publish("t", {"seq": seq}) for seq in range(10)]
    proxy = CuttingProxy(gateway.port, [b'"seq":4', b'"seq":7']).start()
    yield proxy, ids
    proxy.close()


def last_event_ids(proxy: CuttingProxy) -> list[str | None]:
    found: list[str | None] = []
    for head in proxy.requests:
        value = None
        for line in head.decode("latin-1").split("\r\n"):
            name, _, rest = line.partition(":")
            if name.lower() == "last-event-id":
                value = rest.strip()
        found.append(value)
    return found


def test_resumes_exactly_after_a_cut_inside_a_frame(
    cut_twice: tuple[CuttingProxy, list[str]],
) -> None:
    """Issue 11: a connection cut in the middle of a frame resumes after the last event that
    was delivered, so every event is yielded once, in order."""
    proxy, ids = cut_twice
    with subscribe(proxy.url, ["t"], since=0, initial=0.2) as sub:
        events = take(sub, 10)
        assert sub.last_event_id == ids[-1]
    assert [e.value for e in events] == [{"seq": seq} for seq in range(10)]
    assert [e.id for e in events] == ids
    assert proxy.cut_done.is_set()
    assert last_event_ids(proxy) == [None, ids[3], ids[6]]


def test_the_async_iterator_resumes_exactly_after_a_cut_inside_a_frame(
    cut_twice: tuple[CuttingProxy, list[str]],
) -> None:
    proxy, ids = cut_twice
    events = asyncio.run(atake(asubscribe(proxy.url, "t", since=0, initial=0.2), 10))
    assert [e.id for e in events] == ids
    assert [e.value for e in events] == [{"seq": seq} for seq in range(10)]
    assert last_event_ids(proxy) == [None, ids[3], ids[6]]


def test_a_start_position_is_not_yielded_again(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    with Publisher.from_url(gateway.url) as pub:
        ids = [pub.publish("t", seq) for seq in range(4)]
    with subscribe(gateway.url, "t", last_event_id=ids[1]) as sub:
        assert [e.id for e in take(sub, 2)] == ids[2:]


def test_a_reset_is_an_event_with_its_reason_and_topics(gateway_factory: GatewayFactory) -> None:
    """Issue 11: ``reset`` is surfaced: an event of type "reset" with its parsed info, then
    what the node still holds."""
    gateway = gateway_factory("--max-events", "5")
    with Publisher.from_url(gateway.url) as pub:
        ids = [pub.publish("t", {"seq": seq}) for seq in range(40)]
    with subscribe(gateway.url, ["t"], last_event_id=ids[0]) as sub:
        reset, *rest = take(sub, 6)
    assert reset.type == "reset"
    assert reset.reset is not None
    assert (reset.reset.reason, reset.reset.topics) == ("trimmed", ["t"])
    assert [e.id for e in rest] == ids[-5:]
    assert all(e.reset is None for e in rest)

    async def read() -> list[Event]:
        return await atake(asubscribe(gateway.url, ["t"], last_event_id=ids[0]), 6)

    areset, *arest = asyncio.run(read())
    assert areset.reset == reset.reset
    assert [e.id for e in arest] == ids[-5:]


class Tokens:
    """A token function: the first token has already expired (a 401), the second lives for
    ``short`` seconds (the stream ends with ``token_expired``), the others for five minutes."""

    def __init__(self, short: float = 2.0) -> None:
        self.short = short
        self.calls: list[float] = []

    def __call__(self) -> str:
        self.calls.append(time.monotonic())
        ttl = {1: -60.0, 2: self.short}.get(len(self.calls), 300.0)
        return hs256(subscribe=["t"], ttl=ttl)


def publish_while(gateway: GatewayProcess, stop: threading.Event, ids: list[str]) -> None:
    token = hs256(sub="worker", subscribe=[], publish=["t"])
    with Publisher.from_url(gateway.url, token=token) as pub:
        seq = 0
        while not stop.wait(0.02):
            ids.append(pub.publish("t", {"seq": seq}))
            seq += 1


def test_a_token_function_is_called_again_on_401_and_on_token_expired(
    gateway_factory: GatewayFactory,
) -> None:
    """Issue 11: token refresh. A 401 on connect and a token that expires mid-stream each
    call the token function again; the stream resumes without losing or repeating an event."""
    gateway = gateway_factory("--jwt-secret", SECRET, "--jwt-leeway", "0")
    tokens = Tokens()
    published: list[str] = []
    stop = threading.Event()
    worker = threading.Thread(target=publish_while, args=(gateway, stop, published))
    with subscribe(gateway.url, ["t"], token=tokens, since=0, initial=0.2) as sub:
        worker.start()
        try:
            events: list[Event] = []
            watchdog = threading.Timer(DEADLINE, sub.close)
            watchdog.start()
            for event in sub:
                events.append(event)
                if len(tokens.calls) >= 3 and len(events) >= 20:
                    break
            watchdog.cancel()
        finally:
            stop.set()
            worker.join(10)
        tail = take(sub, len(published) - len(events)) if len(published) > len(events) else []
    assert len(tokens.calls) >= 3, tokens.calls
    received = events + tail
    assert [e.id for e in received] == published
    assert [e.value["seq"] for e in received] == list(range(len(published)))


def test_a_token_function_refreshes_the_async_iterator_too(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory("--jwt-secret", SECRET, "--jwt-leeway", "0")
    tokens = Tokens(short=2.0)

    async def token() -> str:
        return tokens()

    async def wait_until(check: Callable[[], bool]) -> None:
        await wait_until_async(check, "the subscription's progress", 30, 0.02)

    async def run() -> tuple[list[Event], list[str]]:
        pub = Publisher.from_url(gateway.url, token=hs256(sub="w", subscribe=[], publish=["t"]))
        sub = asubscribe(gateway.url, "t", token=token, since=0, initial=0.2)
        events: list[Event] = []

        async def read() -> None:
            async for event in sub:
                events.append(event)

        reader = asyncio.create_task(read())
        try:
            ids = [await asyncio.to_thread(pub.publish, "t", 0)]
            await wait_until(lambda: len(tokens.calls) >= 3)
            ids.append(await asyncio.to_thread(pub.publish, "t", 1))
            await wait_until(lambda: len(events) >= 2)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await sub.aclose()
            pub.close()
        return events, ids

    events, ids = asyncio.run(asyncio.wait_for(run(), DEADLINE))
    assert [e.id for e in events] == ids
    assert len(tokens.calls) >= 3


def test_a_401_without_a_token_function_stops_with_an_error(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory("--jwt-secret", SECRET)
    with pytest.raises(SubscriptionError) as raised:
        next(iter(subscribe(gateway.url, "t", token=hs256(subscribe=["t"], ttl=-60))))
    assert raised.value.status == 401
    assert raised.value.error == "invalid_token"
    with pytest.raises(SubscriptionError) as raised:
        next(iter(subscribe(gateway.url, "t")))
    assert raised.value.status == 401


def test_403_and_400_stop_even_with_a_token_function(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory("--jwt-secret", SECRET)
    with pytest.raises(SubscriptionError) as raised:
        next(iter(subscribe(gateway.url, "other", token=lambda: hs256(subscribe=["t"]))))
    assert (raised.value.status, raised.value.error) == (403, "forbidden_topic")
    sub = subscribe(gateway.url, "t", token=lambda: hs256(subscribe=["t"]), last_event_id="x-y")
    with pytest.raises(SubscriptionError) as raised:
        next(sub)
    assert raised.value.status == 400
    assert sub.status == "closed"


def test_failed_attempts_wait_growing_jittered_delays() -> None:
    """Nothing listens: each attempt fails at once, and the waits between them follow full
    jitter under a ceiling that doubles from ``initial`` up to ``maximum``."""
    from tests.support.ports import free_port

    sub = subscribe(f"http://127.0.0.1:{free_port()}", "t", initial=0.05, maximum=0.4)
    core = sub._core
    delays = [core.failed(OSError("refused")) for _ in range(8)]
    ceilings = [min(0.4, 0.05 * 2**n) for n in range(8)]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True)), delays
    assert len(set(delays)) > 1
    core.opened()
    core.feed(b"retry: 3000\n: refused: node_full\n\n")
    assert core.failures == 8, "a refusal is not a good open"
    core.opened()
    core.feed(b"retry: 3000\n\n: ok\n\n")
    assert core.failures == 0, "the preamble of a stream is"
    assert core.failed(OSError("refused")) <= 0.05
    sub.close()


def test_close_from_another_thread_ends_a_blocked_read(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory("--heartbeat", "300")
    sub = subscribe(gateway.url, "quiet")
    got: list[Event] = []
    reader = threading.Thread(target=lambda: got.extend(sub))
    reader.start()
    wait_until(lambda: sub.status == "open", "the subscription open", DEADLINE, 0.02)
    sub.close()
    reader.join(10)
    assert not reader.is_alive(), "close() did not end the blocked read"
    assert got == []
    assert sub.status == "closed"


class Refusals(logging.Handler):
    """Sets ``seen`` when the subscriber logs a temporary refusal."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "refused for now" in record.getMessage():
            self.seen.set()


def test_a_refusal_is_retried_after_its_retry_ms_and_not_yielded(
    gateway_factory: GatewayFactory,
) -> None:
    """``event: refused`` (here: the node is full) is temporary: the subscriber retries and
    gets its stream once there is room, and never yields the refusal."""
    gateway = gateway_factory("--max-connections", "1", "--retry-ms", "200")
    with Publisher.from_url(gateway.url) as pub:
        first = pub.publish("t", "first")
    blocker = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    blocker.sendall(b"GET /events?topic=other HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert blocker.recv(4096).startswith(b"HTTP/1.1 200")
    handler = Refusals()
    logger = logging.getLogger("publisher.subscriber")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def free_the_slot() -> None:
        handler.seen.wait(DEADLINE)
        blocker.close()

    freer = threading.Thread(target=free_the_slot)
    freer.start()
    try:
        with subscribe(gateway.url, "t", since=0, initial=5.0) as sub:
            (event,) = take(sub, 1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        handler.seen.set()
        freer.join(10)
        blocker.close()
    assert handler.seen.is_set()
    assert (event.id, event.type, event.data) == (first, "message", "first")


def test_a_node_killed_and_restarted_loses_and_repeats_nothing(
    redis_url: str, prefix: str, gateway_factory: GatewayFactory
) -> None:
    """A node SIGKILLed mid-stream: the subscriber retries while it is down and resumes from
    Redis once it is back, with the events published meanwhile, each once."""
    gateway = gateway_factory("--prefix", prefix, redis_url=redis_url)
    with (
        Publisher.from_url(redis_url, prefix=prefix) as pub,
        subscribe(gateway.url, "t", since=0, initial=0.1, maximum=0.5) as sub,
    ):
        ids = [pub.publish("t", seq) for seq in range(3)]
        before = take(sub, 3)
        gateway.stop(signal.SIGKILL)
        ids += [pub.publish("t", seq) for seq in range(3, 6)]
        gateway.start()
        after = take(sub, 3)
    assert [e.id for e in before + after] == ids
    assert [e.value for e in before + after] == list(range(6))
