"""Issue 10 D: Redis links heal from every failure, with a time limit on every wait, and bad
data stays local.

Each scenario runs a real redis-server (the session's, or one of the test's own when it must
be configured or broken) and real gateway processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
import redis

from publisher import Publisher
from tests.conftest import GatewayFactory
from tests.support import redis_server
from tests.support.proxy import BlackholeProxy
from tests.support.sse import SSEStream, collect, first_event, open_stream
from tests.support.waiting import elapsed_until, let_time_pass_async, wait_until_async

BLACKHOLE_SECONDS = 11.0
RECOVERY_LIMIT = 30.0


def readyz(url: str) -> tuple[int | None, dict[str, str]]:
    try:
        response = httpx.get(url + "/readyz", timeout=5)
    except httpx.TransportError:
        return None, {}
    return response.status_code, response.json()


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def ended(stream: SSEStream) -> bool:
    """For :func:`collect`: read until the server ends the stream."""
    return False


def refusals(stream: SSEStream) -> list[dict[str, str]]:
    return [orjson.loads(e.data) for e in stream.events if e.event == "refused"]


# -- Blackhole ----------------------------------------------------------------------------------


@pytest.fixture
def blackhole(redis_url: str) -> Iterator[BlackholeProxy]:
    upstream = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    if upstream.get("host") not in ("127.0.0.1", "localhost"):
        pytest.skip("the blackhole proxy needs a loopback Redis")
    proxy = BlackholeProxy(int(upstream["port"]))
    yield proxy
    proxy.close()


def test_a_node_recovers_by_itself_after_the_network_to_redis_went_black(
    redis_url: str, prefix: str, gateway_factory: GatewayFactory, blackhole: BlackholeProxy
) -> None:
    """Issue 10 D, blackhole: the network to Redis drops every byte for 11 s without closing
    anything, then serves new connections. The pub/sub reconnect used to hang forever (no
    limit on connect, handshake or reads; the probe skipped its check while the link was
    down). Now the node opens a new link by itself: a stream open throughout gets every event,
    those published during the blackhole (backfilled) and after, once and in order, and
    /readyz returns to 200."""
    gateway = gateway_factory(
        "--prefix", prefix, "--probe-interval", "2", "--log-level", "info",
        redis_url=blackhole.url,
    )  # fmt: skip
    published: list[str] = []

    async def scenario() -> tuple[SSEStream, float, float]:
        with Publisher.from_url(redis_url, prefix=prefix) as pub:
            return await run(pub)

    async def run(pub: Publisher) -> tuple[SSEStream, float, float]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
            stream, task = open_stream(http, gateway.url, ["x"])
            try:
                # live (past its replay) before the network goes black
                await first_event(stream, lambda: pub.publish("x", "before"))
                first = len(stream.events)
                blackhole.blackhole()
                end = time.monotonic() + BLACKHOLE_SECONDS
                while time.monotonic() < end:
                    published.append(await asyncio.to_thread(pub.publish, "x", "dark"))
                    await let_time_pass_async(0.5, "two events a second while the network is black")
                blackhole.restore()
                healed = time.monotonic()

                # no signal says when the node's new link is up: publish until one arrives
                async def delivered_after_the_heal() -> bool:
                    published.append(await asyncio.to_thread(pub.publish, "x", "after"))
                    if any(e.data == "after" for e in stream.events):
                        return True
                    assert not stream.closed_by_server, "the stream was ended"
                    return False

                await wait_until_async(
                    delivered_after_the_heal, "an event after the heal", RECOVERY_LIMIT, step=0.2
                )
                delivered = time.monotonic() - healed
                ready = delivered + await asyncio.to_thread(
                    elapsed_until, lambda: readyz(gateway.url)[0] == 200, "/readyz is 200", 15
                )
                last = await asyncio.to_thread(pub.publish, "x", "last")
                published.append(last)
                await stream.wait_for(lambda s: any(e.id == last for e in s.events))
                del stream.events[:first]
            finally:
                await stop(task)
        return stream, delivered, ready

    stream, delivered, ready = asyncio.run(scenario())
    print(f"after the heal: events flow in {delivered:.1f} s, /readyz 200 in {ready:.1f} s")
    received = [e.id for e in stream.events]
    assert received == published, (
        f"{len(received)} received of {len(published)}; missing "
        f"{sorted(set(published) - set(received))[:5]}"
    )
    assert "Traceback" not in gateway.output()


# -- Bad data stays local -----------------------------------------------------------------------


def test_a_wrong_type_key_fails_only_its_own_topic_through_a_pubsub_reconnect(
    redis_url: str, prefix: str, redis_client: redis.Redis, gateway_factory: GatewayFactory
) -> None:
    """Issue 10 D, bad data stays local: one topic's stream key is replaced by a string while
    a client follows it, then the pub/sub link drops. The backfill used to fail in one MULTI
    and be retried forever, so no topic got anything. Now only the broken topic's streams are
    ended (with a clear log line) and the other topics go on; a new stream on the broken topic
    is answered clearly."""
    gateway = gateway_factory("--prefix", prefix, redis_url=redis_url)

    async def scenario() -> tuple[SSEStream, SSEStream, SSEStream]:
        with Publisher.from_url(redis_url, prefix=prefix) as pub:
            return await run(pub)

    async def run(pub: Publisher) -> tuple[SSEStream, SSEStream, SSEStream]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
            good, good_task = open_stream(http, gateway.url, ["good"])
            bad, bad_task = open_stream(http, gateway.url, ["bad"])
            try:
                # both live, each with an id to resume from, before the key breaks
                await first_event(good, lambda: pub.publish("good", "before"))
                await first_event(bad, lambda: pub.publish("bad", "before"))
                redis_client.set(f"{prefix}:s:bad", "oops")
                assert redis_client.client_kill_filter(_type="pubsub") >= 1

                # no signal says when the node has subscribed again: publish until one arrives
                async def good_delivers() -> bool:
                    if any(e.data == "after" for e in good.events):
                        return True
                    assert not good.closed_by_server, "the other topic's stream was ended"
                    await asyncio.to_thread(pub.publish, "good", "after")
                    return False

                await wait_until_async(good_delivers, "the other topic to get an event", 15, 0.2)
                await bad.wait_for(lambda s: s.closed_by_server)
                last = bad.events[-1].id
            finally:
                await stop(good_task)
                await stop(bad_task)
        again = await collect(gateway.url, ["bad"], ended, last_event_id=last)
        return good, bad, again

    _, bad, again = asyncio.run(scenario())
    assert bad.closed_by_server
    assert [r["reason"] for r in refusals(again)] == ["history_unreadable"]
    assert again.closed_by_server
    log = gateway.output()
    assert "history of topic 'bad' is unreadable" in log, log
    assert "Traceback" not in log, log


def test_malformed_entries_fail_a_replay_clearly_and_only_for_streams_of_that_topic(
    redis_url: str, prefix: str, redis_client: redis.Redis, gateway_factory: GatewayFactory
) -> None:
    """Issue 10 D, bad data stays local: entries written to a topic's stream by something other
    than the publish script (no frame body) used to crash the replay ("ASGI callable returned
    without completing response"). Now the stream is answered with a ``refused`` event naming
    the reason, one log line names the topic, and other topics replay as before."""
    gateway = gateway_factory("--prefix", prefix, redis_url=redis_url)
    with Publisher.from_url(redis_url, prefix=prefix) as pub:
        fine = pub.publish("fine", "kept")
        pub.publish("odd", "kept too")
    redis_client.xadd(f"{prefix}:s:odd", {"x": "y"})

    async def scenario() -> tuple[SSEStream, SSEStream]:
        odd = await collect(gateway.url, ["odd", "fine"], ended, last_event_id="0-0")
        other = await collect(
            gateway.url, ["fine"], lambda s: len(s.events) >= 1, last_event_id="0-0"
        )
        return odd, other

    odd, other = asyncio.run(scenario())
    assert [r["reason"] for r in refusals(odd)] == ["history_unreadable"]
    assert odd.closed_by_server
    assert [e.id for e in other.events] == [fine]
    log = gateway.output()
    assert "history of topic 'odd' is unreadable" in log, log
    assert "Traceback" not in log, log
    assert "without completing" not in log, log


# -- The clock -----------------------------------------------------------------------------------


def test_a_garbage_clock_gives_a_clear_answer_not_a_crash(
    redis_url: str, prefix: str, redis_client: redis.Redis, gateway_factory: GatewayFactory
) -> None:
    """Issue 10 D, the clock: a clock key that holds no event id used to crash every stream
    ("ASGI callable returned without completing response"). Now a stream is answered with a
    ``refused`` event it retries, and the log says which key holds what."""
    gateway = gateway_factory("--prefix", prefix, redis_url=redis_url)
    with Publisher.from_url(redis_url, prefix=prefix) as pub:
        pub.publish("t", "before")
    redis_client.set(f"{prefix}:clock", "garbage")

    async def scenario() -> list[SSEStream]:
        resumed = await collect(gateway.url, ["t"], ended, last_event_id="0-0")
        return [resumed, await collect(gateway.url, ["t"], ended)]

    for stream in asyncio.run(scenario()):
        assert [r["reason"] for r in refusals(stream)] == ["engine_unavailable"]
        assert stream.closed_by_server
    log = gateway.output()
    assert f"the clock key '{prefix}:clock' holds b'garbage'" in log, log
    assert "Traceback" not in log, log
    assert "without completing" not in log, log


def test_a_garbage_origin_refuses_fresh_streams_after_the_self_probe_too(
    redis_url: str, prefix: str, redis_client: redis.Redis, gateway_factory: GatewayFactory
) -> None:
    """A self-probe that finds the clock readable does not clear what a replay found: the
    origin key is unreadable too, so a stream without a position (which reads no clock of its
    own on a live node) is refused like one that resumes, not served from that store."""
    gateway = gateway_factory(
        "--prefix", prefix, "--probe-interval", "0.2", redis_url=redis_url
    )  # fmt: skip
    with Publisher.from_url(redis_url, prefix=prefix) as pub:
        pub.publish("t", "before")
    redis_client.set(f"{prefix}:origin", "garbage")
    probes = 'sse_redis_command_seconds_count{command="probe"}'

    async def scenario() -> list[SSEStream]:
        resumed = await collect(gateway.url, ["t"], ended, last_event_id="0-0")
        seen = gateway.metric(probes)
        await wait_until_async(
            lambda: gateway.metric(probes) >= seen + 2, "two self-probes after the refusal", 10
        )
        return [resumed, await collect(gateway.url, ["t"], ended)]

    for stream in asyncio.run(scenario()):
        assert [r["reason"] for r in refusals(stream)] == ["engine_unavailable"]
    log = gateway.output()
    assert f"the origin key '{prefix}:origin' holds b'garbage'" in log, log
    assert "Traceback" not in log, log


def test_start_up_warns_about_an_eviction_policy_and_missing_replicas(
    prefix: str, gateway_factory: GatewayFactory
) -> None:
    """Issue 10 D: at start-up the node warns when Redis may evict the clock (an allkeys-*
    ``maxmemory-policy``) and when ``--publish-replicas`` asks for more replicas than are
    attached."""
    with redis_server.own_redis("--maxmemory-policy", "allkeys-lru") as server:
        gateway = gateway_factory(
            "--prefix", prefix, "--publish-replicas", "1", redis_url=server.url
        )
        gateway.wait_for_output("replica(s) attached")
        log = gateway.output()
        assert "maxmemory-policy is allkeys-lru" in log, log
        assert f"'{prefix}:clock'" in log, log
        assert "--publish-replicas 1, but Redis has 0 replica(s) attached" in log, log


def test_start_up_checks_tolerate_a_redis_that_refuses_config(
    prefix: str, gateway_factory: GatewayFactory
) -> None:
    """Issue 10 D: a managed Redis may disable CONFIG; the node starts and serves anyway."""
    with redis_server.own_redis("--rename-command", "CONFIG", '""') as server:
        gateway = gateway_factory("--prefix", prefix, redis_url=server.url)
        assert readyz(gateway.url)[0] == 200
        assert "maxmemory-policy" not in gateway.output()


# -- A full Redis ------------------------------------------------------------------------------


def test_replays_keep_working_when_redis_refuses_writes_and_readiness_says_so(
    prefix: str, gateway_factory: GatewayFactory
) -> None:
    """Issue 10 D, a full Redis: at ``maxmemory`` under ``noeviction`` every replay used to
    fail (Redis refuses commands queued in MULTI) while /readyz said ready. Now replays read
    without transactions and keep working; /readyz stays 200 (streams are served) and says
    that publishing is refused."""
    with redis_server.own_redis("--maxmemory-policy", "noeviction") as srv:
        with Publisher.from_url(srv.url, prefix=prefix) as pub:
            ids = [pub.publish(["full", "other"], f"e{i}") for i in range(50)]
        gateway = gateway_factory("--prefix", prefix, redis_url=srv.url)
        filler = redis.Redis.from_url(srv.url)
        try:
            for i in range(40):
                filler.set(f"{prefix}:filler:{i}", b"x" * 65536)
            # Full: more data than maxmemory allows, and nothing may be evicted.
            filler.config_set("maxmemory", "1mb")
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                filler.set(f"{prefix}:filler:more", b"x")
        finally:
            filler.close()

        stream = asyncio.run(
            collect(gateway.url, ["full", "other"], lambda s: len(s.events) >= 50,
                    last_event_id="0-0")
        )  # fmt: skip
        assert [e.id for e in stream.events] == ids
        assert not refusals(stream)
        status, body = readyz(gateway.url)
        assert status == 200, body
        assert body["publish"] == "refused"
        assert body["publish_error"] == "out_of_memory"
        assert body["link"] == "up"
