"""Job progress as events: ``started``, throttled ``progress``, then ``completed`` or ``failed``.

Every event's data is a JSON object with ``job`` (the name), ``jobId`` and ``epochMs`` (when
the event was made); ``progress`` events carry ``progress: {current, total, percent}`` and, when
given, ``message``; ``completed`` and ``failed`` carry the last progress reported, if any;
``failed`` carries ``error: {type, message}``.

Throttling: consecutive ``progress`` events of one job are at least ``1 / progress_rate``
seconds apart. A report that comes sooner is not sent but kept, and any later report replaces
it; if the job ends while one is kept, it is sent on exit, before ``completed`` or ``failed``.
Nothing is sent in the background (no thread, no task): a kept report waits for the next
report or the end of the job. A report of 100 % (``current >= total``) is always sent at once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

from publisher.protocol import TopicArg

log = logging.getLogger("publisher")

DEFAULT_PROGRESS_RATE = 5.0
"""Progress events per second per job, at most."""

Clock = Callable[[], float]
SyncEmit = Callable[[TopicArg, Any, str], str]
AsyncEmit = Callable[[TopicArg, Any, str], Awaitable[str]]


def _number(name: str, value: object) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


class JobEvents:
    """The events of one job, without I/O: what to send, and when progress is held back."""

    def __init__(
        self,
        name: str,
        job_id: str | None = None,
        progress_rate: float = DEFAULT_PROGRESS_RATE,
        clock: Clock = time.monotonic,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("a job needs a non-empty name")
        if not math.isfinite(progress_rate) or progress_rate < 0:
            raise ValueError("progress_rate must be a finite number >= 0 (0: no limit)")
        self.name = name
        self.id = uuid.uuid4().hex if job_id is None else job_id
        self.interval = 1.0 / progress_rate if progress_rate else 0.0
        self.clock = clock
        self.last: dict[str, Any] | None = None
        """The last progress reported (sent or kept back)."""
        self.kept: dict[str, Any] | None = None
        """A progress event held back by the rate, to send on exit unless one replaces it."""
        self.sent_at: float | None = None

    def _data(self, **fields: Any) -> dict[str, Any]:
        data: dict[str, Any] = {"job": self.name, "jobId": self.id}
        data["epochMs"] = int(time.time() * 1000)
        data.update(fields)
        return data

    def started(self) -> dict[str, Any]:
        return self._data()

    def progress(
        self, current: float, total: float, message: str | None = None
    ) -> dict[str, Any] | None:
        """The event to send now, or None when the rate holds it back (it is kept)."""
        current = _number("current", current)
        total = _number("total", total)
        if total <= 0 or current < 0:
            raise ValueError(f"progress needs 0 <= current and 0 < total, got {current}/{total}")
        percent = round(min(100.0, 100.0 * current / total), 1)
        self.last = {"current": current, "total": total, "percent": percent}
        data = self._data(progress=self.last)
        if message is not None:
            data["message"] = str(message)
        now = self.clock()
        due = self.sent_at is None or now - self.sent_at >= self.interval
        if due or current >= total:
            self.sent_at = now
            self.kept = None
            return data
        self.kept = data
        return None

    def ending(self, exc: BaseException | None) -> list[tuple[dict[str, Any], str]]:
        """The events that end the job, as (data, event name): the progress report held
        back, if any, then ``completed`` (``exc`` is None) or ``failed``."""
        kept, self.kept = self.kept, None
        events = [(kept, "progress")] if kept is not None else []
        data = self._data(**({"progress": self.last} if self.last else {}))
        if exc is None:
            return [*events, (data, "completed")]
        data["error"] = {"type": type(exc).__name__, "message": str(exc)}
        return [*events, (data, "failed")]


class Job:
    """``with pub.job("resize", topic="jobs:42") as job: job.progress(3, 10)``.

    The exception that ends a job is published as ``failed`` and raised on; if publishing
    ``failed`` fails too, that is logged and the job's own exception is the one raised."""

    def __init__(
        self,
        emit: SyncEmit,
        name: str,
        *,
        topic: TopicArg,
        job_id: str | None = None,
        progress_rate: float = DEFAULT_PROGRESS_RATE,
        clock: Clock = time.monotonic,
    ) -> None:
        self.events = JobEvents(name, job_id, progress_rate, clock)
        self.topic = topic
        self._emit = emit
        self._lock = threading.Lock()

    @property
    def id(self) -> str:
        return self.events.id

    def progress(self, current: float, total: float, message: str | None = None) -> str | None:
        """Report progress; returns the event's id, or None when the rate held it back."""
        with self._lock:
            data = self.events.progress(current, total, message)
            return self._emit(self.topic, data, "progress") if data is not None else None

    def __enter__(self) -> Self:
        self._emit(self.topic, self.events.started(), "started")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with self._lock:
            try:
                for data, event in self.events.ending(exc):
                    self._emit(self.topic, data, event)
            except Exception as publish_error:
                if exc is None:
                    raise
                log.warning("job %s: publishing 'failed' failed: %s", self.id, publish_error)


class AsyncJob:
    """``async with apub.job("resize", topic="jobs:42") as job: await job.progress(3, 10)``."""

    def __init__(
        self,
        emit: AsyncEmit,
        name: str,
        *,
        topic: TopicArg,
        job_id: str | None = None,
        progress_rate: float = DEFAULT_PROGRESS_RATE,
        clock: Clock = time.monotonic,
    ) -> None:
        self.events = JobEvents(name, job_id, progress_rate, clock)
        self.topic = topic
        self._emit = emit

    @property
    def id(self) -> str:
        return self.events.id

    async def progress(
        self, current: float, total: float, message: str | None = None
    ) -> str | None:
        """Report progress; returns the event's id, or None when the rate held it back."""
        data = self.events.progress(current, total, message)
        return await self._emit(self.topic, data, "progress") if data is not None else None

    async def __aenter__(self) -> Self:
        await self._emit(self.topic, self.events.started(), "started")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            for data, event in self.events.ending(exc):
                await self._emit(self.topic, data, event)
        except Exception as publish_error:
            if exc is None:
                raise
            log.warning("job %s: publishing 'failed' failed: %s", self.id, publish_error)
