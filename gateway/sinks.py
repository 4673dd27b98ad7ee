"""Where a stream's bytes go: the one seam between a session and the server under it.

Two sinks:

- :class:`DirectSink`: a live stream on a chunked HTTP/1.1 response, opened either below the
  request cycle by ``gateway.protocol.StreamFront`` or through uvicorn's httptools protocol.
  The hub writes finished HTTP/1.1 chunks (framed once per node) to the transport itself at the
  end of a loop turn, and the protocol tells the stream when the connection is lost: such a
  stream needs no task of its own.
- :class:`AsgiSink`: anything else (h11, an HTTP/1.0 client, a wrapped ``send``), and every
  stream before it goes live: bytes go through ASGI ``send``, each write bounded by
  ``send_timeout``; the hub only wakes the driver.

Every uvicorn internal the gateway relies on for this is used here and nowhere else (the
protocol subclasses of ``gateway.protocol`` are the other side of the seam);
tests/gateway/test_sinks.py fails loudly when a uvicorn upgrade changes any of it:

- ASGI ``send`` is the bound method ``RequestResponseCycle.send`` of the httptools cycle
  (``send.__self__``), whose module is :data:`HTTPTOOLS_MODULE`;
- the cycle's ``chunked_encoding`` is True once it frames the response in chunks, and its
  ``transport`` and ``flow`` (``resume_reading``) are the connection's;
- a chunk is ``<hex size>\\r\\n<data>\\r\\n`` (:func:`http_chunk`), the terminating chunk is
  written by the cycle when the response completes;
- the protocol (``scope["extensions"][CONNECTION_EXTENSION]``, set by ``gateway.protocol``)
  calls its ``lost_listener`` from ``connection_lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from starlette.types import Scope, Send

from gateway.protocol import CONNECTION_EXTENSION
from gateway.session import CloseReason, Session

HTTPTOOLS_MODULE = "uvicorn.protocols.http.httptools_impl"
KEEPALIVE_PROBES = 3


def http_chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a ``Transfer-Encoding: chunked`` body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class Transport(Protocol):
    """What a direct sink needs of an asyncio (or uvloop) transport."""

    def write(self, data: bytes) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def is_closing(self) -> bool: ...
    def abort(self) -> None: ...
    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


class DirectSink:
    """The hub writes a live session's chunks to its transport at the end of a loop turn."""

    __slots__ = ("connection", "transport")

    def __init__(self, transport: Transport, connection: Any) -> None:
        self.transport = transport
        self.connection = connection

    def flush(self, session: Session, now: float) -> None:
        transport = self.transport
        data = session.flush(transport.get_write_buffer_size(), transport.is_closing(), now)
        if data is not None:
            transport.write(data)

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()

    def write(self, data: bytes) -> None:
        """Finished chunks (what a closing session still owes), unless the peer is gone."""
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def watch(self, lost: Callable[[], object] | None) -> None:
        """Call ``lost`` when the connection is lost (None: stop watching)."""
        self.connection.lost_listener = lost


def direct_sink(scope: Scope, send: Send) -> DirectSink | None:
    """A direct sink for this response when uvicorn's httptools protocol (with the
    ``gateway.protocol`` subclass) frames it in chunks; None otherwise (``send`` then)."""
    cycle = getattr(send, "__self__", None)
    if type(cycle).__module__ != HTTPTOOLS_MODULE:
        return None
    if getattr(cycle, "chunked_encoding", None) is not True:
        return None
    connection = scope.get("extensions", {}).get(CONNECTION_EXTENSION)
    transport = getattr(cycle, "transport", None)
    flow = getattr(cycle, "flow", None)
    if connection is None or transport is None or flow is None:
        return None
    if getattr(connection, "cycle", None) is not cycle:
        return None
    # A client that pipelined a request behind this one paused reading: resume it, so the
    # peer's close is seen (as ASGI ``receive`` does).
    flow.resume_reading()
    return DirectSink(transport, connection)


