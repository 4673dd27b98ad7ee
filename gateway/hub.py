"""Per-process fan-out: topic -> local subscribers, with ref-counted engine subscriptions.

For each live frame the hub frames the bytes once, as one HTTP/1.1 chunk, and hands that same
bytes object to every subscriber of the topic: no JSON, no coroutine, no task wake-up per
(event, subscriber). A live subscriber on a transport the hub may write to (``go_direct``)
gets the frames of one loop iteration (one read from Redis) joined into a single
``transport.write`` at the end of that iteration: one syscall per client per batch, however
many frames the batch holds. Other subscribers (replay in progress, another HTTP
implementation) fall back to a writer task that joins whatever is pending.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

from gateway.engines.base import Engine, Frame, HeldFrames
from gateway.metrics import Metrics
from publisher.protocol import comment, key_to_id

log = logging.getLogger("gateway.hub")

PING = comment("ping")
SHED_REASONS = frozenset({"slow_consumer", "send_timeout"})
"""Closes that shed load: the writer is cancelled at once (it may be stuck waiting for a peer
that does not read) and the transport is aborted rather than flushed."""


class Transport(Protocol):
    """What the hub needs of an asyncio (or uvloop) transport to write to it directly."""

    def write(self, data: bytes) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def is_closing(self) -> bool: ...


def http_chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a ``Transfer-Encoding: chunked`` body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class Subscriber:
    """One SSE connection's delivery state.

    Until :meth:`go_live`, live frames are held (the replay is still being read); after it,
    the per-client rule applies: only ids greater than the last one delivered get through.
    """

    __slots__ = (
        "behind",
        "chunks",
        "closed",
        "direct",
        "dirty",
        "events",
        "held",
        "last_key",
        "last_write",
        "max_pending",
        "pending_bytes",
        "raw",
        "reason",
        "stalled_since",
        "topics",
        "types",
        "wake",
        "wire",
        "writer",
    )

    def __init__(
        self, topics: tuple[str, ...], types: frozenset[bytes] | None, max_pending: int
    ) -> None:
        self.topics = topics
        self.types = types
        self.max_pending = max_pending
        self.last_key = 0
        self.events = 0
        """Events queued to this client (live and replay), for its closing log line; a
        direct client's are counted per write, not per frame (``raw``: what is not events)."""
        self.raw = 0
        self.chunks: list[bytes] = []
        self.pending_bytes = 0
        self.held: HeldFrames[Frame] | None = HeldFrames(max_pending)
        """Live frames kept until the replay is sent, within ``max_pending`` bytes; past that
        they are dropped, and the replay reads on to a newer clock instead."""
        self.wake = asyncio.Event()
        self.closed = False
        self.reason = ""
        self.last_write = 0.0
        self.writer: asyncio.Task[None] | None = None
        """The task that writes to this client; cancelled when the client is shed."""
        self.behind = False
        """Filtered-out frames advanced ``last_key`` past the last id the client was sent."""
        self.direct: Transport | None = None
        """Set once live on a chunked HTTP/1.1 transport: the hub writes to it itself."""
        self.wire: list[bytes] = []
        """Framed chunks for ``direct``, written at the end of the loop iteration."""
        self.dirty: list[Subscriber] = []
        """The hub's list of subscribers with ``wire`` to write (shared by all)."""
        self.stalled_since: float | None = None

    def offer(self, frame: Frame, wire: bytes) -> bool:
        """Take a live frame (``wire``: the same, framed as a chunk); return whether it was
        queued for this client."""
        if self.closed:
            return False
        if self.held is not None:
            self.held.hold(frame, len(frame.data))
            return False
        if frame.key <= self.last_key:
            return False
        self.last_key = frame.key
        if self.types is not None and frame.event not in self.types:
            self.behind = True
            return False
        if self.direct is not None:
            if not self.wire:
                self.dirty.append(self)
            self.wire.append(wire)
            return True
        self.events += 1
        self.chunks.append(frame.data)
        self._grow(len(frame.data))
        return True

    def go_direct(self, transport: Transport, dirty: list[Subscriber]) -> None:
        """From now on the hub writes this client's frames to ``transport`` itself (the
        writer task has sent everything queued before)."""
        self.dirty = dirty
        self.direct = transport

    def flush(self, now: float) -> None:
        """Write what is framed for this client in one call; shed it when the transport holds
        more than ``max_pending`` bytes that the client has not read."""
        wire = self.wire
        transport = self.direct
        if not wire or transport is None:
            return
        data = wire[0] if len(wire) == 1 else b"".join(wire)
        frames = len(wire) - self.raw
        self.raw = 0
        wire.clear()
        if transport.is_closing():
            self.close("client_closed")
        elif transport.get_write_buffer_size() + len(data) > self.max_pending:
            self.close("slow_consumer")
        else:
            transport.write(data)
            self.events += frames
            self.last_write = now

    def _grow(self, size: int) -> None:
        self.pending_bytes += size
        if self.pending_bytes > self.max_pending:
            self.close("slow_consumer")
        else:
            self.wake.set()

    def go_live(self, after_key: int) -> tuple[int, int]:
        """Replay is sent: deliver what arrived meanwhile, then stream live. Returns the events
        and bytes so queued (live dispatch did not count them: they were held)."""
        held, self.held = self.held.items if self.held is not None else [], None
        self.last_key = max(self.last_key, after_key)
        self.pending_bytes = 0
        events = size = 0
        for frame in held:
            if self.offer(frame, b""):  # not direct yet: queued for the writer task
                events += 1
                size += len(frame.data)
        self.wake.set()
        return events, size

    def write_raw(self, data: bytes) -> None:
        if self.closed:
            return
        if self.direct is not None:
            if not self.wire:
                self.dirty.append(self)
            self.wire.append(http_chunk(data))
            self.raw += 1
            return
        self.chunks.append(data)
        self._grow(len(data))

    def position_line(self) -> bytes:
        """An id with no data: the browser adopts it as its Last-Event-ID without an event, so
        a reconnect does not replay what the ``types`` filter already skipped."""
        self.behind = False
        return b"id: " + key_to_id(self.last_key).encode() + b"\n\n"

    def take(self) -> bytes:
        chunk = b"".join(self.chunks)
        self.chunks.clear()
        self.pending_bytes = 0
        return chunk

    def close(self, reason: str, farewell: bytes = b"") -> None:
        """Stop taking frames. A shed client loses what is queued; any other client is sent
        it (and ``farewell``) before its stream ends."""
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        transport, self.direct = self.direct, None
        if reason in SHED_REASONS:
            self.chunks.clear()
            self.wire.clear()
        else:
            if self.wire and transport is not None and not transport.is_closing():
                transport.write(b"".join(self.wire))
                self.events += len(self.wire) - self.raw
            self.wire.clear()
            if farewell:
                self.chunks.append(farewell)
        self.held = None
        self.wake.set()
        if reason in SHED_REASONS and self.writer is not None:
            self.writer.cancel()


