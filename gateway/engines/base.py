"""What the hub and the stream need from an engine: live frames, replay, publish.

Both engines (Redis, in-memory) implement :class:`Engine` and share the rules of
:func:`check_history`, so a client sees the same replay and ``reset`` behaviour on either.
"""

from __future__ import annotations

import abc
import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Generic, NamedTuple, TypeVar

from publisher.protocol import BEGINNING, Message, encode_frame, event_name, id_key, since_to_id


@dataclass(frozen=True, slots=True)
class Frame:
    """One event as a node forwards it: the finished bytes plus what the per-client rule needs."""

    key: int
    data: bytes
    event: bytes

    @classmethod
    def from_body(cls, event_id: str | bytes, body: bytes) -> Frame:
        return cls(id_key(event_id), encode_frame(event_id, body), event_name(body))

    @classmethod
    def from_live(cls, frame: bytes) -> Frame:
        """Parse the ``id:`` line that the publish script put first."""
        end = frame.index(b"\n")
        return cls(id_key(frame[4:end]), frame, event_name(frame[end + 1 :]))


class PositionKind(Enum):
    LAST_EVENT_ID = "last-event-id"
    SINCE = "since"


@dataclass(frozen=True, slots=True)
class Position:
    """Where a replay starts: after an event id, or at a point in time."""

    kind: PositionKind
    event_id: str
    """Last-Event-ID: the last id the client has (exclusive); since: ``<ms>-0`` (inclusive)."""

    @classmethod
    def after(cls, event_id: str) -> Position:
        id_key(event_id)
        return cls(PositionKind.LAST_EVENT_ID, event_id)

    @classmethod
    def since(cls, epoch_ms: int) -> Position:
        return cls(PositionKind.SINCE, since_to_id(epoch_ms))

    @property
    def after_key(self) -> int:
        """Ids strictly greater than this are replayed."""
        key = id_key(self.event_id)
        return key - 1 if self.kind is PositionKind.SINCE and key > 0 else key

    @property
    def from_beginning(self) -> bool:
        return self.after_key == 0 or self.event_id == BEGINNING


class ResetReason(StrEnum):
    HISTORY_LOST = "history_lost"
    """The engine holds no history from before the position (flushed, new, or restarted)."""
    TRIMMED = "trimmed"
    """Retention removed events after the position: trimmed by count or age, or the topic's
    whole history expired after it was quiet for the retention age (see :func:`check_history`)."""
    FUTURE_ID = "future_id"
    """The position is newer than any id this engine has issued."""


@dataclass(frozen=True, slots=True)
class Reset:
    reason: ResetReason
    topics: tuple[str, ...]


class HistoryBroken(Exception):
    """One topic's history cannot be read (a key of another type, malformed entries): only the
    streams of that topic fail."""

    def __init__(self, topic: str, detail: str) -> None:
        super().__init__(f"history of topic {topic!r} is unreadable: {detail}")
        self.topic = topic


Entry = tuple[Frame, int]
"""A retained event and its back-link: the id of the entry before it in the same topic."""
TopicRead = list[Entry] | HistoryBroken


class Head(NamedTuple):
    """What a replay reads first."""

    clock: int | None
    """The newest id issued (None when unknown)."""
    origin: int | None
    """The first id ever issued (None when unknown)."""
    now_ms: int
    """The engine's time, read with the clock (epoch milliseconds): Redis ``TIME``."""


class History(abc.ABC):
    """What a paged replay reads: the clock, and entries of one topic after an id."""

    @abc.abstractmethod
    async def head(self) -> Head:
        """The clock, the origin and the engine's time, read in one round."""

    @abc.abstractmethod
    async def read(self, requests: Sequence[tuple[str, int, int]]) -> list[TopicRead]:
        """For each ``(topic, after, count)``: up to ``count`` entries with ids above
        ``after``, in id order, or why that topic cannot be read."""


EXPIRY_MARGIN = 1.0
"""Seconds by which a position counts as older than the retention age sooner than exact (clock
skew after a failover, ids a little ahead of the time): it errs toward ``reset``."""
REPLAY_PAGE = 1000
"""Most entries read from one topic at a time."""
REPLAY_PAGE_BYTES = 256 * 1024
"""Bytes aimed for in one round of reads, across topics: what one replay holds at a time."""
FIRST_ENTRY_GUESS = 1024