class AsgiSink:
    """ASGI ``send`` with each write bounded, and the driver's wake-up: the hub's flush and
    the session's close wake it; a shedding close cuts a write in progress short."""

    __slots__ = ("_opening", "_send", "_sending", "_timeout", "_waiter")

    def __init__(self, send: Send, timeout: float) -> None:
        self._send = send
        self._timeout = timeout
        self._waiter: asyncio.Future[None] | None = None
        self._sending: asyncio.Timeout | None = None
        self._opening: asyncio.Timeout | None = None

    def flush(self, session: Session, now: float) -> None:
        self.wake()

    def buffered(self) -> int:
        return 0

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def closing(self, session: Session) -> None:
        """The session's listener: wake the driver; when the client is gone or shed, cut short
        the write in progress (its peer may never read it) and the opening (subscribe, clock
        and history reads: nobody is left to send them to)."""
        self.wake()
        reason = session.reason
        if reason is None:
            return
        # Whatever the reason, nothing is left to send the opening's result to: a drain (or a
        # lifetime, an expired token) must not wait on a subscribe or a history read.
        waits = [self._opening]
        if reason.shed or reason is CloseReason.CLIENT_CLOSED:
            waits.append(self._sending)
        now = asyncio.get_running_loop().time()
        for wait in waits:
            # A timeout that already fired cannot be moved (RuntimeError): it ends the wait.
            if wait is not None and not wait.expired():
                wait.reschedule(now)

    def opening(self) -> asyncio.Timeout:
        """A timeout with no deadline around the opening of a stream: it cuts the opening
        short (TimeoutError) when the client leaves. Call :meth:`opened` after it."""
        self._opening = opening = asyncio.timeout(None)
        return opening

    def opened(self) -> None:
        self._opening = None

    def woken(self) -> asyncio.Future[None]:
        """A future done at the next :meth:`wake` (bounded by the session: every close wakes
        it). A future, not a coroutine: an idle stream waits on it with no frame of its own."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter

    async def send(self, data: bytes) -> None:
        """One body chunk; TimeoutError past ``send_timeout`` (or when shed meanwhile)."""
        async with asyncio.timeout(self._timeout) as sending:
            self._sending = sending
            try:
                await self._send({"type": "http.response.body", "body": data, "more_body": True})
            finally:
                self._sending = None

    async def finish(self) -> None:
        """End the response (best effort: a peer that does not read lets it time out)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._timeout):
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})


async def abort(send: Send) -> None:
    """Drop the connection without flushing: a stalled peer would hold the buffer forever.

    ASGI has no abort; uvicorn's ``send`` is a bound method of the cycle that owns the
    transport. Elsewhere, returning without completing the response closes the connection."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        transport.abort()
        await asyncio.sleep(0)


def keepalive_options(idle: float) -> list[tuple[int, int, int]]:
    """TCP keepalive: probe an idle peer after ``idle`` seconds, drop it when it stays silent,
    so a vanished peer (no FIN, no RST) frees its connection in bounded time."""
    idle_s = max(1, int(idle))
    interval = max(1, idle_s // 3)
    wanted = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), idle_s),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), interval),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_PROBES),
        (
            socket.IPPROTO_TCP,
            getattr(socket, "TCP_USER_TIMEOUT", None),
            (idle_s + interval * KEEPALIVE_PROBES) * 1000,
        ),
    ]
    return [(level, name, value) for level, name, value in wanted if name is not None]


def set_keepalive(sock: Any, idle: float) -> None:
    for level, name, value in keepalive_options(idle):
        with contextlib.suppress(OSError):
            sock.setsockopt(level, name, value)


_listeners_keepalive: float | None = None
"""The keepalive idle every listening socket of this process was given (Linux copies a
listener's options to each connection it accepts), or None."""


def server_sockets(server: Any) -> list[Any]:
    """The listening sockets of a started ``uvicorn.Server`` (its ``servers``: the asyncio
    servers it opened or was given)."""
    return [sock for listener in server.servers for sock in listener.sockets]


def listen_with_keepalive(sockets: Iterable[Any], idle: float) -> None:
    """Set TCP keepalive once on the listening sockets, so no connection needs it set."""
    global _listeners_keepalive
    sockets = list(sockets)
    tcp = [s for s in sockets if s.family in (socket.AF_INET, socket.AF_INET6)]
    for sock in tcp:
        set_keepalive(sock, idle)
    _listeners_keepalive = idle if tcp and len(tcp) == len(sockets) else None


def enable_keepalive(send: Send, idle: float) -> None:
    """TCP keepalive on this response's connection, unless its listener already gave it."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None:
        keep_alive_transport(transport, idle)


def keep_alive_transport(transport: Transport, idle: float) -> None:
    """TCP keepalive on this transport's socket, unless its listener already gave it."""
    if _listeners_keepalive == idle:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        set_keepalive(sock, idle)
