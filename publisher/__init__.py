"""Emit events to sse-gateway from any Python process (sync or asyncio).

>>> with Publisher.from_url("redis://localhost:6379") as pub:
...     pub.publish("jobs:42", {"progress": 50}, event="progress")
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Any, Protocol, Self

import redis
import redis.asyncio

from publisher._message import Message, PublishError, TopicArg, make_message
from publisher._redis import AsyncRedisTransport, RedisTransport, Retention, redis_options
from publisher._schema import DEFAULT_PREFIX, Keys

__all__ = [
    "AsyncPublisher",
    "Message",
    "PublishError",
    "Publisher",
    "Retention",
    "make_message",
]

EventArg = tuple[TopicArg, Any] | tuple[TopicArg, Any, str | None]


class _Transport(Protocol):
    def send(self, messages: list[Message]) -> list[str]: ...
    def close(self) -> None: ...


class _AsyncTransport(Protocol):
    async def send(self, messages: list[Message]) -> list[str]: ...
    async def close(self) -> None: ...


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
    ) -> Publisher:
        """``redis://``/``rediss://``/``unix://`` publish directly; ``http(s)://`` via a gateway."""
        if _is_http(url):
            from publisher._http import HttpTransport

            return cls(HttpTransport(url, token))
        client = redis.Redis.from_url(url, **redis_options())
        return cls(RedisTransport(client, Keys(prefix), retention or Retention()))

    def publish(self, topics: TopicArg, data: Any, event: str | None = None) -> str:
        return self._transport.send([make_message(topics, data, event)])[0]

    def publish_many(self, events: Iterable[EventArg]) -> list[str]:
        """Publish ``(topics, data[, event])`` tuples in one round trip; ids come back in order."""
        messages = _messages(events)
        return self._transport.send(messages) if messages else []

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
    ) -> AsyncPublisher:
        if _is_http(url):
            from publisher._http import AsyncHttpTransport

            return cls(AsyncHttpTransport(url, token))
        client = redis.asyncio.Redis.from_url(url, **redis_options())
        return cls(AsyncRedisTransport(client, Keys(prefix), retention or Retention()))

    async def publish(self, topics: TopicArg, data: Any, event: str | None = None) -> str:
        return (await self._transport.send([make_message(topics, data, event)]))[0]

    async def publish_many(self, events: Iterable[EventArg]) -> list[str]:
        messages = _messages(events)
        return await self._transport.send(messages) if messages else []

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
