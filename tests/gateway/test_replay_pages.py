"""Issue 10 B: the paged replay (gateway/engines/base.py ``Replay``) read from the embedded
engine's real histories with tiny pages: the merge across topics stays in id order across
pages, each event once, and a gap that retention opens under a replay ends it before the gap,
never past events of another topic that were not read yet."""

from __future__ import annotations

import asyncio
import itertools

from gateway.engines.base import Frame, Position, Replay, ResetReason
from gateway.engines.memory import MemoryEngine, _MemoryHistory
from publisher import Retention, make_message
from publisher.protocol import key_to_id


def publish(engine: MemoryEngine, topics: list[str], data: str) -> str:
    return asyncio.run(engine.publish(make_message(topics, data)))


async def read_all(replay: Replay) -> list[Frame]:
    frames = []
    while page := await replay.next_page():
        assert all(a.key < b.key for a, b in itertools.pairwise(page))
        frames += page
    return frames


def test_tiny_pages_merge_topics_in_id_order_each_event_once() -> None:
    engine = MemoryEngine(Retention(10_000, 0))
    rotation = (["a"], ["b"], ["a", "b"], ["c"], ["a", "c"])
    ids = [publish(engine, rotation[i % 5], f"e{i}") for i in range(500)]

    async def scenario() -> tuple[list[Frame], Replay]:
        replay = Replay(
            _MemoryHistory(engine), ["a", "b", "c"], Position.after("0-0"), page_bytes=200
        )
        await replay.open()
        return await read_all(replay), replay

    frames, replay = asyncio.run(scenario())
    assert replay.reset is None
    assert [f.key for f in frames] == sorted({f.key for f in frames})
    assert len(frames) == len(ids)


def test_a_position_replays_only_what_follows_and_later_events_only_after_extend() -> None:
    engine = MemoryEngine(Retention(10_000, 0))
    ids = [publish(engine, ["a"], f"e{i}") for i in range(50)]

    async def scenario() -> tuple[list[Frame], list[Frame]]:
        replay = Replay(_MemoryHistory(engine), ["a", "b"], Position.after(ids[9]), page_bytes=64)
        await replay.open()
        later = [await engine.publish(make_message(["b"], "later")) for _ in range(3)]
        assert later
        first = await read_all(replay)
        await replay.extend()
        return first, await read_all(replay)

    first, extended = asyncio.run(scenario())
    assert len(first) == 40
    assert len(extended) == 3


def test_a_gap_opened_under_a_replay_ends_it_before_the_gap_and_before_unread_topics() -> None:
    """Retention trims topic ``b`` while the replay is between pages. The replay ends at the
    last event before the gap and sends nothing of ``a`` past where ``a`` was read."""
    engine = MemoryEngine(Retention(100, 0))
    ids = [publish(engine, ["a"] if i % 2 else ["b"], f"e{i}") for i in range(100)]

    async def scenario() -> tuple[list[Frame], Replay]:
        replay = Replay(_MemoryHistory(engine), ["a", "b"], Position.after("0-0"), page_bytes=300)
        await replay.open()
        frames = list(await replay.next_page())
        for i in range(200):  # trims all of b that the replay has not read
            await engine.publish(make_message(["b"], f"more{i}"))
        frames += await read_all(replay)
        return frames, replay

    frames, replay = asyncio.run(scenario())
    assert replay.reset is None
    assert replay.gaps == ["b"]
    sent = [key_to_id(f.key) for f in frames]
    assert sent
    assert len(sent) < len(ids)
    assert sent == ids[: len(sent)], "an event after a missing one was sent"


def test_a_gap_in_the_first_round_is_a_reset() -> None:
    engine = MemoryEngine(Retention(10, 0))
    first = publish(engine, ["a"], "first")
    for i in range(20):
        publish(engine, ["a"], f"e{i}")

    async def scenario() -> Replay:
        replay = Replay(_MemoryHistory(engine), ["a"], Position.after(first), page_bytes=64)
        await replay.open()
        return replay

    replay = asyncio.run(scenario())
    assert replay.reset is not None
    assert replay.reset.reason is ResetReason.TRIMMED


def test_live_frames_held_during_a_replay_stay_within_the_budget() -> None:
    """Issue 10 B: frames held while a replay is sent were unbounded per stream (or ended it
    as a slow consumer); past ``max_pending`` bytes they are now let go, and the stream is told
    to read on from history instead (``held.dropped``)."""
    from gateway.hub import Subscriber

    async def scenario() -> None:
        sub = Subscriber(("a",), None, max_pending=10_000)
        frames = [Frame.from_body(f"{i}-0", b"data: " + b"x" * 994) for i in range(1, 40)]
        held = sub.held
        assert held is not None
        for frame in frames[:5]:
            sub.offer(frame, b"")
        assert held.items == frames[:5]
        assert not held.dropped
        for frame in frames[5:]:
            sub.offer(frame, b"")
            assert sum(len(f.data) for f in held.items) <= 10_000
        assert held.dropped
        assert not sub.closed
        held.again()
        assert held.items == []
        assert not held.dropped
        sub.offer(frames[-1], b"")
        sub.go_live(frames[-2].key)
        assert sub.take() == frames[-1].data

    asyncio.run(scenario())
