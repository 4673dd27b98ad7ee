"""Issue 10 B: replays are bounded.

A replay is read from history page by page and sent under the same pending-bytes budget as
live frames, waiting for the client to take each page: clients that ask for a long history and
never read cannot pin the node's memory, and a client that reads gets all of it, in order,
then the live events, with no gap and no duplicate at the hand-over, even when more live
events arrive during the replay than the budget could hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time

import httpx
import orjson
import pytest
import redis

from gateway.client import EventParser, ServerEvent, stream_url
from publisher.protocol import key_to_id
from tests.conftest import GatewayFactory, NodeFactory
from tests.support.sse import collect
from tests.support.waiting import let_time_pass_async, wait_until, wait_until_async

ATTACK_TOPICS = [f"history:{i}" for i in range(8)]
ATTACK_EVENTS = 2000
"""Per topic."""
ATTACK_EVENT_BYTES = 4096
ATTACKERS = 20
SEND_TIMEOUT = 'sse_disconnects_total{reason="send_timeout"}'


class NonReader:
    """A raw TCP client that asks for every topic's whole history and then never reads."""

    def __init__(self, port: int, topics: list[str]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        query = "&".join(f"topic={t}" for t in topics)
        request = f"GET /events?{query} HTTP/1.1\r\nHost: t\r\nLast-Event-ID: 0-0\r\n\r\n"
        self.sock.sendall(request.encode())

    def close(self) -> None:
        self.sock.close()


def _healthz_seconds(url: str) -> float:
    start = time.monotonic()
    response = httpx.get(url + "/healthz", timeout=30)
    assert response.status_code == 200
    return time.monotonic() - start


def test_clients_that_ask_for_all_history_and_never_read_cannot_pin_memory(
    redis_url: str, prefix: str, gateway_factory: GatewayFactory
) -> None:
    """Issue 10 B, repro scaled to CI: 8 topics x 2000 events x 4 KB of history (64 MB), then
    20 connections that ask for all of it with ``Last-Event-ID: 0-0`` and never read. Today
    each replay is loaded whole and sent as one chunk (RSS grew by gigabytes); now the node
    holds about one page per stream, /healthz answers promptly throughout, and each stalled
    stream is dropped after ``--send-timeout``."""
    from publisher import Publisher, Retention

    body = "x" * ATTACK_EVENT_BYTES
    with Publisher.from_url(redis_url, prefix=prefix, retention=Retention(ATTACK_EVENTS, 0)) as pub:
        for start in range(0, ATTACK_EVENTS, 250):
            pub.publish_many(
                (topic, body) for _ in range(start, start + 250) for topic in ATTACK_TOPICS
            )
    gateway = gateway_factory(
        "--prefix", prefix, "--max-events", str(ATTACK_EVENTS), "--send-timeout", "4",
        redis_url=redis_url,
    )  # fmt: skip
    _healthz_seconds(gateway.url)
    before = gateway.rss_bytes()
    peak = before
    slowest = 0.0
    attackers = [NonReader(gateway.port, ATTACK_TOPICS) for _ in range(ATTACKERS)]
    try:

        def all_dropped() -> bool:
            """Samples RSS and /healthz's latency while the stalled streams are dropped."""
            nonlocal peak, slowest
            if gateway.metric(SEND_TIMEOUT) >= ATTACKERS:
                return True
            peak = max(peak, gateway.rss_bytes())
            slowest = max(slowest, _healthz_seconds(gateway.url))
            return False

        with contextlib.suppress(AssertionError):  # checked below, with the count
            wait_until(all_dropped, "every stalled stream dropped", 60, step=0.1)
        dropped = gateway.metric(SEND_TIMEOUT)
    finally:
        for attacker in attackers:
            attacker.close()
    growth = peak - before
    mib = 2**20
    print(f"RSS {before / mib:.0f} -> peak {peak / mib:.0f} MiB; /healthz max {slowest:.3f} s")
    assert growth < 150 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB"
    assert slowest < 2.0, f"/healthz took {slowest:.1f} s"
    assert dropped == ATTACKERS, f"{dropped:.0f} of {ATTACKERS} stalled streams were dropped"


async def _read_slowly(
    url: str, headers: dict[str, str], events: list[ServerEvent], done: asyncio.Event,
    slow_for: float, until: str,
) -> bool:  # fmt: skip
    """Read the stream, pausing after each read for the first ``slow_for`` seconds (so the
    replay takes a while); return whether the server closed the stream."""
    parser = EventParser()
    start = time.monotonic()
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        assert response.status_code == 200
        async for chunk in response.aiter_raw():
            events.extend(parser.feed(chunk))
            if any(e.data == until for e in events[-50:]):
                return False
            if time.monotonic() - start < slow_for:
                await asyncio.sleep(0.01)  # a slow reader: a pause after each read
            done.set()
    return True


@pytest.mark.parametrize("held_budget", [64 * 1024, 8 * 1024 * 1024], ids=["small", "large"])
def test_a_reading_client_gets_every_event_in_order_then_live_ones(
    node_factory: NodeFactory, held_budget: int
) -> None:
    """Issue 10 B: a long replay (several pages, topics merged, events on several topics
    once) reaches a client that reads, in id order, and hands over to live events with no gap
    and no duplicate. Live events arrive while the replay is sent; with a small budget more of
    them than it allows (they used to end the stream as a slow consumer; now the replay reads
    on to a newer clock instead)."""
    node = node_factory("--max-pending-bytes", str(held_budget))
    rotation = (["a"], ["b"], ["a", "b"], ["c"])
    filler = "y" * 400
    history: list[str] = []
    for start in range(0, 3000, 300):
        history += node.publisher.publish_many(
            (rotation[i % 4], f"h{i}:{filler}") for i in range(start, start + 300)
        )
    live: list[str] = []

    def publish_live(started: threading.Event) -> None:
        started.wait(10)
        for i in range(300):
            live.append(node.publish(rotation[i % 4], f"l{i}:" + "z" * 1000))
        live.append(node.publish(["a", "b", "c"], "end"))

    async def scenario() -> tuple[list[ServerEvent], bool]:
        started = threading.Event()
        publisher = asyncio.create_task(asyncio.to_thread(publish_live, started))
        reading = asyncio.Event()
        events: list[ServerEvent] = []
        url = stream_url(node.url, ["a", "b", "c"], None, None)
        headers = {"accept": "text/event-stream", "last-event-id": "0-0"}
        reader = asyncio.create_task(
            _read_slowly(url, headers, events, reading, slow_for=2.0, until="end")
        )
        await asyncio.wait_for(reading.wait(), 10)
        started.set()
        try:
            closed = await asyncio.wait_for(reader, 60)
        finally:
            await publisher
        return events, closed

    events, closed = asyncio.run(scenario())
    assert not closed, "the server ended the stream"
    received = [e.id for e in events if e.event in ("", "message")]
    expected = history + live
    assert received == expected, (
        f"{len(received)} received of {len(expected)}; "
        f"{len(received) - len(set(received))} duplicates; "
        f"missing {[i for i in expected if i not in set(received)][:5]}"
    )


def test_a_stream_without_position_starts_live_whatever_the_history(
    node_factory: NodeFactory,
) -> None:
    """Issue 10 B (regression guard): without a position nothing is replayed, however long
    the history, and the first event published after the stream opened is the first one
    received."""
    node = node_factory()
    node.publisher.publish_many(("a", f"old{i}") for i in range(2000))

    async def scenario() -> list[ServerEvent]:
        events: list[ServerEvent] = []
        reading = asyncio.Event()
        url = stream_url(node.url, ["a"], None, None)
        reader = asyncio.create_task(
            _read_slowly(url, {"accept": "text/event-stream"}, events, reading, 0, "new")
        )
        await asyncio.wait_for(reading.wait(), 10)
        for _ in range(100):
            await asyncio.to_thread(node.publish, "a", "new")
            try:
                await asyncio.wait_for(asyncio.shield(reader), 0.2)
                break
            except TimeoutError:
                continue
        await asyncio.wait_for(reader, 10)
        return events

    events = asyncio.run(scenario())
    assert events
    assert all(e.data == "new" for e in events)


def test_history_trimmed_under_a_slow_replay_ends_it_before_the_gap_then_reset(
    redis_url: str, prefix: str, gateway_factory: GatewayFactory
) -> None:
    """Issue 10 B, never a silent gap: a replay is read page by page, so retention may trim
    what it has not read yet (a client that reads slowly while many events are published).
    The replay then ends at the last event before the gap, with no event after it, and the
    client's reconnect from there is told ``reset`` (trimmed)."""
    from publisher import Publisher, Retention

    body = "g" * 4096
    retention = Retention(2000, 0)
    gateway = gateway_factory(
        "--prefix", prefix, "--max-events", "2000", "--send-timeout", "60", redis_url=redis_url
    )
    with Publisher.from_url(redis_url, prefix=prefix, retention=retention) as pub:
        history = []
        for _ in range(8):
            history += pub.publish_many(("g", body) for _ in range(250))

        async def scenario() -> tuple[list[ServerEvent], bool]:
            parser = EventParser()
            events: list[ServerEvent] = []
            small = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)]
            transport = httpx.AsyncHTTPTransport(socket_options=small)
            url = stream_url(gateway.url, ["g"], None, None)
            headers = {"accept": "text/event-stream", "last-event-id": "0-0"}
            async with (
                httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(30)) as client,
                client.stream("GET", url, headers=headers) as response,
            ):
                chunks = response.aiter_raw()
                async for chunk in chunks:
                    events.extend(parser.feed(chunk))
                    if events:
                        break
                # The replay is stuck on this client: trim everything it has not read yet.
                started = time.monotonic()
                for _ in range(9):
                    await asyncio.to_thread(pub.publish_many, (("g", body) for _ in range(250)))
                print(f"trimmed in {time.monotonic() - started:.1f} s")
                async for chunk in chunks:
                    events.extend(parser.feed(chunk))
            return events, True

        events, _ = asyncio.run(scenario())
    received = [e.id for e in events]
    assert received, "nothing was replayed"
    assert received == history[: len(received)], "the replay is not a prefix of the history"
    assert len(received) < len(history), "the whole history was replayed"
    again = asyncio.run(
        collect(gateway.url, ["g"], lambda s: bool(s.events), last_event_id=received[-1])
    )
    assert again.events[0].event == "reset"
    assert orjson.loads(again.events[0].data) == {"reason": "trimmed", "topics": ["g"]}