T = TypeVar("T")


class HeldFrames(Generic[T]):
    """Live frames kept while a replay (or a backfill) is read, within ``budget`` bytes. Past
    it, all are dropped (each is in history) and :attr:`dropped` tells the reader to read on
    to a newer clock, after :meth:`again`."""

    __slots__ = ("budget", "dropped", "items", "size")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.items: list[T] = []
        self.size = 0
        self.dropped = False

    def hold(self, item: T, size: int) -> None:
        if self.dropped:
            return
        self.size += size
        if self.size > self.budget:
            self.items.clear()
            self.dropped = True
        else:
            self.items.append(item)

    def again(self) -> None:
        """Hold afresh, before the reader moves to a newer clock."""
        self.items.clear()
        self.size = 0
        self.dropped = False


def release(items: Iterable[T], after: int, key: Callable[[T], int]) -> list[T]:
    """What was held while history was read through id ``after``: the items newer than it, in
    the order they arrived (the rest was in what was read)."""
    return [item for item in items if key(item) > after]


class LinkScan(NamedTuple):
    """What :func:`scan_links` found in one topic's entries."""

    frames: list[Frame]
    """The entries to hand on, in id order: up to the clock, and before any gap."""
    last: int
    """The last id checked against its back-link (where the next read starts)."""
    missing: int
    """In a first read: the highest back-link that skips entries (0 when none does)."""
    gap: bool
    """In a later read: a back-link skips entries; ``frames`` stop before it."""
    past_clock: bool
    """An entry above the clock was reached (it only proved the back-link before it)."""


def scan_links(entries: Sequence[Entry], last: int, clock: int, *, opening: bool) -> LinkScan:
    """Check each entry's back-link against the entry before it (``last`` for the first).

    History after ``last`` is complete when the first entry points back at or before it and
    each later entry points at the one before it. In the first read of a replay (``opening``),
    a break is a ``reset`` to decide (``missing``); later, retention trimmed what was not yet
    read, and the replay must stop before the break (``gap``). Ids above ``clock`` arrive live
    and are not handed on."""
    frames: list[Frame] = []
    missing = 0
    for frame, prev in entries:
        if prev > last:
            if not opening:
                return LinkScan(frames, last, missing, True, False)
            missing = max(missing, prev)
        if frame.key > clock:
            return LinkScan(frames, last, missing, False, True)
        frames.append(frame)
        last = frame.key
    return LinkScan(frames, last, missing, False, False)


