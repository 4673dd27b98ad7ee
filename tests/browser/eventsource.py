"""Clients that behave as a browser's ``EventSource`` (WHATWG HTML, "Server-sent events"),
for crowds too large for browser tabs: each GET sends ``Accept: text/event-stream`` and its
last event id; a 200 ``text/event-stream`` answer is read until it ends, then the client
reconnects after the last ``retry:`` delay; a network error is retried the same way; **any
other answer fails the connection for good**, as a browser does."""

from __future__ import annotations

import asyncio
import collections
import urllib.parse
from collections.abc import Sequence

from tests.support.clients import BrowserParser, ChunkedDecoder, request_stream
from tests.support.loop import LoopThread

CONNECTING, OPEN, CLOSED = 0, 1, 2


class EventSourceLike:
    def __init__(self, port: int, topics: Sequence[str], timeout: float = 15.0) -> None:
        self.port = port
        self.path = "/events?" + urllib.parse.urlencode([("topic", t) for t in topics])
        self.timeout = timeout
        self.state = CONNECTING
        self.retry_ms = 3000
        self.last_id = ""
        self.events: list[tuple[str, str, str]] = []
        self.refused: list[str] = []
        self.failed: str | None = None
        """Why the connection failed for good (a browser would never reconnect)."""
        self.attempts = 0
        self.errors: collections.Counter[str] = collections.Counter()

    async def run(self) -> None:
        while self.state != CLOSED:
            self.attempts += 1
            self.state = CONNECTING
            try:
                await self._connect()
            except (OSError, EOFError, TimeoutError, asyncio.IncompleteReadError) as exc:
                self.errors[type(exc).__name__] += 1
            if self.state != CLOSED:
                self.state = CONNECTING
                await asyncio.sleep(self.retry_ms / 1000)  # EventSource's reconnection delay

    async def _connect(self) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port), self.timeout
        )
        try:
            status, headers = await request_stream(
                reader, writer, f"127.0.0.1:{self.port}", self.path, self.last_id, self.timeout
            )
            if status != 200 or not headers.get("content-type", "").startswith("text/event-stream"):
                self.failed = f"{status} {headers.get('content-type')}"
                self.state = CLOSED
                return
            self.state = OPEN
            await self._read(reader, headers)
        finally:
            writer.close()

    async def _read(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        decoder = ChunkedDecoder() if chunked else None
        left = int(headers["content-length"]) if "content-length" in headers else None
        parser = BrowserParser(last_id=self.last_id)
        while True:
            data = await asyncio.wait_for(reader.read(1 << 16), self.timeout)
            if not data:
                return
            if left is not None:
                data = data[:left]
                left -= len(data)
            body = decoder.feed(data) if decoder is not None else data
            for event in parser.feed(body):
                if event.event == "refused":
                    self.refused.append(event.data)
                else:
                    self.events.append((event.id, event.event, event.data))
            self.last_id = parser.dispatched_id
            if parser.retry is not None:
                self.retry_ms = parser.retry
            if (decoder is not None and decoder.done) or left == 0:
                return


class Crowd:
    """Many ``EventSourceLike`` clients on one event loop in a background thread."""

    def __init__(self) -> None:
        self._thread = LoopThread("browser-crowd")
        self._tasks: set[asyncio.Future[None]] = set()
        self.clients: list[EventSourceLike] = []

    def spawn(self, port: int, topics: Sequence[str], count: int) -> list[EventSourceLike]:
        clients = [EventSourceLike(port, topics) for _ in range(count)]

        async def begin() -> None:
            for client in clients:
                self._tasks.add(asyncio.ensure_future(client.run()))

        self._thread.run(begin())
        self.clients.extend(clients)
        return clients

    def close(self) -> None:
        self._thread.close()
