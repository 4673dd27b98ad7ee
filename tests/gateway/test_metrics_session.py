"""Issue 13, acceptance 1: after a scripted session (connect, publish, replay, a 403, a
refusal, a shed slow consumer) ``/metrics`` shows each counter with the exact expected value.

The expectations are kept as a ledger while the session runs: what each client received, what
each ``POST /publish`` answered, and the frames' exact bytes as Redis stores them.
"""

from __future__ import annotations

import asyncio
import platform
import socket
from collections.abc import Callable, Iterator, Sequence
from importlib.metadata import version
from typing import Any

import httpx
import orjson
import pytest
import redis

from publisher import Publisher
from tests.conftest import GatewayFactory
from tests.gateway.metrics_support import Samples, await_for, family, sample_key, scrape
from tests.support.gateway import GatewayProcess
from tests.support.refusals import EVENT_STREAM, refusal_of
from tests.support.sse import SSEStream, first_event, open_stream
from tests.support.tokens import SECRET, hs256

TIMEOUT = httpx.Timeout(10, read=None)
MAX_PENDING = 64 * 1024
BIG = "x" * (60 * 1024)
# Minted at import: valid however long the suite runs.
READER = hs256(sub="alice", subscribe=["news", "old", "slow"], ttl=24 * 3600)
PUBLISHER = hs256(sub="pub", subscribe=[], publish=["*"], ttl=24 * 3600)
NOT_A_PUBLISHER = hs256(sub="bob", subscribe=["news"], ttl=24 * 3600)


def k(name: str, **labels: str) -> str:
    return sample_key(name, **labels)


class Ledger:
    """What the node must report, added up from what the clients saw."""

    def __init__(self, node: GatewayProcess, client: redis.Redis, prefix: str) -> None:
        self.node = node
        self.redis = client
        self.prefix = prefix
        self.publish_outcomes: dict[str, int] = {}
        self.published = 0
        self.engine_publishes = 0
        self.frames = 0
        self.delivered = 0
        self.bytes = 0
        self.replayed = 0

    def frame_sizes(self, topic: str) -> dict[str, int]:
        """Each stored event's frame size: ``id: <id>\\n`` and the stored body."""
        entries: list[tuple[bytes, dict[bytes, bytes]]] = self.redis.xrange(  # type: ignore[assignment]
            f"{self.prefix}:s:{topic}"
        )
        return {
            entry_id.decode(): len(b"id: " + entry_id + b"\n" + fields[b"f"])
            for entry_id, fields in entries
        }

    async def publish(self, body: Any, token: str = PUBLISHER) -> httpx.Response:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(
                self.node.url + "/publish",
                content=body if isinstance(body, bytes) else orjson.dumps(body),
                headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
            )
        outcome = "accepted" if response.status_code == 200 else response.json()["error"]
        self.publish_outcomes[outcome] = self.publish_outcomes.get(outcome, 0) + 1
        if response.status_code == 200:
            self.engine_publishes += 1
            self.published += len(body) if isinstance(body, list) else 1
        return response

    async def publish_one(self, topic: str, data: Any, event: str | None = None) -> str:
        body: dict[str, Any] = {"topic": topic, "data": data}
        if event is not None:
            body["event"] = event
        response = await self.publish(body)
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    def received(self, topic: str, stream: SSEStream, *, live: bool) -> list[str]:
        """Count the events ``stream`` got (live frames or replay) with their exact bytes."""
        ids = [e.id for e in stream.events if e.event not in ("reset", "refused")]
        sizes = self.frame_sizes(topic)
        self.delivered += len(ids)
        self.bytes += sum(sizes[i] for i in ids)
        if live:
            self.frames += len(ids)
        else:
            self.replayed += len(ids)
        return ids


