"""The embedded engine: one process, no Redis, the same ids, retention and replay rules."""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict, deque
from collections.abc import Sequence

from gateway.engines.base import Engine, Frame, Head, History, Position, Replay, TopicRead
from publisher.protocol import DEFAULT_IDEMPOTENCY_TTL, Message, Retention, key_to_id


class _History:
    __slots__ = ("entries", "max_deleted")

    def __init__(self) -> None:
        self.entries: deque[Frame] = deque()
        self.max_deleted = 0


class MemoryEngine(Engine):
    name = "memory"

    def __init__(
        self, retention: Retention | None = None, idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL
    ) -> None:
        super().__init__()
        self.retention = retention or Retention()
        self.idempotency_ttl = idempotency_ttl
        self._published: OrderedDict[str, tuple[str, float]] = OrderedDict()
        """Idempotency key -> (id, expiry), oldest first."""
        self._clock: int | None = None
        self._origin: int | None = None
        self._histories: dict[str, _History] = {}
        self._subscribed: set[str] = set()

    async def start(self) -> None:
        self.observer.link(True)  # in-process: there is no link to lose

    async def close(self) -> None:
        self._subscribed.clear()

    async def ready(self) -> bool:
        return True

    async def subscribe(self, topic: str) -> None:
        self._subscribed.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        self._subscribed.discard(topic)

    def _next_id(self) -> str:
        now = int(time.time() * 1000) << 64
        key = now if self._clock is None or now > self._clock else self._clock + 1
        self._clock = key
        if self._origin is None:
            self._origin = key
        return key_to_id(key)

    def _forget_quiet(self, now_key: int) -> None:
        """Drop the histories whose newest entry is past the retention age (the Redis engine's
        streams expire then): memory stays bounded however many topics come and go."""
        if not self.retention.max_age:
            return
        oldest = now_key - (int(self.retention.max_age * 1000) << 64)
        while self._histories:
            topic, history = next(iter(self._histories.items()))
            if history.entries and history.entries[-1].key >= oldest:
                return
            del self._histories[topic]

    def _trim(self, history: _History, now_key: int) -> None:
        entries = self.retention.max_events
        oldest = now_key - (int(self.retention.max_age * 1000) << 64)
        while history.entries and (
            len(history.entries) > entries
            or (self.retention.max_age and history.entries[0].key < oldest)
        ):
            history.max_deleted = history.entries.popleft().key

    async def publish(self, message: Message) -> str:
        """As the publish script: a key is remembered per scope and topic set (see
        ``idempotency_digest``), and a topic left quiet for the retention age is forgotten."""
        now = time.monotonic()
        while self._published and next(iter(self._published.values()))[1] <= now:
            self._published.popitem(last=False)
        digest = message.idempotency_digest
        if seen := self._published.get(digest):
            return seen[0]
        event_id = self._next_id()
        if message.remember:
            self._published[digest] = (event_id, now + self.idempotency_ttl)
        frame = Frame.from_body(event_id, message.body)
        for topic in message.topics:
            # Re-inserted, so the histories stay ordered by their last publish.
            history = self._histories.pop(topic, None) or _History()
            self._histories[topic] = history
            history.entries.append(frame)
            self._trim(history, frame.key)
        self._forget_quiet(frame.key)
        for topic in message.topics:
            if topic in self._subscribed:
                self.on_frame(topic, frame)
        return event_id

    async def replay(
        self, topics: Sequence[str], position: Position | None, *, clock: int | None = None
    ) -> Replay:
        replay = Replay(_MemoryHistory(self), topics, position, max_age=self.retention.max_age)
        await replay.open(clock)
        return replay

    def delivered_through(self) -> int | None:
        """The clock: each publish hands its frame to ``on_frame`` before it returns."""
        return self._clock


class _MemoryHistory(History):
    """The histories as a paged replay reads them: each entry's back-link is the entry before
    it, or for the oldest, the newest one retention removed."""

    def __init__(self, engine: MemoryEngine) -> None:
        self.engine = engine

    async def head(self) -> Head:
        """The engine's time is the later of the wall clock and the clock's: a topic is
        forgotten at a publish more than the retention age after its last one (by id)."""
        clock = self.engine._clock
        now_ms = max(int(time.time() * 1000), (clock or 0) >> 64)
        return Head(clock, self.engine._origin, now_ms)

    async def read(self, requests: Sequence[tuple[str, int, int]]) -> list[TopicRead]:
        results: list[TopicRead] = []
        for topic, after, count in requests:
            history = self.engine._histories.get(topic)
            if history is None:
                results.append([])
                continue
            entries = history.entries
            start = bisect.bisect_right(entries, after, key=lambda f: f.key)
            page = []
            prev = entries[start - 1].key if start else history.max_deleted
            for index in range(start, min(start + count, len(entries))):
                frame = entries[index]
                page.append((frame, prev))
                prev = frame.key
            results.append(page)
        return results
