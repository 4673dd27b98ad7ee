"""What the hub and the stream need from an engine: live frames, replay, publish.

Both engines (Redis, in-memory) implement :class:`Engine` and share the rules of
:func:`check_history`, so a client sees the same replay and ``reset`` behaviour on either.
"""

from __future__ import annotations

import abc
import heapq
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum

from publisher import Message
from publisher._frames import encode_frame, event_name
from publisher._schema import BEGINNING, id_key, since_to_id


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
    """Retention removed events after the position."""
    FUTURE_ID = "future_id"
    """The position is newer than any id this engine has issued."""


@dataclass(frozen=True, slots=True)
class Reset:
    reason: ResetReason
    topics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Replay:
    frames: list[Frame]
    reset: Reset | None
    clock: int
    """The newest id issued when the replay was read (0 when none): later ids arrive live."""


def check_history(
    position: Position,
    topics: Sequence[str],
    clock: int | None,
    origin: int | None,
    trimmed: Iterable[tuple[str, int]],
) -> Reset | None:
    """Whether the events after ``position`` can be replayed in full (see DESIGN.md §4).

    ``trimmed`` pairs each topic with the highest id known to be missing from its history
    (0 when none is).
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
    lost = tuple(topic for topic, deleted in trimmed if deleted > after)
    return Reset(ResetReason.TRIMMED, lost) if lost else None


FrameListener = Callable[[str, Frame], None]
LostListener = Callable[[Sequence[str]], None]


class EngineUnavailable(Exception):
    """The engine cannot serve the request now (e.g. Redis unreachable)."""


class Engine(abc.ABC):
    """Subscribe / replay / publish behind one interface."""

    name: str

    def __init__(self) -> None:
        self.on_frame: FrameListener = lambda topic, frame: None
        self.on_lost: LostListener = lambda topics: None

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

    @abc.abstractmethod
    async def subscribe(self, topic: str) -> None:
        """Return once every frame published to ``topic`` from now on will reach ``on_frame``."""

    @abc.abstractmethod
    async def unsubscribe(self, topic: str) -> None:
        """Stop live frames for ``topic``; calls are applied in the order they are made."""

    @abc.abstractmethod
    async def replay(self, topics: Sequence[str], position: Position | None) -> Replay:
        """The retained events after ``position`` for ``topics``, merged in id order.

        With no position, only the clock is read (nothing is replayed)."""

    @abc.abstractmethod
    async def publish(self, message: Message) -> str: ...


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
