"""The engine's pure rules: the back-link scan of a read, and the release of what was held
while history was read. No Redis: plain values, and a fake history for the replay."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from gateway.engines.base import (
    Entry,
    Frame,
    Head,
    HeldFrames,
    History,
    Position,
    Replay,
    TopicRead,
    release,
    scan_links,
)


def frame(ms: int) -> Frame:
    return Frame.from_body(f"{ms}-0", b"data: x\n\n")


def key(ms: int) -> int:
    return ms << 64


def chain(*ms: int, first_prev: int = 0) -> list[Entry]:
    """Entries whose back-links each point at the one before (the first at ``first_prev``)."""
    entries = []
    prev = key(first_prev)
    for m in ms:
        entries.append((frame(m), prev))
        prev = key(m)
    return entries


def test_an_unbroken_chain_is_handed_on_whole() -> None:
    scan = scan_links(chain(2, 3, 4, first_prev=1), key(1), clock=key(10), opening=False)
    assert [f.key for f in scan.frames] == [key(2), key(3), key(4)]
    assert scan.last == key(4)
    assert (scan.missing, scan.gap, scan.past_clock) == (0, False, False)


def test_a_first_entry_pointing_before_the_position_proves_nothing_was_lost() -> None:
    scan = scan_links(chain(5, 6, first_prev=0), key(3), clock=key(10), opening=True)
    assert scan.missing == 0


def test_a_break_in_the_first_read_is_a_reset_to_decide() -> None:
    entries = [*chain(5, first_prev=3), (frame(8), key(7))]  # 7 was trimmed
    scan = scan_links(entries, key(3), clock=key(10), opening=True)
    assert scan.missing == key(7)
    assert [f.key for f in scan.frames] == [key(5), key(8)]
    assert not scan.gap


def test_a_break_in_a_later_read_stops_before_it() -> None:
    entries = [*chain(5, first_prev=3), (frame(8), key(7))]
    scan = scan_links(entries, key(3), clock=key(10), opening=False)
    assert scan.gap
    assert [f.key for f in scan.frames] == [key(5)]
    assert scan.last == key(5)


def test_ids_above_the_clock_only_prove_the_link_before_them() -> None:
    scan = scan_links(chain(5, 6, 12, first_prev=4), key(4), clock=key(10), opening=False)
    assert [f.key for f in scan.frames] == [key(5), key(6)]
    assert scan.past_clock
    assert scan.last == key(6)


def test_release_keeps_what_is_newer_than_what_was_read_in_arrival_order() -> None:
    held = [frame(3), frame(9), frame(7), frame(11)]
    assert release(held, key(7), lambda f: f.key) == [frame(9), frame(11)]
    assert release([], key(7), lambda f: f.key) == []


def test_held_frames_stay_within_their_budget_or_are_all_let_go() -> None:
    held: HeldFrames[str] = HeldFrames(budget=10)
    held.hold("a", 4)
    held.hold("b", 6)
    assert held.items == ["a", "b"]
    held.hold("c", 1)
    assert held.dropped
    assert held.items == []
    held.hold("d", 1)
    assert held.items == []  # nothing is held once dropped, until read on
    held.again()
    held.hold("e", 1)
    assert held.items == ["e"]


class CountingHistory(History):
    def __init__(self, clock: int) -> None:
        self.clock = clock
        self.heads = 0

    async def head(self) -> Head:
        self.heads += 1
        return Head(self.clock, key(1), self.clock >> 64)

    async def read(self, requests: Sequence[tuple[str, int, int]]) -> list[TopicRead]:
        return [[] for _ in requests]


def test_a_replay_with_no_position_opened_at_a_known_clock_reads_nothing() -> None:
    history = CountingHistory(key(50))

    async def scenario() -> None:
        replay = Replay(history, ["t"], None)
        await replay.open(clock=key(40))
        assert history.heads == 0
        assert replay.clock == key(40)
        assert await replay.next_page() == []
        await replay.extend()  # reads on from the known clock to the clock of now
        assert history.heads == 1
        assert replay.clock == key(50)

    asyncio.run(scenario())


def test_a_replay_from_a_position_always_reads_the_clock() -> None:
    history = CountingHistory(key(50))

    async def scenario() -> None:
        replay = Replay(history, ["t"], Position.after("45-0"))
        await replay.open(clock=key(40))  # a known clock only stands in when no position
        assert history.heads == 1
        assert replay.clock == key(50)

    asyncio.run(scenario())
