"""Browser-like SSE clients on raw sockets: each reconnects with ``Last-Event-ID`` as
EventSource does, many on one event loop (``ClientPool``); and clients that stall."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import socket
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any

from gateway.client import EventParser, ServerEvent
from publisher.protocol import id_key
from tests.support.loop import LoopThread
from tests.support.waiting import wait_until

# -- SSE clients ------------------------------------------------------------------------------


@dataclasses.dataclass
class BrowserParser(EventParser):
    """The parser, plus the browser's *last event ID string*: it takes the id buffer only when
    an event is dispatched (at the blank line), so a connection cut in the middle of an event
    does not resume after an event that never arrived."""

    dispatched_id: str = ""

    def __post_init__(self) -> None:
        self.dispatched_id = self.last_id

    def _line(self, line: str, events: list[ServerEvent]) -> None:
        super()._line(line, events)
        if not line:  # after the parser's own dispatch, whichever moment it takes the id at
            self.dispatched_id = self.last_id


class ChunkedDecoder:
    """HTTP/1.1 chunked transfer decoding, fed as bytes arrive; ``done`` after the last chunk."""

    def __init__(self) -> None:
        self._buffer = b""
        self._left = 0
        self._state = "size"
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        while buffer and not self.done:
            if self._state == "size":
                end = buffer.find(b"\r\n")
                if end < 0:
                    break
                size = int(buffer[:end].split(b";", 1)[0], 16)
                buffer = buffer[end + 2 :]
                if size == 0:
                    self.done = True
                    break
                self._left = size
                self._state = "data"
            elif self._state == "data":
                piece = buffer[: self._left]
                out.append(piece)
                self._left -= len(piece)
                buffer = buffer[len(piece) :]
                if self._left == 0:
                    self._state = "crlf"
            else:
                if len(buffer) < 2:
                    break
                buffer = buffer[2:]
                self._state = "size"
        self._buffer = buffer
        return b"".join(out)


async def request_stream(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    host: str,
    path: str,
    last_id: str,
    timeout: float,
) -> tuple[int, dict[str, str]]:
    """Send an ``EventSource``'s GET (with its last event id) and read the answer's head:
    the status and the headers, their names in lower case."""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
        "Accept: text/event-stream\r\nCache-Control: no-cache\r\n"
    )
    if last_id:
        request += f"Last-Event-ID: {last_id}\r\n"
    writer.write((request + "\r\n").encode("latin-1"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines if line)
    }
    return int(status_line.split(" ", 2)[1]), headers


@dataclasses.dataclass(frozen=True, slots=True)
class Received:
    id: str
    event: str
    data: str
    key: int
    """``id_key(id)``; 0 for a ``reset`` (whose id, when it has one, is only a position)."""


class SSEClient:
    """A browser's EventSource over raw asyncio streams: one GET per connection, and after the
    server closes it (or any error) a new one after the ``retry:`` delay (capped), sending the
    last event id it saw. ``received`` holds every dispatched event, ``reset`` included."""

    def __init__(
        self,
        name: str,
        port: int,
        topics: Sequence[str],
        *,
        retry_cap: float = 0.5,
        idle_timeout: float = 15.0,
        last_event_id: str = "",
    ) -> None:
        self.name = name
        self.port = port
        self.topics = tuple(topics)
        self.retry_cap = retry_cap
        self.idle_timeout = idle_timeout
        self.path = "/events?" + urllib.parse.urlencode([("topic", t) for t in self.topics])
        self.received: list[Received] = []
        self.last_id = last_event_id
        self.last_key = 0
        self.attempts = 0
        self.reconnects = 0
        """Connection attempts after the first, other than resuming after ``pause``."""
        self.streams = 0
        self.server_closes = 0
        self.closed_at: list[float] = []
        """``time.monotonic()`` of each stream end the server chose (EOF or last chunk)."""
        self.statuses: collections.Counter[int] = collections.Counter()
        self.refusals = 0
        self.errors: list[str] = []
        self.connected = False
        """Subscribed: the stream's ``: ok`` arrived (and the stream is still open)."""
        self.retry_ms = 3000
        self._resume: asyncio.Event | None = None
        self._writer: asyncio.StreamWriter | None = None

    @property
    def resets(self) -> list[Received]:
        return [r for r in self.received if r.event == "reset"]

    def describe(self) -> str:
        return (
            f"{self.name} topics={list(self.topics)} events={len(self.received)} "
            f"last={self.last_id or '-'} attempts={self.attempts} streams={self.streams} "
            f"statuses={dict(self.statuses)} errors={self.errors[-3:]}"
        )

    async def run(self) -> None:
        self._resume = asyncio.Event()
        self._resume.set()
        resumed = False
        while True:
            await self._resume.wait()
            if self.attempts and not resumed:
                self.reconnects += 1
            resumed = False
            self.attempts += 1
            try:
                await self._session()
            except (
                OSError,
                EOFError,
                ValueError,
                TimeoutError,
                asyncio.IncompleteReadError,
            ) as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                self.connected = False
                self._writer = None
            if self._resume.is_set():
                # EventSource's reconnection delay (as the server's ``retry:`` asks, capped)
                await asyncio.sleep(min(self.retry_ms / 1000, self.retry_cap))
            else:
                resumed = True

    def pause(self) -> None:
        """Close the connection (as a page that goes away) and stay away until ``resume``."""
        assert self._resume is not None
        self._resume.clear()
        if self._writer is not None:
            self._writer.transport.abort()

    def resume(self) -> None:
        assert self._resume is not None
        self._resume.set()

    async def _session(self) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20), self.idle_timeout
        )
        self._writer = writer
        try:
            status, headers = await request_stream(
                reader, writer, "127.0.0.1", self.path, self.last_id, self.idle_timeout
            )
            self.statuses[status] += 1
            if status != 200:
                return
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            decoder = ChunkedDecoder() if chunked else None
            parser = BrowserParser(last_id=self.last_id)
            self.streams += 1
            while True:
                data = await asyncio.wait_for(reader.read(1 << 16), self.idle_timeout)
                if not data:
                    self.server_closes += 1
                    self.closed_at.append(time.monotonic())
                    return
                body = decoder.feed(data) if decoder is not None else data
                if body:
                    for event in parser.feed(body):
                        self._dispatch(event)
                    # ': ok' ends the preamble once every topic is subscribed
                    self.connected = self.connected or "ok" in parser.comments
                    self.last_id = parser.dispatched_id
                    if parser.retry is not None:
                        self.retry_ms = parser.retry
                if decoder is not None and decoder.done:
                    self.server_closes += 1
                    self.closed_at.append(time.monotonic())
                    return
        finally:
            writer.close()

    def _dispatch(self, event: ServerEvent) -> None:
        if event.event == "refused":  # a temporary refusal: it carries no id, and is retried
            self.refusals += 1
            return
        if event.event == "reset":
            self.received.append(Received(event.id, event.event, event.data, 0))
            return
        try:
            key = id_key(event.id)
        except ValueError:
            self.errors.append(f"event without a valid id: {event!r}"[:300])
            key = 0
        self.received.append(Received(event.id, event.event, event.data, key))
        self.last_key = max(self.last_key, key)


