"""A real SSE client for tests: httpx streaming + the WHATWG parser.

A stream is subscribed to every topic it asked for once its preamble's ``: ok`` comment has
arrived (the gateway sends the preamble only then): tests wait on ``SSEStream.subscribed``
before they publish, never on a sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Self

import httpx

from gateway.client import EventParser, ServerEvent, stream_url


class SSEStream:
    """One open stream; events accumulate in ``events`` while ``read`` runs."""

    def __init__(
        self,
        base_url: str,
        topics: Sequence[str],
        *,
        last_event_id: str | None = None,
        since: int | None = None,
        types: str | None = None,
        query: str = "",
    ) -> None:
        self.url = stream_url(base_url, topics, since, types) + query
        self.headers = {"accept": "text/event-stream"}
        if last_event_id is not None:
            self.headers["last-event-id"] = last_event_id
        self.parser = EventParser()
        self.events: list[ServerEvent] = []
        self.status: int | None = None
        self.response_headers: httpx.Headers | None = None
        self.closed_by_server = False
        self.subscribed = asyncio.Event()
        """Set when ``: ok`` arrives: every event published from then on reaches the stream."""
        self._changed = asyncio.Event()

    async def read(self, client: httpx.AsyncClient) -> None:
        async with client.stream("GET", self.url, headers=self.headers) as response:
            self.status = response.status_code
            self.response_headers = response.headers
            self._changed.set()
            async for chunk in response.aiter_raw():
                self.events.extend(self.parser.feed(chunk))
                if not self.subscribed.is_set() and "ok" in self.parser.comments:
                    self.subscribed.set()
                self._changed.set()
        self.closed_by_server = True
        self._changed.set()

    async def wait_for(self, predicate: Callable[[Self], bool], timeout: float = 10) -> None:
        async def loop() -> None:
            while not predicate(self):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)

    async def until_subscribed(self, timeout: float = 10) -> None:
        """Wait for ``: ok``; ``AssertionError`` if the server ends the stream without it
        (a refusal) or it does not come within ``timeout``."""
        await self.wait_for(lambda s: s.subscribed.is_set() or s.closed_by_server, timeout)
        assert self.subscribed.is_set(), f"{self.url} ended without ': ok' (status {self.status})"

    def data(self) -> list[str]:
        return [e.data for e in self.events]


async def collect(
    base_url: str,
    topics: Sequence[str],
    until: Callable[[SSEStream], bool],
    timeout: float = 10,
    **options: object,
) -> SSEStream:
    """Open a stream, read until ``until`` holds (or the server closes it), then disconnect."""
    stream = SSEStream(base_url, topics, **options)  # type: ignore[arg-type]
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, read=None)) as client:
        task = asyncio.create_task(stream.read(client))
        try:
            await stream.wait_for(lambda s: s.closed_by_server or until(s), timeout)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return stream


def open_stream(client: httpx.AsyncClient, base_url: str, topics: Sequence[str], **options: object
                ) -> tuple[SSEStream, asyncio.Task[None]]:  # fmt: skip
    stream = SSEStream(base_url, topics, **options)  # type: ignore[arg-type]
    return stream, asyncio.create_task(stream.read(client))


async def subscribed(*streams: SSEStream, timeout: float = 10) -> None:
    """Wait until every stream has read ``: ok`` (see ``SSEStream.until_subscribed``)."""
    await asyncio.gather(*(s.until_subscribed(timeout) for s in streams))


async def first_event(stream: SSEStream, publish: Callable[[], str], timeout: float = 10) -> str:
    """Once ``stream`` is subscribed, publish one event (``publish`` returns its id) and wait
    for it: the stream is then past its replay, and holds an id to resume from. For tests
    that break something right after a stream opened, which must not hit its replay."""
    await stream.until_subscribed(timeout)
    event_id = await asyncio.to_thread(publish)
    await stream.wait_for(lambda s: any(e.id == event_id for e in s.events), timeout)
    return event_id
