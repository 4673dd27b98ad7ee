"""Emit events to sse-gateway from any Python process (sync or asyncio).

>>> with Publisher.from_url("redis://localhost:6379") as pub:
...     pub.publish("jobs:42", {"progress": 50}, event="progress")
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Protocol, Self

from publisher._job import DEFAULT_PROGRESS_RATE, AsyncJob, Clock, Job
from publisher.protocol import (
    DEFAULT_IDEMPOTENCY_TTL,
    DEFAULT_PREFIX,
    Keys,
    Message,
    PublishError,
    Retention,
    TopicArg,
    make_message,
)
from publisher.publish_plan import DEFAULT_RETRY_FOR, DEFAULT_WAIT_TIMEOUT, NotReplicated
from publisher.redis_transport import AsyncRedisTransport, RedisTransport, connect, connect_async
from publisher.subscriber import (
    AsyncSubscription,
    Event,
    Subscription,
    SubscriptionError,
    asubscribe,
    subscribe,
)

__all__ = [
    "AsyncJob",
    "AsyncPublisher",
    "AsyncSubscription",
    "Event",
    "Job",
    "Message",
    "NotReplicated",
    "PublishError",
    "Publisher",
    "Retention",
    "Subscription",
    "SubscriptionError",
    "asubscribe",
    "make_message",
    "subscribe",
]

EventArg = tuple[TopicArg, Any] | tuple[TopicArg, Any, str | None]


class _Transport(Protocol):
    def send(self, messages: list[Message]) -> list[str]: ...
    def position(self, topics: tuple[str, ...]) -> str: ...
    def close(self) -> None: ...


class _AsyncTransport(Protocol):
    async def send(self, messages: list[Message]) -> list[str]: ...
    async def position(self, topics: tuple[str, ...]) -> str: ...
    async def close(self) -> None: ...


def _topics(topics: TopicArg | None) -> tuple[str, ...]:
    if topics is None:
        return ()
    return (topics,) if isinstance(topics, str) else tuple(topics)


def _messages(events: Iterable[EventArg]) -> list[Message]:
    return [make_message(*event) for event in events]


def _is_http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


class Publisher:
    """Publishes events; each call returns the event's id (``<ms>-<seq>``)."""

    def __init__(self, transport: _Transport) -> None:
        self._transport = transport

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention: Retention | None = None,
        token: str | None = None,
        retry_for: float = DEFAULT_RETRY_FOR,
        idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
        wait_replicas: int = 0,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    ) -> Publisher:
        """``redis://``, ``rediss://``, ``unix://`` and ``redis+sentinel://`` publish directly;
        ``http(s)://`` goes through a gateway. Transient errors are retried for ``retry_for``
        seconds; a retried publish keeps its idempotency key, so it is never stored twice.

        With ``wait_replicas=N`` a publish is acknowledged only once N replicas hold it
        (``WAIT``, in the same round trip), so no failover loses an acknowledged publish."""
        if _is_http(url):
            from publisher._http import HttpTransport

            return cls(HttpTransport(url, token, retry_for=retry_for))
        return cls(
            RedisTransport(
                connect(url), Keys(prefix), retention or Retention(),
                retry_for=retry_for, idempotency_ttl=idempotency_ttl,
                wait_replicas=wait_replicas, wait_timeout=wait_timeout,
            )
        )  # fmt: skip

    def publish(
        self,
        topics: TopicArg,
        data: Any,
        event: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> str:
        """Publish one event and return its id. Publishing again with the same
        ``idempotency_key`` (within the idempotency TTL) returns the first id and stores
        nothing."""
        return self._transport.send([make_message(topics, data, event, idempotency_key)])[0]

    def publish_many(self, events: Iterable[EventArg]) -> list[str]:
        """Publish ``(topics, data[, event])`` tuples in one round trip; ids come back in order."""
        messages = _messages(events)
        return self._transport.send(messages) if messages else []

    def position(self, topics: TopicArg | None = None) -> str:
        """The id of the newest event published (``"0-0"`` before the first). Read it, then
        the app's state, then open the page's stream with ``lastEventId`` set to it: the
        stream replays every event published after the read, once, before any other.

        The position is global; ``topics`` matter only through a gateway in token mode,
        which answers only for a token that may read them (as ``GET /events`` would)."""
        return self._transport.position(_topics(topics))

    def job(
        self,
        name: str,
        *,
        topic: TopicArg,
        job_id: str | None = None,
        progress_rate: float = DEFAULT_PROGRESS_RATE,
        clock: Clock = time.monotonic,
    ) -> Job:
        """A context manager that publishes ``started``, ``job.progress(current, total,
        message=None)`` as ``progress`` (at most ``progress_rate`` a second; 0: no limit), then
        ``completed``, or ``failed`` with the exception, which is raised on. ``job_id``
        defaults to a random hex id; ``clock`` (monotonic seconds) paces the progress events."""
        return Job(
            self.publish, name, topic=topic, job_id=job_id,
            progress_rate=progress_rate, clock=clock,
        )  # fmt: skip

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncPublisher:
    """The asyncio twin of :class:`Publisher`."""

    def __init__(self, transport: _AsyncTransport) -> None:
        self._transport = transport

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention: Retention | None = None,
        token: str | None = None,
        retry_for: float = DEFAULT_RETRY_FOR,
        idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
        wait_replicas: int = 0,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    ) -> AsyncPublisher:
        if _is_http(url):
            from publisher._http import AsyncHttpTransport

            return cls(AsyncHttpTransport(url, token, retry_for=retry_for))
        return cls(
            AsyncRedisTransport(
                connect_async(url), Keys(prefix), retention or Retention(),
                retry_for=retry_for, idempotency_ttl=idempotency_ttl,
                wait_replicas=wait_replicas, wait_timeout=wait_timeout,
            )
        )  # fmt: skip

    async def publish(
        self,
        topics: TopicArg,
        data: Any,
        event: str | None = None,
        *,
        idempotency_key: str | None = None,
    ) -> str:
        message = make_message(topics, data, event, idempotency_key)
        return (await self._transport.send([message]))[0]

    async def publish_many(self, events: Iterable[EventArg]) -> list[str]:
        messages = _messages(events)
        return await self._transport.send(messages) if messages else []

    async def position(self, topics: TopicArg | None = None) -> str:
        """See :meth:`Publisher.position`."""
        return await self._transport.position(_topics(topics))

    def job(
        self,
        name: str,
        *,
        topic: TopicArg,
        job_id: str | None = None,
        progress_rate: float = DEFAULT_PROGRESS_RATE,
        clock: Clock = time.monotonic,
    ) -> AsyncJob:
        """``async with apub.job(...) as job: await job.progress(...)``; see
        :meth:`Publisher.job`."""
        return AsyncJob(
            self.publish, name, topic=topic, job_id=job_id,
            progress_rate=progress_rate, clock=clock,
        )  # fmt: skip

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