class Replay:
    """The retained events after a position, merged in id order across topics and read page by
    page, so a replay holds about :data:`REPLAY_PAGE_BYTES` whatever the history.

    Each round reads the next entries of the topics whose pages were used up; it may release
    only the ids up to the lowest last-read id of the topics not yet exhausted (``bound``), so
    the merge stays in id order across pages. The back-link (``p``) of every entry is checked
    against the entry before it: a gap seen in the first round (or before the position) is a
    ``reset``; a gap seen later (retention trimmed what was not yet read) ends the replay at the
    last id before it, and :attr:`gaps` names the topic.

    :attr:`clock` is read when the replay begins: later ids arrive live. :meth:`extend` moves
    it to the clock of now, for a caller that could not keep the live frames meanwhile.

    ``max_age`` is the retention age of the histories read (0: none): a topic quiet that long
    loses its whole history, which the first round detects by its lack of entries (see
    :func:`check_history`).
    """

    def __init__(
        self,
        history: History | None,
        topics: Sequence[str],
        position: Position | None,
        *,
        drop_broken: bool = False,
        page_bytes: int = REPLAY_PAGE_BYTES,
        max_age: float = 0.0,
    ) -> None:
        self.history = history
        self.topics = tuple(topics)
        self.position = position
        self.drop_broken = drop_broken
        """Drop a topic whose history is broken or has a gap and go on with the others
        (instead of raising :class:`HistoryBroken` / stopping at the gap)."""
        self.page_bytes = page_bytes
        self.max_age = max_age
        self.reset: Reset | None = None
        self.clock = 0
        """The newest id when the replay (or its last :meth:`extend`) began; 0 when none."""
        self.gaps: list[str] = []
        self.broken: list[HistoryBroken] = []
        after = position.after_key if position is not None else 0
        self._last = dict.fromkeys(self.topics, after)
        """Per topic: the last entry checked against its back-link (the position at first)."""
        self._buffers: dict[str, deque[Frame]] = {t: deque() for t in self.topics}
        self._done = dict.fromkeys(self.topics, position is None)
        self._missing = dict.fromkeys(self.topics, 0)
        self._unproven: list[str] = []
        """Topics whose first round shows no entry linked to one at or before the position."""
        self._emitted = -1
        self._stop: int | None = None
        self._opening = False
        self._bytes = 0
        self._entries = 0

    async def open(self, clock: int | None = None) -> None:
        """Read the clock, then (with a position) the first round, and decide the ``reset``.

        ``clock``: with no position, an id through which the caller already has every event
        (the node's own position): nothing is read then, and :meth:`extend` reads on from it."""
        if self.history is None:
            return
        if self.position is None and clock is not None:
            self.clock = clock
            self._last = dict.fromkeys(self.topics, clock)
            return
        started = time.monotonic()
        head = await self.history.head()
        self.clock = head.clock or 0
        if self.position is None:
            self._last = dict.fromkeys(self.topics, self.clock)  # for extend(): from here on
            return
        self._opening = True
        await self._read_round()
        self._opening = False
        horizon = expiry_horizon(head, self.max_age, time.monotonic() - started)
        self.reset = check_history(
            self.position, self.topics, head.clock, head.origin, self._missing.items(),
            unproven=self._unproven, horizon=horizon,
        )  # fmt: skip

    async def extend(self) -> None:
        """Go on reading up to the clock of now (every topic from where it stopped)."""
        if self.history is None or self._stop is not None:
            return
        clock = (await self.history.head()).clock
        if clock is not None and clock > self.clock:
            self.clock = clock
            for topic in self._live_topics():
                self._done[topic] = False

    def _live_topics(self) -> list[str]:
        gone = set(self.gaps) | {b.topic for b in self.broken}
        return [t for t in self.topics if t not in gone]

    async def next_page(self) -> list[Frame]:
        """The next events in id order, each once; empty once everything is sent."""
        page = [f for f in merge_unique(list((await self.next_runs()).values()))
                if f.key > self._emitted]  # fmt: skip
        if page:
            self._emitted = page[-1].key
        return page

    async def next_runs(self) -> dict[str, list[Frame]]:
        """The next events of each topic (each run in id order, every id of a run below every
        id of the next call's runs); empty once everything up to the clock is read."""
        while True:
            runs = self._release()
            if runs or all(self._done.values()):
                return runs
            await self._read_round()

    async def _read_round(self) -> None:
        assert self.history is not None
        wanted = [t for t in self.topics if not self._done[t] and not self._buffers[t]]
        if not wanted:
            return
        size = self._bytes / self._entries if self._entries else FIRST_ENTRY_GUESS
        count = max(1, min(REPLAY_PAGE, int(self.page_bytes / size / len(wanted))))
        results = await self.history.read([(t, self._last[t], count) for t in wanted])
        for topic, result in zip(wanted, results, strict=True):
            if self._stop is not None:
                return
            if isinstance(result, HistoryBroken):
                if not self.drop_broken:
                    raise result
                self.broken.append(result)
                self._drop(topic)
                continue
            self._take(topic, result, count)

    def _take(self, topic: str, entries: list[Entry], count: int) -> None:
        if self._opening and (not entries or entries[0][1] == 0):
            self._unproven.append(topic)  # no entry after the position, or a history begun anew
        scan = scan_links(entries, self._last[topic], self.clock, opening=self._opening)
        if scan.missing:
            self._missing[topic] = max(self._missing[topic], scan.missing)
        self._buffers[topic].extend(scan.frames)
        self._bytes += sum(len(frame.data) for frame in scan.frames)
        self._entries += len(scan.frames)
        if scan.gap:
            self._gap(topic, scan.last)
            return
        self._last[topic] = scan.last
        self._done[topic] = scan.past_clock or len(entries) < count

    def _gap(self, topic: str, last: int) -> None:
        self.gaps.append(topic)
        if self.drop_broken:
            self._drop(topic)
            return
        # Nothing after the last entry before the gap may be sent: the client's position would
        # pass the gap and its reconnect would not be told ``reset``. Nor after what the other
        # topics have been read up to.
        others = [self._last[t] for t in self.topics if t != topic and not self._done[t]]
        self._stop = min([last, *others])
        for name in self.topics:
            self._done[name] = True

    def _drop(self, topic: str) -> None:
        self._buffers[topic].clear()
        self._done[topic] = True

    def _release(self) -> dict[str, list[Frame]]:
        """Every buffered id up to the bound."""
        pending = [self._last[t] for t in self.topics if not self._done[t]]
        bound = min(pending) if pending else self.clock
        if self._stop is not None:
            bound = min(bound, self._stop)
        runs = {}
        for topic, buffer in self._buffers.items():
            run = []
            while buffer and buffer[0].key <= bound:
                run.append(buffer.popleft())
            if run:
                runs[topic] = run
            if self._stop is not None:
                buffer.clear()
        return runs


