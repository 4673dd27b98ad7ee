"""One SSE connection's delivery state, as a small state machine with no I/O (in the manner of
h11): it takes frames and the time, and gives back bytes to write and decisions.

Phases::

    REPLAYING ──go_live()──► LIVE ──close()──► CLOSING ──finished()──► CLOSED
        └───────────────────close()──────────────┘

- REPLAYING: live frames are held (:class:`HeldFrames`, within ``max_pending`` bytes) while the
  driver sends the replay through :meth:`Session.replay_page`.
- LIVE: each live frame goes through the per-client rule (:meth:`Session.offer`); what passes is
  queued in :attr:`Session.out` for the driver or the hub to write.
- CLOSING: the stream ends. A shed client (:attr:`CloseReason.shed`) loses what is queued; any
  other is sent it and a farewell first.
- CLOSED: nothing more is written.

The per-client rule, once for replay, release and live: a connection delivers only ids strictly
greater than the last id it delivered (``last_key``), and of those only the ``types`` asked for;
an id skipped by ``types`` still moves the position (``behind``), so a position line (``id:``
without data) can tell the client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from enum import Enum, StrEnum
from typing import Protocol

from gateway.engines.base import Frame, HeldFrames, release
from publisher.protocol import comment, key_to_id

PING = comment("ping")

log = logging.getLogger("gateway.session")


class Phase(Enum):
    REPLAYING = "replaying"
    LIVE = "live"
    CLOSING = "closing"
    CLOSED = "closed"


class CloseReason(StrEnum):
    """Why a stream ended: the ``reason`` label of ``sse_disconnects_total`` and of the
    ``stream closed`` log line."""

    CLIENT_CLOSED = "client_closed"
    SLOW_CONSUMER = "slow_consumer"
    SEND_TIMEOUT = "send_timeout"
    MAX_LIFETIME = "max_lifetime"
    TOKEN_EXPIRED = "token_expired"
    HISTORY_LOST = "history_lost"
    SHUTDOWN = "shutdown"
    ENGINE_UNAVAILABLE = "engine_unavailable"
    HISTORY_UNREADABLE = "history_unreadable"
    CLOSED = "closed"
    """Ended with no other reason recorded (the driver itself failed)."""

    @property
    def shed(self) -> bool:
        """A close that sheds load: what is queued is dropped and the connection aborted rather
        than flushed (its peer may not be reading)."""
        return self in _SHED


_SHED = frozenset({CloseReason.SLOW_CONSUMER, CloseReason.SEND_TIMEOUT})

NOT_QUEUED = 0
QUEUED = 1
FIRST = 2
""":meth:`Session.offer`: queued, and nothing was pending before (the session became dirty)."""


class Sink(Protocol):
    """Where a session's bytes go (``gateway.sinks``): the hub flushes it at the end of a turn
    in which the session queued bytes, and asks it how much its client has not read."""

    def flush(self, session: Session, now: float) -> None: ...
    def buffered(self) -> int: ...


class Session:
    """The delivery state of one connection. The driver (``gateway.stream``) and the hub call
    it; it never awaits and never writes."""

    __slots__ = (
        "behind",
        "events",
        "framing",
        "held",
        "known",
        "last_key",
        "last_write",
        "listener",
        "max_pending",
        "out",
        "out_bytes",
        "out_events",
        "phase",
        "reason",
        "sink",
        "skipped",
        "stalled_since",
        "topics",
        "types",
    )

    def __init__(
        self, topics: tuple[str, ...], types: frozenset[bytes] | None, max_pending: int
    ) -> None:
        self.topics = topics
        self.types = types
        self.max_pending = max_pending
        self.phase = Phase.REPLAYING
        self.reason: CloseReason | None = None
        self.last_key = 0
        """The last id delivered (or skipped by ``types``): the per-client rule's floor."""
        self.known = 0
        """An id the client's position may move to once live (the clock a replay read)."""
        self.behind = False
        """Ids skipped by ``types`` moved ``last_key`` past the last id the client was sent."""
        self.skipped = False
        self.held: HeldFrames[Frame] | None = HeldFrames(max_pending)
        """Live frames kept while the replay is sent, within ``max_pending`` bytes; past that
        they are dropped, and the replay reads on to a newer clock instead."""
        self.framing: Callable[[bytes], bytes] | None = None
        """Set when the hub writes this session's bytes to its transport itself: how one write
        is framed there (a live frame then comes already framed, once per node)."""
        self.out: list[bytes] = []
        """Bytes to write, in order (framed when ``framing`` is set)."""
        self.out_bytes = 0
        self.out_events = 0
        self.events = 0
        """Events written to this client (live and replay), for its closing log line."""
        self.last_write = 0.0
        self.stalled_since: float | None = None
        self.listener: Callable[[Session], None] | None = None
        """Told once, when the session starts closing (the driver wakes on it)."""
        self.sink: Sink | None = None
        """The driver's: where the hub writes this session's bytes at the end of a turn."""

    @property
    def closed(self) -> bool:
        """Closing or closed: no frame is taken any more."""
        return self.phase is Phase.CLOSING or self.phase is Phase.CLOSED

    # -- the replay --------------------------------------------------------------------------

    def start_replay(self, after: int, known: int) -> None:
        """The replay delivers ids above ``after``; once live, the position may move to
        ``known`` (the clock the replay read) even if no event reached it."""
        self.last_key = after
        self.known = known

    def replay_page(self, page: Sequence[Frame], budget: int) -> tuple[list[bytes], int, int]:
        """One page of the replay (in id order) as writes of about ``budget`` bytes each, with
        the events and bytes they hold."""
        types = self.types
        writes: list[bytes] = []
        chunk: list[bytes] = []
        size = sent = sent_bytes = 0
        for frame in page:
            self.last_key = frame.key
            if types is not None and frame.event not in types:
                self.skipped = True
                continue
            self.skipped = False
            chunk.append(frame.data)
            size += len(frame.data)
            sent += 1
            if size >= budget:
                writes.append(b"".join(chunk))
                chunk, size = [], 0
        if chunk:
            writes.append(b"".join(chunk))
        sent_bytes = sum(len(w) for w in writes)
        self.events += sent
        return writes, sent, sent_bytes

    def replay_ended(self, complete: bool) -> bytes | None:
        """The position line owed after a replay whose last events ``types`` skipped (none
        when the replay stopped at a gap: the client must not pass it)."""
        if not (self.skipped and complete):
            return None
        self.skipped = False
        return self.position_line()

    def read_on(self) -> bool:
        """Whether live frames overflowed what is held, so the replay must read on to a newer
        clock before going live (the held frames are then held afresh)."""
        held = self.held
        if held is None or not held.dropped:
            return False
        held.again()
        return True

    def go_live(self, after: int = 0) -> tuple[int, int]:
        """The replay is sent (through id ``after``, if it moved past ``last_key``): queue the
        held frames that pass the per-client rule, then take live frames. Returns the events
        and bytes so queued."""
        held, self.held = self.held, None
        if self.phase is not Phase.REPLAYING:
            return 0, 0
        self.last_key = max(self.last_key, after)
        self.phase = Phase.LIVE
        events = size = 0
        if held is not None:
            for frame in release(held.items, self.last_key, _key):
                if self._admit(frame):
                    self._queue(frame.data, 1)
                    events += 1
                    size += len(frame.data)
        self.last_key = max(self.last_key, self.known)
        return events, size

    def live_from(self, through: int) -> None:
        """Go live at once, with nothing to replay: a client with no position gets every live
        frame newer than ``through`` (the node's position as it joined). The same as
        ``start_replay(through, through)`` then ``go_live()`` with nothing held."""
        if self.phase is not Phase.REPLAYING:
            return
        self.held = None
        self.last_key = self.known = through
        self.phase = Phase.LIVE

    # -- live --------------------------------------------------------------------------------

    def offer(self, frame: Frame, wire: bytes) -> int:
        """A live frame (``wire``: the same, framed once per node for a session with
        ``framing``). Returns :data:`NOT_QUEUED`, :data:`QUEUED` or :data:`FIRST`."""
        held = self.held
        if held is not None:
            held.hold(frame, len(frame.data))
            return NOT_QUEUED
        if self.phase is not Phase.LIVE:
            return NOT_QUEUED
        key = frame.key
        if key <= self.last_key:
            return NOT_QUEUED
        self.last_key = key
        if self.types is not None and frame.event not in self.types:
            self.behind = True
            return NOT_QUEUED
        return self._queue(frame.data if self.framing is None else wire, 1)

    def _admit(self, frame: Frame) -> bool:
        """The per-client rule for one frame."""
        if frame.key <= self.last_key:
            return False
        self.last_key = frame.key
        if self.types is not None and frame.event not in self.types:
            self.behind = True
            return False
        return True

    def _queue(self, data: bytes, events: int) -> int:
        out = self.out
        first = not out
        out.append(data)
        self.out_events += events
        self.out_bytes += len(data)
        if self.framing is None and self.out_bytes > self.max_pending:
            self.close(CloseReason.SLOW_CONSUMER)
            return QUEUED
        return FIRST if first else QUEUED

    def write_raw(self, data: bytes) -> int:
        """Queue bytes that are not an event (a comment, a position line)."""
        if self.closed:
            return NOT_QUEUED
        return self._queue(data if self.framing is None else self.framing(data), 0)

    def take(self) -> bytes:
        """Everything queued, as one write (counted as written)."""
        out = self.out
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self.events += self.out_events
        self.out_events = self.out_bytes = 0
        return data

    def flush(self, buffered: int, closing: bool, now: float) -> bytes | None:
        """What to write to a transport that holds ``buffered`` unsent bytes, or None: nothing
        queued, or the client is gone or shed (past ``max_pending`` bytes unread)."""
        if not self.out or self.closed:
            return None
        if closing:
            self.close(CloseReason.CLIENT_CLOSED)
            return None
        if buffered + self.out_bytes > self.max_pending:
            self.close(CloseReason.SLOW_CONSUMER)
            return None
        self.last_write = now
        return self.take()

    def position_line(self) -> bytes:
        """An id with no data: the browser adopts it as its Last-Event-ID without an event, so
        a reconnect does not replay what the ``types`` filter already skipped."""
        self.behind = False
        return b"id: " + key_to_id(self.last_key).encode() + b"\n\n"

    # -- time --------------------------------------------------------------------------------

    def heartbeat(self, quiet_since: float, through: int | None) -> int:
        """A ping for a live client written nothing since ``quiet_since``, with a position line
        when ``through`` (every live frame through that id was delivered) passes its position.
        Returns what :meth:`write_raw` returns (:data:`NOT_QUEUED` when none is due)."""
        if self.phase is not Phase.LIVE or self.out or self.last_write > quiet_since:
            return NOT_QUEUED
        if through is not None and through > self.last_key:
            self.last_key = through
            self.behind = True
        return self.write_raw(self.position_line() + PING if self.behind else PING)

    def stall(self, buffered: int, now: float, send_timeout: float) -> bool:
        """Whether a client whose transport has held unread bytes for ``send_timeout`` seconds
        is dropped (as a stuck write would be); closes it as ``send_timeout`` if so."""
        if not buffered:
            self.stalled_since = None
        elif self.stalled_since is None:
            self.stalled_since = now
        elif now - self.stalled_since > send_timeout:
            self.close(CloseReason.SEND_TIMEOUT)
            return True
        return False

    # -- the end -----------------------------------------------------------------------------

    def close(self, reason: str, farewell: bytes = b"") -> bool:
        """Stop taking frames (the first reason counts). A shed client loses what is queued;
        any other is sent it and ``farewell`` before its stream ends. Returns whether this
        call closed it."""
        if self.closed:
            return False
        why = CloseReason(reason)
        self.phase = Phase.CLOSING
        self.reason = why
        self.held = None
        if why.shed:
            self.out.clear()
            self.out_bytes = self.out_events = 0
        elif farewell:
            self._queue(farewell if self.framing is None else self.framing(farewell), 0)
        listener = self.listener
        if listener is not None:
            self.listener = None
            try:
                listener(self)
            except Exception:
                # The caller may be the hub in the middle of a fan-out: one session's driver
                # must never stop the others' delivery.
                log.exception("a stream's close listener failed")
        return True

    def finished(self) -> CloseReason:
        """The driver wrote what it owed: the session is over. Returns the close reason."""
        if not self.closed:
            self.close(CloseReason.CLOSED)
        self.phase = Phase.CLOSED
        self.out.clear()
        self.sink = None
        assert self.reason is not None
        return self.reason


def _key(frame: Frame) -> int:
    return frame.key