def test_a_backfill_that_cannot_keep_the_live_frames_reads_on_from_history(
    redis_url: str,
    prefix: str,
    redis_client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 10 B, at the node: live frames that arrive while a reconnected pub/sub link
    backfills are held within a budget too; past it (here: any frame) they are let go and the
    backfill reads on from the streams to a newer clock. Through repeated link kills under
    steady publishing, the engine still hands on every event once, in order."""
    from gateway.engines import redis as engine_module
    from publisher import Publisher, Retention

    monkeypatch.setattr(engine_module, "BACKFILL_HELD_BYTES", 1)
    caplog.set_level(logging.INFO, logger="gateway.engine")
    published: list[str] = []
    stop = threading.Event()

    def publish() -> None:
        # Flat out, so live frames arrive during every backfill; with retention far above what
        # is published, the backfill never meets history that retention legitimately trimmed
        # (that is a reset, tested elsewhere).
        retention = Retention(max_events=1_000_000)
        with Publisher.from_url(redis_url, prefix=prefix, retention=retention) as pub:
            while not stop.is_set():
                published.append(pub.publish("a", f"e{len(published)}"))

    async def scenario() -> tuple[list[str], list[str]]:
        engine = engine_module.RedisEngine(redis_url, prefix=prefix, probe_interval=0)
        received: list[str] = []
        lost: list[str] = []
        engine.set_listeners(
            lambda topic, frame: received.append(key_to_id(frame.key)), lost.extend
        )
        await engine.start()
        thread = threading.Thread(target=publish)
        try:
            await engine.subscribe("a")
            thread.start()
            for _ in range(5):
                await let_time_pass_async(0.3, "events flow between two kills")
                # The link may still be coming back from the last kill: kill it once it is up.
                await wait_until_async(
                    lambda: asyncio.to_thread(redis_client.client_kill_filter, _type="pubsub"),
                    "the pub/sub link to come back (and be killed)",
                )
            await let_time_pass_async(0.5, "events flow after the last kill")
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)
        try:
            await wait_until_async(
                lambda: bool(received) and received[-1] == published[-1], "the last event"
            )
        finally:
            await engine.close()
        return received, lost

    received, lost = asyncio.run(scenario())
    assert lost == []
    first = published.index(received[0])
    assert received == published[first:], (
        f"{len(received)} received of {len(published) - first}; "
        f"missing {sorted(set(published[first:]) - set(received))[:5]}"
    )
    assert "backfill reads on to a newer clock" in caplog.text