class ClientPool:
    """SSE clients, all on one event loop in a background thread."""

    def __init__(self) -> None:
        self._thread = LoopThread("chaos-sse-clients")
        self._tasks: set[asyncio.Future[None]] = set()
        self.clients: list[SSEClient] = []

    def spawn(
        self, port: int, topic_sets: Sequence[Sequence[str]], name: str = "c", **options: Any
    ) -> list[SSEClient]:
        start = len(self.clients)
        clients = [
            SSEClient(f"{name}{start + i}", port, topics, **options)
            for i, topics in enumerate(topic_sets)
        ]

        async def begin() -> None:
            for client in clients:
                self._tasks.add(asyncio.ensure_future(client.run()))

        self._thread.run(begin())
        self.clients.extend(clients)
        return clients

    def pause(self, clients: Iterable[SSEClient]) -> None:
        async def pause() -> None:
            for client in clients:
                client.pause()

        self._thread.run(pause())

    def resume(self, clients: Iterable[SSEClient]) -> None:
        async def resume() -> None:
            for client in clients:
                client.resume()

        self._thread.run(resume())

    def close(self) -> None:
        self._thread.close()


def wait_connected(clients: Sequence[SSEClient], timeout: float = 30.0) -> None:
    try:
        wait_until(lambda: all(c.connected for c in clients), "clients to subscribe", timeout)
    except TimeoutError:
        down = [c.describe() for c in clients if not c.connected]
        raise AssertionError(f"{len(down)} clients not connected: {down[:5]}") from None


def spread_topics(topics: Sequence[str], count: int, pair_every: int = 3) -> list[tuple[str, ...]]:
    """``count`` topic sets over ``topics``: one topic each, two for every ``pair_every``th."""
    sets: list[tuple[str, ...]] = []
    for i in range(count):
        first = topics[i % len(topics)]
        if pair_every and i % pair_every == pair_every - 1 and len(topics) > 1:
            sets.append((first, topics[(i + 2) % len(topics)]))
        else:
            sets.append((first,))
    return sets


class StalledClients:
    """Raw sockets that send ``GET /events``, read the response head, then never read again;
    a small receive buffer (set before connecting) keeps the kernel from soaking up much."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []

    def open(self, port: int, topics: Sequence[str], count: int, rcvbuf: int = 4096) -> None:
        query = urllib.parse.urlencode([("topic", t) for t in topics])
        request = f"GET /events?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(10)
            sock.connect(("127.0.0.1", port))
            sock.sendall(request)
            head = b""
            while b": ok" not in head:
                chunk = sock.recv(1024)
                assert chunk, f"the gateway closed a stalled stream at once: {head!r}"
                head += chunk
            assert head.startswith(b"HTTP/1.1 200"), head[:200]

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets.clear()