def expiry_horizon(head: Head, max_age: float, elapsed: float) -> int | None:
    """The id below which a position may predate events of a topic whose whole history expired
    (None when histories have no retention age, so never expire whole).

    ``elapsed``: seconds from reading ``head`` to the end of the reads it is checked against,
    so the horizon stands for the engine's time when those reads ran (or later). Ids ahead of
    the time (a clock set forward) move it with them; :data:`EXPIRY_MARGIN` moves it later."""
    if max_age <= 0:
        return None
    now_ms = max(head.now_ms + math.ceil(elapsed * 1000), (head.clock or 0) >> 64)
    horizon_ms = now_ms - math.floor(max_age * 1000) + math.ceil(EXPIRY_MARGIN * 1000)
    return max(0, horizon_ms) << 64


def check_history(
    position: Position,
    topics: Sequence[str],
    clock: int | None,
    origin: int | None,
    trimmed: Iterable[tuple[str, int]],
    *,
    unproven: Iterable[str] = (),
    horizon: int | None = None,
) -> Reset | None:
    """Whether the events after ``position`` can be replayed in full (docs/architecture.md §4).

    ``trimmed`` pairs each topic with the highest id known to be missing from its history
    (0 when none is).

    ``unproven`` names the topics whose history holds no entry after the position, or whose
    first entry after it began a new history (back-link ``0-0``): no back-link tells whether
    events after the position were lost. With a retention age, a topic's history expires whole
    once nobody publishes to it for that age (the publish script refreshes the stream's TTL at
    every publish; the embedded engine forgets it likewise), so ``horizon``
    (:func:`expiry_horizon`) decides. If an event ``e`` of such a topic was published after the
    position and is gone, its history expired after ``e``, so ``e`` is older than now - max_age
    and below the horizon: a position at or above the horizon cannot have missed anything; one
    below it may have, and is told ``reset: trimmed`` for these topics. So is a position at or
    above the clock: nothing was published after it. The rule holds while the retention age of
    every publisher is at least ``max_age`` (a node with a longer one could miss a loss).
    A position at the beginning asks for what is retained and is not told.
    """
    after = position.after_key
    if not position.from_beginning:
        if clock is None or origin is None:
            if position.kind is PositionKind.LAST_EVENT_ID:
                return Reset(ResetReason.HISTORY_LOST, tuple(topics))
        else:
            if position.kind is PositionKind.LAST_EVENT_ID and after > clock:
                return Reset(ResetReason.FUTURE_ID, tuple(topics))
            if after < origin and not (position.kind is PositionKind.SINCE and after + 1 == origin):
                return Reset(ResetReason.HISTORY_LOST, tuple(topics))
    gone = {topic for topic, deleted in trimmed if deleted > after}
    if (
        horizon is not None
        and clock is not None
        and not position.from_beginning
        and after < min(clock, horizon)
    ):
        gone.update(unproven)
    lost = tuple(topic for topic in topics if topic in gone)
    return Reset(ResetReason.TRIMMED, lost) if lost else None