class StalledReader:
    """A raw TCP client that reads the stream's head and preamble, then never reads again."""

    def __init__(self, port: int, query: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.sock.sendall(f"GET /events?{query} HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        head = b""
        while b": ok\n\n" not in head:
            chunk = self.sock.recv(1024)
            assert chunk, f"the stream ended early: {head!r}"
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def session_node(gateway_factory: GatewayFactory, redis_url: str, prefix: str) -> GatewayProcess:
    return gateway_factory(
        "--prefix", prefix, "--jwt-secret", SECRET, "--max-connections", "1",
        "--max-events", "5", "--max-pending-bytes", str(MAX_PENDING), "--send-timeout", "60",
        "--heartbeat", "60", "--linger", "0", "--probe-interval", "0", "--connect-rate", "0",
        redis_url=redis_url,
    )  # fmt: skip


@pytest.fixture
def stalled() -> Iterator[list[StalledReader]]:
    readers: list[StalledReader] = []
    yield readers
    for reader in readers:
        reader.close()


def _frames_are(count: int) -> Callable[[Samples], bool]:
    return lambda samples: samples.get("sse_live_frames_total") == count


def disconnects(reason: str) -> str:
    return k("sse_disconnects_total", reason=reason)


def closed_streams(count: int) -> Callable[[Samples], bool]:
    def check(samples: Samples) -> bool:
        total = sum(family(samples, "sse_disconnects_total").values())
        return total == count and samples.get("sse_connections") == 0

    return check


async def read_until(
    node: GatewayProcess, topics: Sequence[str], last_id: str, **options: Any
) -> SSEStream:
    """A stream read until ``last_id`` arrives, then closed by the client."""
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        stream, reading = open_stream(client, node.url, topics, **options)
        try:
            await stream.wait_for(lambda s: any(e.id == last_id for e in s.events))
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
    return stream


def test_a_scripted_session_shows_exact_counters(
    session_node: GatewayProcess,
    redis_client: redis.Redis,
    prefix: str,
    stalled: list[StalledReader],
) -> None:
    node = session_node
    ledger = Ledger(node, redis_client, prefix)
    token = f"&token={READER}"

    async def session() -> None:
        # 1. connect and receive live events.
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            a, reading = open_stream(client, node.url, ["news"], query=token)
            try:
                await a.until_subscribed()
                samples = await await_for(node.url, lambda s: s.get("sse_hub_topics") == 1)
                assert samples["sse_connections"] == 1
                m0 = await ledger.publish_one("news", "m0")
                response = await ledger.publish(
                    [{"topic": "news", "data": "m1"}, {"topic": "news", "data": "m2"}]
                )
                m2 = response.json()["results"][1]["id"]
                await a.wait_for(lambda s: any(e.id == m2 for e in s.events))
            finally:
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
        ledger.received("news", a, live=True)
        await await_for(node.url, closed_streams(1), what="A closed")

        # 2. replay after m0 (Last-Event-ID): m1 and m2 from history.
        b = await read_until(node, ["news"], m2, last_event_id=m0, query=token)
        assert [e.data for e in b.events] == ["m1", "m2"]
        ledger.received("news", b, live=False)
        await await_for(node.url, closed_streams(2), what="B closed")

        # 3. a replay from a trimmed position: reset, then what is retained.
        batch = [{"topic": "old", "data": f"o{n}"} for n in range(400)]
        response = await ledger.publish(batch)
        old = [r["id"] for r in response.json()["results"]]
        c = await read_until(node, ["old"], old[-1], last_event_id=old[0], query=token)
        assert c.events[0].event == "reset"
        assert orjson.loads(c.events[0].data)["reason"] == "trimmed"
        ledger.received("old", c, live=False)
        await await_for(node.url, closed_streams(3), what="C closed")

        # 4. a 403 (a topic the token does not grant), and refused publishes.
        async with httpx.AsyncClient(base_url=node.url, timeout=10) as http:
            forbidden = await http.get(f"/events?topic=secret{token}")
            assert forbidden.status_code == 403, forbidden.text
            assert forbidden.json()["error"] == "forbidden_topic"
        denied = await ledger.publish({"topic": "news", "data": "no"}, NOT_A_PUBLISHER)
        assert denied.status_code == 403, denied.text
        invalid = await ledger.publish(b"{not json")
        assert invalid.status_code == 400, invalid.text

        # 5. a slow consumer on a full node: a refusal, then it is shed.
        # subscribed once it has read ': ok' (StalledReader returns only then)
        stalled.append(await asyncio.to_thread(StalledReader, node.port, f"topic=slow{token}"))
        async with (
            httpx.AsyncClient(base_url=node.url, timeout=10) as http,
            http.stream("GET", f"/events?topic=news{token}", headers=EVENT_STREAM) as refused,
        ):
            await refused.aread()
            assert refusal_of(refused).reason == "too_many_connections"
        big: list[str] = []
        while True:
            assert len(big) < 2000, "the stalled client was never shed"
            big.append(await ledger.publish_one("slow", BIG))
            frames = ledger.frames + len(big)
            samples = await await_for(node.url, _frames_are(frames))
            if samples.get(disconnects("slow_consumer")) == 1:
                break
        size = next(iter(ledger.frame_sizes("slow").values()))
        # every frame reached the stalled client until it was shed (the last one shed it)
        ledger.frames += len(big)
        ledger.delivered += len(big)
        ledger.bytes += len(big) * size
        await await_for(node.url, closed_streams(4), what="the slow consumer shed")

    asyncio.run(session())
    assert ledger.frames > 3

    samples = scrape(node.url)
    expected = {
        "sse_connections": 0,
        "sse_connections_opened_total": 4,
        k("sse_connection_attempts_total", outcome="accepted"): 4,
        k("sse_connection_attempts_total", outcome="forbidden_topic"): 1,
        k("sse_connection_attempts_total", outcome="too_many_connections"): 1,
        k("sse_streams_refused_total", reason="too_many_connections"): 1,
        k("sse_requests_rejected_total", status="403"): 2,
        k("sse_requests_rejected_total", status="400"): 1,
        disconnects("client_closed"): 3,
        disconnects("slow_consumer"): 1,
        "sse_live_frames_total": ledger.frames,
        "sse_events_delivered_total": ledger.delivered,
        "sse_bytes_delivered_total": ledger.bytes,
        "sse_events_replayed_total": ledger.replayed,
        k("sse_resets_total", reason="trimmed"): 1,
        "sse_events_published_total": ledger.published,
        "sse_publish_to_dispatch_seconds_count": ledger.frames,
        "sse_hub_topics": 0,
        "sse_engine_link_up": 1,
        "sse_node_ready": 1,
        "sse_engine_reconnects_total": 0,
        "sse_engine_backfilled_events_total": 0,
        "sse_engine_probe_failures_total": 0,
        k("sse_redis_command_seconds_count", command="publish"): ledger.engine_publishes,
        k("sse_build_info", version=version("sse-gateway"), python=platform.python_version()): 1,
    }
    for outcome, count in ledger.publish_outcomes.items():
        expected[k("sse_publish_requests_total", outcome=outcome)] = count
    assert ledger.publish_outcomes.keys() == {"accepted", "forbidden_topic", "invalid_json"}
    actual = {key: samples.get(key) for key in expected}
    assert actual == expected
    # nothing else was counted under these names
    for name in (
        "sse_connection_attempts_total",
        "sse_disconnects_total",
        "sse_resets_total",
        "sse_publish_requests_total",
        "sse_streams_refused_total",
        "sse_requests_rejected_total",
    ):
        assert set(family(samples, name)) <= set(expected), family(samples, name)


def test_a_lost_link_counts_one_reconnect_and_exactly_its_backfill(
    gateway_factory: GatewayFactory, redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    """The pub/sub link is killed and kept from reconnecting (Redis at its client limit) while
    five events are published: they come by backfill, counted as such, and the link is
    counted down, then up again once, however many connects were refused meanwhile."""
    node = gateway_factory("--prefix", prefix, "--probe-interval", "0", redis_url=redis_url)
    limit = redis_client.config_get("maxclients")["maxclients"]
    assert limit is not None

    async def scenario() -> None:
        with Publisher.from_url(redis_url, prefix=prefix) as pub:
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                stream, reading = open_stream(client, node.url, ["t"])
                try:
                    # live, and the publisher connected, before Redis refuses new clients
                    await first_event(stream, lambda: pub.publish("t", "before"))
                    before = await await_for(node.url, lambda s: s["sse_engine_link_up"] == 1)
                    assert before["sse_engine_reconnects_total"] == 0
                    redis_client.config_set("maxclients", 1)
                    try:
                        redis_client.client_kill_filter(_type="pubsub")
                        await await_for(node.url, lambda s: s["sse_engine_link_up"] == 0)
                        missed = [pub.publish("t", f"missed-{n}") for n in range(5)]
                    finally:
                        redis_client.config_set("maxclients", limit)
                    await stream.wait_for(lambda s: any(e.id == missed[-1] for e in s.events))
                    after = await await_for(node.url, lambda s: s["sse_engine_link_up"] == 1)
                finally:
                    reading.cancel()
                    await asyncio.gather(reading, return_exceptions=True)
        assert after["sse_engine_reconnects_total"] == 1
        assert after["sse_engine_backfilled_events_total"] == 5
        assert after["sse_node_ready"] == 1
        # backfilled events reach the hub as frames from the engine, like live ones
        assert after["sse_live_frames_total"] == before["sse_live_frames_total"] + 5
        assert after["sse_events_delivered_total"] == before["sse_events_delivered_total"] + 5

    asyncio.run(scenario())


def test_the_in_memory_engine_reports_its_link_up_and_the_node_ready(
    gateway_factory: GatewayFactory,
) -> None:
    """No link to lose: the alert on ``sse_engine_link_up`` stays quiet for such a node."""
    samples = scrape(gateway_factory().url)
    assert samples["sse_engine_link_up"] == 1
    assert samples["sse_node_ready"] == 1
    assert samples["sse_engine_reconnects_total"] == 0
    assert not family(samples, "sse_redis_command_seconds_count")