class _Topic:
    __slots__ = ("linger", "ready", "subscribers")

    def __init__(self, ready: asyncio.Task[None]) -> None:
        self.subscribers: set[Subscriber] = set()
        self.ready = ready
        self.linger: asyncio.TimerHandle | None = None


class Hub:
    def __init__(
        self,
        engine: Engine,
        metrics: Metrics,
        *,
        linger: float = 2.0,
        heartbeat: float = 15.0,
        send_timeout: float = 10.0,
        coalesce: float = 0.0,
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.linger = linger
        self.heartbeat = heartbeat
        self.send_timeout = send_timeout
        self.coalesce = coalesce
        """Seconds to wait before writing a batch (0: at the end of the loop iteration)."""
        self.dirty: list[Subscriber] = []
        self._flush_pending = False
        self.subscribers: set[Subscriber] = set()
        self._topics: dict[str, _Topic] = {}
        self._timer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        engine.set_listeners(self.dispatch, self._lost)

    async def start(self) -> None:
        self._timer = asyncio.create_task(self._heartbeats(), name="sse-gateway heartbeats")

    async def close(self) -> None:
        self.close_all("shutdown")
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)

    @property
    def topic_count(self) -> int:
        return len(self._topics)

    # -- membership ---------------------------------------------------------------------------

    async def attach(self, sub: Subscriber) -> None:
        """Register ``sub`` and return once all its topics are subscribed in the engine.

        Raises ``EngineUnavailable`` if a subscribe fails; the caller must still detach."""
        self.subscribers.add(sub)
        waits = []
        for name in sub.topics:
            topic = self._topics.get(name)
            if topic is None:
                topic = self._topics[name] = _Topic(self._subscribe(name))
            elif topic.ready.done() and (
                topic.ready.cancelled() or topic.ready.exception() is not None
            ):
                topic.ready = self._subscribe(name)
            if topic.linger is not None:
                topic.linger.cancel()
                topic.linger = None
            topic.subscribers.add(sub)
            waits.append(topic.ready)
        self.metrics.hub_topics.set(len(self._topics))
        for ready in waits:
            await asyncio.shield(ready)

    def _subscribe(self, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(self.engine.subscribe(name))
        task.add_done_callback(_consume_exception)
        return task

    def detach(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        loop = asyncio.get_running_loop()
        for name in sub.topics:
            topic = self._topics.get(name)
            if topic is None:
                continue
            topic.subscribers.discard(sub)
            if not topic.subscribers and topic.linger is None:
                topic.linger = loop.call_later(self.linger, self._expire, name, topic)

    def _expire(self, name: str, topic: _Topic) -> None:
        if self._topics.get(name) is not topic or topic.subscribers:
            return
        if not topic.ready.done():
            # Cancelling a send in progress would drop the shared link: wait for it to settle.
            loop = asyncio.get_running_loop()
            topic.linger = loop.call_later(self.linger or 0.05, self._expire, name, topic)
            return
        del self._topics[name]
        self.metrics.hub_topics.set(len(self._topics))
        # The task's first step queues the UNSUBSCRIBE before any later SUBSCRIBE can queue.
        task = asyncio.create_task(self.engine.unsubscribe(name))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- delivery -----------------------------------------------------------------------------

    def dispatch(self, topic: str, frame: Frame) -> None:
        state = self._topics.get(topic)
        if state is None:
            return
        wire = http_chunk(frame.data)
        delivered = 0
        for sub in state.subscribers:
            if sub.offer(frame, wire):
                delivered += 1
        self.metrics.observe_dispatch(frame.key, delivered, len(frame.data))
        if self.dirty and not self._flush_pending:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        self._flush_pending = True
        loop = asyncio.get_running_loop()
        if self.coalesce > 0:
            loop.call_later(self.coalesce, self.flush)
        else:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every batch framed since the last flush, one write per client."""
        self._flush_pending = False
        if not self.dirty:
            return
        dirty = self.dirty.copy()
        self.dirty.clear()  # in place: every subscriber holds this list
        now = asyncio.get_running_loop().time()
        for sub in dirty:
            sub.flush(now)

    def _lost(self, topics: Sequence[str]) -> None:
        """Frames of these topics are gone from live delivery and from history: end their
        streams, so each browser reconnects with its Last-Event-ID and is told ``reset``."""
        doomed = {sub for name in topics if (t := self._topics.get(name)) for sub in t.subscribers}
        log.warning("history lost on %d topics: closing %d streams", len(topics), len(doomed))
        self.close_all("history_lost", doomed)

    def close_all(self, reason: str, subscribers: Iterable[Subscriber] | None = None) -> None:
        for sub in list(self.subscribers if subscribers is None else subscribers):
            sub.close(reason)

    async def _heartbeats(self) -> None:
        """One timer for every connection: a ping after ``heartbeat`` seconds of silence.

        With it goes a position line (``id:`` without data) when the engine has delivered every
        live frame through a newer id than the client's (``Engine.delivered_through``): no
        frame at or below that id can still arrive for a live client, so its Last-Event-ID
        may move there. A client on a quiet topic is thereby never older than the retention
        age, and its reconnect is not told ``reset`` once the topic's history expired. At most
        one short line per idle client per heartbeat; nothing per event."""
        loop = asyncio.get_running_loop()
        tick = max(0.02, min(1.0, self.heartbeat / 10))
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            quiet_since = now - self.heartbeat
            through = self.engine.delivered_through()
            for sub in list(self.subscribers):
                if sub.direct is not None:
                    self._check_stall(sub, now)
                if (
                    sub.held is None
                    and not sub.chunks
                    and not sub.wire
                    and sub.last_write <= quiet_since
                ):
                    if through is not None and through > sub.last_key:
                        sub.last_key = through
                        sub.behind = True
                    sub.write_raw(sub.position_line() + PING if sub.behind else PING)
            if self.dirty and not self._flush_pending:
                self._schedule_flush()

    def _check_stall(self, sub: Subscriber, now: float) -> None:
        """A client written to directly that has not read what it was sent for
        ``send_timeout`` seconds is dropped, as a stuck write would be."""
        transport = sub.direct
        if transport is None or not transport.get_write_buffer_size():
            sub.stalled_since = None
        elif sub.stalled_since is None:
            sub.stalled_since = now
        elif now - sub.stalled_since > self.send_timeout:
            sub.close("send_timeout")


def _consume_exception(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