FrameListener = Callable[[str, Frame], None]
LostListener = Callable[[Sequence[str]], None]


@dataclass(frozen=True, slots=True)
class Health:
    """What ``/readyz`` reports: whether streams can be served, and the state of each part."""

    ready: bool
    detail: dict[str, str]


class EngineUnavailable(Exception):
    """The engine cannot serve the request now (e.g. Redis unreachable)."""


class InvalidStore(EngineUnavailable):
    """The engine holds data this node cannot read (e.g. a clock that is not an id)."""


class EngineObserver:
    """What an engine reports about its own state, for the node's metrics. The app sets one
    (``Engine.set_observer``); the engine knows nothing of what it feeds. Each call is per
    event of the link (a reconnect, a probe, a command round trip), never per frame."""

    def link(self, up: bool) -> None:
        """The live link is up and live (True), or down or backfilling (False)."""

    def reconnected(self) -> None:
        """The live link connected again after it was lost."""

    def backfilled(self, events: int) -> None:
        """A reconnected link handed on ``events`` events read from history."""

    def probe_failed(self) -> None:
        """A self-probe did not come back in time."""

    def command(self, name: str, seconds: float) -> None:
        """One round trip of command ``name`` to the store took ``seconds``."""


class Engine(abc.ABC):
    """Subscribe / replay / publish behind one interface."""

    name: str

    def __init__(self) -> None:
        self.on_frame: FrameListener = lambda topic, frame: None
        self.on_lost: LostListener = lambda topics: None
        self.observer = EngineObserver()

    def set_observer(self, observer: EngineObserver) -> None:
        """Where to report link state and command latency (before :meth:`start`)."""
        self.observer = observer

    def set_listeners(self, on_frame: FrameListener, on_lost: LostListener) -> None:
        """``on_frame`` gets every live frame of a subscribed topic, in id order;
        ``on_lost(topics)`` is called when frames of these topics were missed and cannot be
        recovered from history (their clients must reconnect to be told ``reset``)."""
        self.on_frame = on_frame
        self.on_lost = on_lost

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ready(self) -> bool:
        """Whether the engine can serve subscribers and publishers now."""

    async def health(self) -> Health:
        return Health(await self.ready(), {})

    @abc.abstractmethod
    async def subscribe(self, topic: str) -> None:
        """Return once every frame published to ``topic`` from now on will reach ``on_frame``."""

    @abc.abstractmethod
    async def unsubscribe(self, topic: str) -> None:
        """Stop live frames for ``topic``; calls are applied in the order they are made."""

    @abc.abstractmethod
    async def replay(
        self, topics: Sequence[str], position: Position | None, *, clock: int | None = None
    ) -> Replay:
        """The retained events after ``position`` for ``topics``, opened (clock and first round
        read, ``reset`` decided) and read page by page with :meth:`Replay.next_page`.

        With no position, only the clock is read (nothing is replayed), or nothing at all when
        the caller gives it (``clock``: see :meth:`Replay.open`)."""

    @abc.abstractmethod
    async def publish(self, message: Message) -> str: ...

    async def publish_many(self, messages: Sequence[Message]) -> list[str]:
        """Publish in order and return the ids in order (engines that can send the events
        together override this)."""
        return [await self.publish(message) for message in messages]

    def delivered_through(self) -> int | None:
        """An id through which every live frame of every subscribed topic has reached
        ``on_frame`` (or came before the subscription, so a replay read it), and after which no
        frame at or below it can still arrive; None when unknown (e.g. a link down or
        backfilling). The hub sends it to idle subscribers as their position."""
        return None


def merge_unique(runs: Sequence[Sequence[Frame]]) -> list[Frame]:
    """Merge per-topic runs (each in id order) into one, keeping one copy of shared ids."""
    if len(runs) == 1:
        return list(runs[0])
    merged: list[Frame] = []
    last = -1
    for frame in heapq.merge(*runs, key=lambda f: f.key):
        if frame.key != last:
            merged.append(frame)
            last = frame.key
    return merged
