"""The hub as a specification: the topic table, dispatch and the end-of-turn flush.

The embedded engine, fake sinks and a fake clock (``Hub.beat(now)``): no socket, no Redis, no
sleep. Each scenario runs in its own event loop and takes milliseconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from gateway.allocator import Reclaimer
from gateway.engines.memory import MemoryEngine
from gateway.hub import Hub
from gateway.metrics import Metrics
from gateway.session import PING, CloseReason, Session
from gateway.sinks import http_chunk
from publisher.protocol import make_message


class FakeSink:
    """A direct sink with a transport that never sends: it records what the hub wrote."""

    def __init__(self, buffered: int = 0) -> None:
        self.writes: list[bytes] = []
        self.pending = buffered
        self.closing = False

    def flush(self, session: Session, now: float) -> None:
        data = session.flush(self.pending, self.closing, now)
        if data is not None:
            self.writes.append(data)

    def buffered(self) -> int:
        return self.pending


def run(scenario: Callable[[Hub, MemoryEngine], Awaitable[None]], **options: float) -> None:
    async def main() -> None:
        engine = MemoryEngine()
        await engine.start()
        hub = Hub(engine, Metrics(), **options)
        await scenario(hub, engine)
        await hub.close()

    asyncio.run(main())


async def live_session(hub: Hub, *topics: str, types: frozenset[bytes] | None = None) -> Session:
    """A session past its (empty) replay, on a direct sink."""
    session = Session(topics, types, 10_000)
    await hub.attach(session)
    session.start_replay(0, 0)
    session.go_live()
    session.framing = http_chunk
    session.sink = FakeSink()
    return session


def sink_of(session: Session) -> FakeSink:
    assert isinstance(session.sink, FakeSink)
    return session.sink


async def end_of_turn() -> None:
    await asyncio.sleep(0)


async def publish(engine: MemoryEngine, topics: str | list[str], data: str) -> str:
    return await engine.publish(make_message(topics, data))


def test_a_turn_of_frames_is_one_write_per_session_framed_once_per_node() -> None:
    async def scenario(hub: Hub, engine: MemoryEngine) -> None:
        a = await live_session(hub, "t")
        b = await live_session(hub, "t")
        for n in range(3):
            await publish(engine, "t", f"e{n}")
        assert sink_of(a).writes == []  # nothing is written before the end of the turn
        await end_of_turn()
        assert len(sink_of(a).writes) == 1
        assert sink_of(a).writes == sink_of(b).writes
        assert sink_of(a).writes[0].count(b"data: ") == 3
        assert a.events == b.events == 3

    run(scenario)


def test_the_same_framed_bytes_reach_every_session() -> None:
    async def scenario(hub: Hub, engine: MemoryEngine) -> None:
        a = await live_session(hub, "t")
        b = await live_session(hub, "t")
        await publish(engine, "t", "shared")
        assert a.out[0] is b.out[0]

    run(scenario)


def test_a_multi_topic_publish_reaches_a_client_of_both_topics_once() -> None:
    async def scenario(hub: Hub, engine: MemoryEngine) -> None:
        both = await live_session(hub, "a", "b")
        await publish(engine, ["a", "b"], "once")
        await end_of_turn()
        assert sink_of(both).writes[0].count(b"data: ") == 1

    run(scenario)


def test_a_session_still_replaying_holds_live_frames() -> None:
    async def scenario(hub: Hub, engine: MemoryEngine) -> None:
        replaying = Session(("t",), None, 10_000)
        await hub.attach(replaying)
        replaying.sink = FakeSink()
        await publish(engine, "t", "held")
        await end_of_turn()
        assert sink_of(replaying).writes == []
        assert replaying.held is not None
        assert len(replaying.held.items) == 1

    run(scenario)


def test_the_topic_table_subscribes_once_and_lets_go_after_the_linger() -> None:
    async def scenario(hub: Hub, engine: MemoryEngine) -> None:
        a = await live_session(hub, "t")
        b = await live_session(hub, "t")
        assert hub.topic_count == 1
        hub.detach(a)
        hub.detach(b)
        assert hub.topic_count == 1  # lingers
        for _ in range(10):  # the linger (0 s) is a loop timer: due at the next turns
            await end_of_turn()
        assert hub.topic_count == 0
        c = await live_session(hub, "t")
        assert hub.topic_count == 1
        await publish(engine, "t", "again")
        await end_of_turn()
        assert len(sink_of(c).writes) == 1

    run(scenario, linger=0.0)


def test_a_session_joins_with_nothing_to_wait_for_only_on_topics_already_followed() -> None:
    """``following`` is what lets a stream open below the request cycle: a topic whose
    subscribe is still in flight is not followed yet."""

    async def scenario(hub: Hub, engine: MemoryEngine) -> None:
        assert not hub.following(("t",))
        first = Session(("t",), None, 10_000)
        _, waits = hub.join(first)
        assert len(waits) == 1
        assert not hub.following(("t",))
        await waits[0]
        assert hub.following(("t",))
        assert not hub.following(("t", "u"))
        second = Session(("t",), None, 10_000)
        assert hub.join(second)[1] == []
        assert hub.subscribers == {first, second}

    run(scenario)


def test_a_lost_history_ends_the_streams_of_those_topics_only() -> None:
    async def scenario(hub: Hub, engine: MemoryEngine) -> None:
        lost = await live_session(hub, "lost")
        kept = await live_session(hub, "kept")
        engine.on_lost(["lost"])
        assert lost.reason is CloseReason.HISTORY_LOST
        assert not kept.closed

    run(scenario)


def test_a_quiet_session_gets_a_ping_per_heartbeat_with_the_node_position() -> None:
    async def scenario(hub: Hub, engine: MemoryEngine) -> None:
        quiet = await live_session(hub, "quiet")
        event_id = await publish(engine, "elsewhere", "moves the clock")
        hub.beat(now=quiet.last_write + 14.0)
        await end_of_turn()
        assert sink_of(quiet).writes == []
        hub.beat(now=quiet.last_write + 15.0)
        await end_of_turn()
        assert sink_of(quiet).writes == [http_chunk(f"id: {event_id}\n\n".encode() + PING)]

    run(scenario, heartbeat=15.0)


def test_a_client_that_does_not_read_for_send_timeout_is_dropped() -> None:
    async def scenario(hub: Hub, engine: MemoryEngine) -> None:
        stuck = await live_session(hub, "t")
        stuck.sink = FakeSink(buffered=100)
        hub.beat(now=1.0)
        hub.beat(now=11.0)
        assert not stuck.closed
        hub.beat(now=11.5)
        assert stuck.reason is CloseReason.SEND_TIMEOUT

    run(scenario, send_timeout=10.0)


def test_a_transport_over_max_pending_sheds_its_session_at_the_flush() -> None:
    async def scenario(hub: Hub, engine: MemoryEngine) -> None:
        slow = await live_session(hub, "t")
        slow.sink = FakeSink(buffered=9_990)
        await publish(engine, "t", "one too many")
        await end_of_turn()
        assert slow.reason is CloseReason.SLOW_CONSUMER
        assert sink_of(slow).writes == []

    run(scenario)


def test_metrics_count_a_dispatch_per_batch() -> None:
    async def scenario(hub: Hub, engine: MemoryEngine) -> None:
        await live_session(hub, "t")
        await live_session(hub, "t")
        for n in range(4):
            await publish(engine, "t", f"e{n}")
        await end_of_turn()
        metrics = hub.metrics
        assert metrics.registry.get_sample_value("sse_live_frames_total") == 4
        assert metrics.registry.get_sample_value("sse_events_delivered_total") == 8

    run(scenario)


def test_close_all_ends_every_session_with_one_reason() -> None:
    async def scenario(hub: Hub, engine: MemoryEngine) -> None:
        sessions = [await live_session(hub, "t") for _ in range(3)]
        hub.close_all("shutdown")
        assert {s.reason for s in sessions} == {CloseReason.SHUTDOWN}

    run(scenario)


def test_attach_returns_the_node_position_every_later_frame_is_newer_than() -> None:
    async def scenario(hub: Hub, engine: MemoryEngine) -> None:
        before = await publish(engine, "t", "before")
        session = Session(("t",), None, 10_000)
        through = await hub.attach(session)
        assert through is not None
        assert f"{through >> 64}-{through & ((1 << 64) - 1)}" == before

    run(scenario)


def test_memory_is_given_back_once_after_a_wave_of_streams_leaves() -> None:
    async def scenario(hub: Hub, engine: MemoryEngine) -> None:
        given_back: list[int] = []
        hub.reclaimer = Reclaimer(wave=3, settle=0.0, action=lambda: given_back.append(1))
        sessions = [await live_session(hub, "t") for _ in range(8)]
        for session in sessions[:3]:
            hub.detach(session)
        await end_of_turn()
        assert given_back == []  # 3 left, but 5 of 8 remain: not a wave
        for session in sessions[3:6]:
            hub.detach(session)
        for _ in range(3):
            await end_of_turn()
        assert given_back == [1]
        hub.detach(sessions[6])
        await end_of_turn()
        assert given_back == [1]  # once per wave

    run(scenario)
