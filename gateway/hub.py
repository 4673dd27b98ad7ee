"""Per-process fan-out: the topic table, dispatch and the end-of-turn flush.

For each live frame the hub frames the bytes once, as one HTTP/1.1 chunk, and offers that same
bytes object to every session of the topic (``Session.offer``: the per-client rule): no JSON,
no coroutine, no task wake-up per (event, session). A session that queued something is marked
dirty; at the end of the loop turn each dirty session's sink is flushed once: a live session on
a direct sink gets the frames of that turn in one ``transport.write``, any other wakes its
driver, which joins whatever is pending into one ASGI ``send``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence

from gateway.allocator import Reclaimer
from gateway.engines.base import Engine, Frame
from gateway.metrics import Metrics
from gateway.session import FIRST, CloseReason, Session
from gateway.sinks import http_chunk

log = logging.getLogger("gateway.hub")

Subscriber = Session
"""A session, as the hub's table holds it."""


class _Topic:
    __slots__ = ("linger", "ready", "subscribers")

    def __init__(self, ready: asyncio.Task[None]) -> None:
        self.subscribers: set[Session] = set()
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
        self.dirty: list[Session] = []
        self._flush_pending = False
        self.subscribers: set[Session] = set()
        self._topics: dict[str, _Topic] = {}
        self._timer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.reclaimer = Reclaimer()
        """Gives memory back once a wave of streams has left."""
        engine.set_listeners(self.dispatch, self._lost)

    async def start(self) -> None:
        self._timer = asyncio.create_task(self._heartbeats(), name="sse-gateway heartbeats")

    async def close(self) -> None:
        self.close_all(CloseReason.SHUTDOWN)
        self.reclaimer.cancel()
        if self._timer is not None:
            self._timer.cancel()
            await asyncio.gather(self._timer, return_exceptions=True)
        await asyncio.gather(*self._background, return_exceptions=True)

    @property
    def topic_count(self) -> int:
        return len(self._topics)

    # -- membership ---------------------------------------------------------------------------

    async def attach(self, sub: Session) -> int | None:
        """Register ``sub`` and return once all its topics are subscribed in the engine.

        Returns the engine's ``delivered_through`` as it was when ``sub`` joined its topics:
        every live frame offered to ``sub`` afterwards is newer (None when unknown).
        Raises ``EngineUnavailable`` if a subscribe fails; the caller must still detach."""
        through, waits = self.join(sub)
        for ready in waits:
            await asyncio.shield(ready)
        return through

    def join(self, sub: Session) -> tuple[int | None, list[asyncio.Task[None]]]:
        """Register ``sub`` now: ``delivered_through`` as it joined, and the subscribes it must
        still wait for (none when :meth:`following` said so)."""
        self.subscribers.add(sub)
        self.reclaimer.opened(len(self.subscribers))
        through = self.engine.delivered_through()
        waits = []
        for name in sub.topics:
            topic = self._topics.get(name)
            if topic is None:
                topic = self._topics[name] = _Topic(self._subscribe(name))
                self.metrics.hub_topics.set(len(self._topics))
            elif topic.ready.done() and (
                topic.ready.cancelled() or topic.ready.exception() is not None
            ):
                topic.ready = self._subscribe(name)
            if topic.linger is not None:
                topic.linger.cancel()
                topic.linger = None
            topic.subscribers.add(sub)
            if not topic.ready.done():
                waits.append(topic.ready)
        return through, waits

    def following(self, topics: Sequence[str]) -> bool:
        """Whether the engine is subscribed to every one of ``topics`` already: a stream on
        them joins with nothing to wait for."""
        for name in topics:
            topic = self._topics.get(name)
            if topic is None:
                return False
            ready = topic.ready
            if not ready.done() or ready.cancelled() or ready.exception() is not None:
                return False
        return True

    def _subscribe(self, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(self.engine.subscribe(name))
        task.add_done_callback(_consume_exception)
        return task

    def detach(self, sub: Session) -> None:
        self.subscribers.discard(sub)
        self.reclaimer.left(len(self.subscribers))
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
        dirty = self.dirty
        for sub in state.subscribers:
            queued = sub.offer(frame, wire)
            if queued:
                delivered += 1
                if queued == FIRST:
                    dirty.append(sub)
        self.metrics.observe_dispatch(frame.key, delivered, len(frame.data))
        if dirty and not self._flush_pending:
            self._schedule_flush()

    def mark(self, sub: Session) -> None:
        """``sub`` queued bytes outside dispatch: flush it at the end of this turn."""
        self.dirty.append(sub)
        if not self._flush_pending:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        self._flush_pending = True
        loop = asyncio.get_running_loop()
        if self.coalesce > 0:
            loop.call_later(self.coalesce, self.flush)
        else:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every batch queued since the last flush, one write per session."""
        self._flush_pending = False
        if not self.dirty:
            return
        dirty, self.dirty = self.dirty, []
        now = asyncio.get_running_loop().time()
        for sub in dirty:
            sink = sub.sink
            if sink is not None:
                sink.flush(sub, now)

    def _lost(self, topics: Sequence[str]) -> None:
        """Frames of these topics are gone from live delivery and from history: end their
        streams, so each browser reconnects with its Last-Event-ID and is told ``reset``."""
        doomed = {sub for name in topics if (t := self._topics.get(name)) for sub in t.subscribers}
        log.warning("history lost on %d topics: closing %d streams", len(topics), len(doomed))
        self.close_all(CloseReason.HISTORY_LOST, doomed)

    def close_all(self, reason: str, subscribers: Iterable[Session] | None = None) -> None:
        for sub in list(self.subscribers if subscribers is None else subscribers):
            sub.close(reason)

    async def _heartbeats(self) -> None:
        """One timer for every connection (see :meth:`beat`)."""
        loop = asyncio.get_running_loop()
        tick = max(0.02, min(1.0, self.heartbeat / 10))
        while True:
            await asyncio.sleep(tick)
            self.beat(loop.time())

    def beat(self, now: float) -> None:
        """Stalls, and a ping after ``heartbeat`` seconds of silence (with a position line when
        the engine's ``delivered_through`` passed the client's position: see
        ``Session.heartbeat``). At most one short line per idle client per heartbeat; nothing
        per event."""
        quiet_since = now - self.heartbeat
        through = self.engine.delivered_through()
        send_timeout = self.send_timeout
        dirty = self.dirty
        for sub in list(self.subscribers):
            sink = sub.sink
            if sink is not None:
                buffered = sink.buffered()
                # (``stall`` with nothing buffered and no stall begun changes nothing)
                if (buffered or sub.stalled_since is not None) and sub.stall(
                    buffered, now, send_timeout
                ):
                    continue
            if sub.last_write > quiet_since:
                continue  # written to within the heartbeat: no ping due (as ``heartbeat`` says)
            if sub.heartbeat(quiet_since, through) == FIRST:
                dirty.append(sub)
        if dirty and not self._flush_pending:
            self._schedule_flush()


def _consume_exception(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()
