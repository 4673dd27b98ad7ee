"""Connection-level limits on request heads, and the TCP peer, for uvicorn's HTTP protocols.

uvicorn reads a request head for as long as the client takes and buffers it whole before any
size check runs: a client sending one header byte at a time holds its connection forever
(slowloris), and one sending an endless header grows the process by every byte. The protocols
here close a connection whose head is not complete within ``--header-timeout`` seconds (a 408
if some of it arrived, silently if nothing did) or grows past the head bound (a 431), and
record the TCP peer in ``scope["extensions"][PEER_EXTENSION]`` before uvicorn's proxy-headers
middleware rewrites ``scope["client"]`` from ``X-Forwarded-For``.

They rely on these uvicorn internals (``check_uvicorn`` verifies them at start-up, and
tests/gateway/test_connection_limits.py runs real connections through them):

- ``uvicorn.Server`` builds a protocol as ``config.http_protocol_class(config=...,
  server_state=..., app_state=..., _loop=...)`` and ``uvicorn.Config(http=<class>)`` uses the
  class as given;
- ``HttpToolsProtocol``: ``connection_made``, ``connection_lost``, ``data_received`` and the
  parser callbacks ``on_message_begin`` (which creates ``self.scope``), ``on_url``,
  ``on_header`` and ``on_headers_complete`` (which runs ``self.app`` for the request);
  attributes ``app``, ``cycle``, ``transport``, ``client`` and ``loop``;
- ``RequestResponseCycle`` of httptools: ``send``, ``transport``, ``flow``, ``scope``,
  ``response_started``, ``response_complete``, ``chunked_encoding`` (a pre-set ``False`` means no
  chunked framing), ``keep_alive``, ``disconnected``, ``message_event`` and ``on_response``;
- ``H11Protocol``: ``connection_made``, ``connection_lost``, ``data_received`` and
  ``handle_events`` (which sets ``self.scope`` for each request); attributes ``conn`` (an
  ``h11.Connection``), ``transport``, ``client`` and ``loop``; its head size is bounded by
  ``Config.h11_max_incomplete_event_size``.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import typing
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

import h11
import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import (
    get_client_addr,
    get_path_with_query_string,
)

from gateway.errors import HTTPError

try:
    import httptools
except ImportError:  # uvicorn then speaks h11, and no StreamFront is made
    httptools = None  # type: ignore[assignment]

PEER_EXTENSION = "sse_gateway.peer"
CONNECTION_EXTENSION = "sse_gateway.connection"
"""``scope["extensions"]`` key of the httptools protocol serving the request: a direct sink
(``gateway.sinks``) sets its ``lost_listener`` to hear of the connection's loss."""
STREAMS_STATE = "sse_gateway.streams"
"""Lifespan-state key (``app_state``) of the node's :class:`DirectStreams`."""
REQUEST_LINE_BYTES = 8192
"""Allowance for the method, path and version on top of the header and query bounds."""


def head_bound(max_header_bytes: int, max_query_bytes: int) -> int:
    """Bytes of an unfinished request head after which the connection is refused."""
    return max_header_bytes + max_query_bytes + REQUEST_LINE_BYTES


def _refusal(status: int, reason: bytes, error: str, message: str) -> bytes:
    body = orjson.dumps({"error": error, "message": message})
    head = b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\n" % (status, reason)
    head += b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    return head + body


class HeadGuard:
    """The timer and byte count of the request head being read on one connection."""

    __slots__ = ("_head_begun", "_head_bytes", "_head_timer")
    header_timeout: float = 15.0
    max_head_bytes: int = 32768

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop

    def _guard_start(self) -> None:
        self._head_bytes = 0
        self._head_begun = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _head_deadline(self) -> float | None:
        """When the head timer fires (None: not armed)."""
        return self._head_timer.when() if self._head_timer is not None else None

    def _adopt_head_deadline(self, deadline: float) -> None:
        """Keep the deadline of a head that another protocol began reading on this connection."""
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_at(deadline, self._head_timed_out)

    def _head_done(self) -> None:
        self._head_bytes = 0
        self._head_begun = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes:
            self._refuse(
                _refusal(
                    431, b"Request Header Fields Too Large", "headers_too_large",
                    f"the request head must be at most {self.max_head_bytes} bytes",
                )
            )  # fmt: skip

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._head_begun:
            self._refuse(b"")
            return
        self._refuse(
            _refusal(
                408, b"Request Timeout", "header_timeout",
                f"the request headers must arrive within {self.header_timeout:g}s",
            )
        )  # fmt: skip

    def _refuse(self, answer: bytes) -> None:
        """Answer (unless a response is still being written on this connection, which the
        answer would corrupt) and close."""
        self._head_done()
        if self.transport.is_closing():
            return
        cycle = getattr(self, "cycle", None)
        busy = cycle is not None and not getattr(cycle, "response_complete", True)
        if answer and not busy:
            self.transport.write(answer)
        self.transport.close()


class HttpToolsGuard(HeadGuard):
    """Mixed into uvicorn's ``HttpToolsProtocol`` by :func:`protocol_class`."""

    client: tuple[str, int] | None
    scope: Any
    app: Any
    lost_listener: Callable[[], object] | None = None
    """Called once when the connection is lost: a live stream written to directly has no task
    waiting on ASGI ``receive`` to tell it."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._guard_start()
        self._head_begun = False
        self._reading_head = True

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)  # type: ignore[misc]
        listener, self.lost_listener = self.lost_listener, None
        if listener is not None:
            listener()

    def data_received(self, data: bytes) -> None:
        counted = self._reading_head
        super().data_received(data)  # type: ignore[misc]
        if counted and self._reading_head and not self.transport.is_closing():
            # A head that began inside this read is counted from the next one: the bound
            # is then exceeded by at most one read, and a pipelined body is never counted.
            self._count_head(len(data))

    def on_message_begin(self) -> None:
        super().on_message_begin()  # type: ignore[misc]
        extensions = self.scope.setdefault("extensions", {})
        extensions[PEER_EXTENSION] = self.client
        extensions[CONNECTION_EXTENSION] = self
        self._head_begun = True
        self._reading_head = True
        self._head_size = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)  # type: ignore[misc]
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)  # type: ignore[misc]
        self._head_size += len(name) + len(value) + 4

    def on_headers_complete(self) -> None:
        """A complete head over the bound is answered 431 whatever the reads it came in (the
        byte count above only catches unfinished ones): the app never sees it."""
        self._reading_head = False
        self._head_done()
        app = self.app
        if self._head_size > self.max_head_bytes:
            self.app = HTTPError(
                431, "headers_too_large",
                f"the request head must be at most {self.max_head_bytes} bytes",
                {"connection": "close"},
            )  # fmt: skip
        try:
            super().on_headers_complete()  # type: ignore[misc]
        finally:
            self.app = app
        cycle = getattr(self, "cycle", None)
        if self.scope.get("http_version") == "1.0" and type(cycle) is _httptools_cycle():
            cycle.__class__ = _close_delimited_cycle()


def _httptools_cycle() -> type[Any]:
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    return RequestResponseCycle


@functools.cache
def _close_delimited_cycle() -> type[Any]:
    """uvicorn's httptools cycle, except that a response to an HTTP/1.0 request without a
    ``Content-Length`` is delimited by closing the connection: HTTP/1.0 has no chunked
    encoding, and uvicorn would chunk it (an HTTP/1.0 client shows the chunk sizes as data).
    h11 frames HTTP/1.0 responses this way by itself."""

    class CloseDelimitedCycle(_httptools_cycle()):  # type: ignore[misc]
        close_delimited = False
        response_complete: bool

        async def send(self, message: Any) -> None:
            if not self.response_started and message["type"] == "http.response.start":
                names = {bytes(name).lower() for name, _ in message.get("headers", [])}
                if not (
                    names & {b"content-length", b"transfer-encoding"}
                    or self.scope["method"] == "HEAD"
                    or message["status"] in (204, 304)
                ):
                    self.close_delimited = True
                    self.chunked_encoding = False  # uvicorn then adds no chunked framing
                    self.keep_alive = False
            elif self.close_delimited and message["type"] == "http.response.body":
                await self._send_raw(message)
                return
            await super().send(message)

        async def _send_raw(self, message: Any) -> None:
            if self.response_complete:
                raise RuntimeError("response already completed")
            if self.flow.write_paused and not self.disconnected:
                await self.flow.drain()
            if self.disconnected:
                return
            self.transport.write(message.get("body", b""))
            if not message.get("more_body", False):
                self.response_complete = True
                self.message_event.set()
                self.transport.close()
                self.on_response()

    return CloseDelimitedCycle


class H11Guard(HeadGuard):
    """Mixed into uvicorn's ``H11Protocol`` (when httptools is not installed)."""

    client: tuple[str, int] | None
    scope: Any
    conn: h11.Connection

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._guard_start()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_done()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        self._head_begun = True
        self._arm_head_timer()
        super().data_received(data)  # type: ignore[misc]
        if self.conn.their_state is not h11.IDLE:
            self._head_done()

    def handle_events(self) -> None:
        before = self.scope if hasattr(self, "scope") else None
        super().handle_events()  # type: ignore[misc]
        scope = getattr(self, "scope", None)
        if scope is not None and scope is not before:
            scope.setdefault("extensions", {})[PEER_EXTENSION] = self.client


class DirectStreams(typing.Protocol):
    """What the listener's protocol asks to serve a plain ``GET /events`` itself
    (``gateway.stream.EventStream``, found in the lifespan state under :data:`STREAMS_STATE`)."""

    def open_direct(self, scope: dict[str, Any], connection: StreamFront) -> bool: ...


EVENTS_REQUEST_LINES = (b"GET /events?", b"GET /events ")
EVENTS_PREFIX_BYTES = len(EVENTS_REQUEST_LINES[0])
LAST_CHUNK = b"0\r\n\r\n"
PENDING_BOUND = 65536
"""Bytes kept behind an open stream's request before reading pauses (uvicorn's high-water)."""


async def _forwarded_only(scope: Any, receive: Any, send: Any) -> None:
    """The inner app of the proxy-headers step run on a direct stream's scope: nothing."""


class HeadWatch:
    """The head deadlines of one server's fresh connections, swept by one timer. A timer per
    connection, armed at accept and cancelled once the head is read, costs more than all of
    a stream's opening; this costs a dict entry. A head is refused between ``timeout`` and
    ``timeout + tick`` after its connection opened."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.tick = min(1.0, max(0.02, timeout / 4))
        self.deadlines: dict[HeadGuard, float] = {}
        self.timer: asyncio.TimerHandle | None = None

    def watch(self, guard: HeadGuard, seconds: float | None = None) -> None:
        """(Re)start ``guard``'s deadline: ``seconds`` (the head timeout unless given) from now."""
        self.deadlines[guard] = self.loop.time() + (self.timeout if seconds is None else seconds)
        if self.timer is None:
            self.timer = self.loop.call_later(self.tick, self._sweep)

    def forget(self, guard: HeadGuard) -> None:
        self.deadlines.pop(guard, None)

    def deadline(self, guard: HeadGuard) -> float | None:
        return self.deadlines.get(guard)

    def _sweep(self) -> None:
        self.timer = None
        now = self.loop.time()
        due = [guard for guard, deadline in self.deadlines.items() if deadline <= now]
        for guard in due:
            self.deadlines.pop(guard, None)
            guard._head_timed_out()
        if self.deadlines:
            self.timer = self.loop.call_later(self.tick, self._sweep)


_head_watches: weakref.WeakKeyDictionary[Any, HeadWatch] = weakref.WeakKeyDictionary()


def _head_watch(
    server_state: Any, loop: asyncio.AbstractEventLoop | None, timeout: float
) -> HeadWatch:
    """The watch of one server (its ``ServerState``): connections of that server share it, and
    its loop (uvicorn does not always pass one, and asking asyncio costs a system call)."""
    watch = _head_watches.get(server_state)
    if watch is None:
        running = loop or asyncio.get_running_loop()
        watch = _head_watches[server_state] = HeadWatch(running, timeout)
    return watch


class StreamFront(HeadGuard, asyncio.Protocol):
    """The listener's protocol when httptools speaks HTTP/1.1.

    It reads a connection's first request head. A plain ``GET /events`` that the node can open
    at once (``DirectStreams.open_direct``) is answered here: no ASGI cycle, no task, no
    per-request objects once it is live; the session's bytes go to the transport
    (``gateway.sinks.DirectSink``). Every other connection is handed, with the bytes read so
    far, to uvicorn's protocol (:attr:`delegate`), which serves it exactly as it would have;
    so is a kept-alive connection once its stream ended. A connection costs what it costs in
    uvloop and httptools, not what a request cycle costs.

    Like uvicorn's protocol it is in ``server_state.connections`` (a graceful shutdown waits
    for it and calls :meth:`shutdown`) and writes the access line and the default headers."""

    __slots__ = (
        "app_state", "config", "headers", "idle",
        "keep_alive", "loop", "lost_listener", "marked", "message_complete", "messages", "parser",
        "pending", "plain", "received", "server_state", "serving", "transport", "url", "watch",
    )  # fmt: skip

    delegate: type[Any]
    """uvicorn's protocol (with the head limits): set by :func:`protocol_class`."""

    def __init__(
        self,
        config: Any,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.config = config
        self.server_state = server_state
        self.app_state = app_state
        self.watch = _head_watch(server_state, _loop, self.header_timeout)
        self.loop = self.watch.loop
        self.received = b""
        self.pending = b""
        self.parser: Any = None
        self.serving = False
        self.idle = False
        """A kept-alive connection waiting for its next request."""
        self.keep_alive = True
        self.lost_listener: Callable[[], object] | None = None
        """Called once when the connection is lost while a stream is served."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = typing.cast(asyncio.Transport, transport)
        self.server_state.connections.add(self)
        self._guard_start()

    # the head's deadline is kept by the server's HeadWatch, not by a timer of its own

    def _arm_head_timer(self) -> None:
        self.watch.watch(self)

    def _head_deadline(self) -> float | None:
        return self.watch.deadline(self)

    def _head_done(self) -> None:
        self._head_bytes = 0
        self._head_begun = False
        self.watch.forget(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server_state.connections.discard(self)
        self._head_done()
        self.parser = None
        listener, self.lost_listener = self.lost_listener, None
        if listener is not None:
            listener()

    def data_received(self, data: bytes) -> None:
        if self.serving:
            # Bytes behind an event stream's request: the request that follows it on this
            # connection, read once the stream ends. Past a bound, reading pauses, as uvicorn
            # pauses behind a pipelined request.
            self.pending += data
            if len(self.pending) >= PENDING_BOUND:
                self.transport.pause_reading()
            return
        if self.idle:
            # The first byte of a kept-alive connection's next request: its head has
            # ``header_timeout`` from now, as on a fresh connection.
            self.idle = False
            self.watch.watch(self)
        received = self.received = self.received + data
        self._head_begun = True
        if self.parser is None:
            if len(received) < EVENTS_PREFIX_BYTES:
                if not any(line.startswith(received) for line in EVENTS_REQUEST_LINES):
                    self._hand_off()
                return
            if not received.startswith(EVENTS_REQUEST_LINES):
                self._hand_off()
                return
            self.url = b""
            self.headers: list[tuple[bytes, bytes]] = []
            self.marked: set[bytes] = set()
            """Which of :data:`MARKED_HEADERS` the head has (noted as the parser reports them)."""
            self.messages = 0
            self.plain: bool | None = None
            self.message_complete = False
            self.parser = httptools.HttpRequestParser(self)
            data = received
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._hand_off()  # uvicorn answers it as it answers any such request
            return
        if self.message_complete:
            self._open()
        elif self.plain is not None:
            self._hand_off()  # a body follows this head: not a plain GET
        else:
            self._count_head(len(data))

    # httptools callbacks (the first request's head only)

    def on_message_begin(self) -> None:
        self.messages += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in MARKED_HEADERS:
            self.marked.add(name)
        self.headers.append((name, value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        # Read here: once the message is complete, llhttp has reset what these report.
        parser = self.parser
        self.keep_alive = parser.should_keep_alive()
        self.plain = parser.get_http_version() == "1.1" and not parser.should_upgrade()

    def on_message_complete(self) -> None:
        self.message_complete = True

    def _open(self) -> None:
        self.parser = None
        streams: DirectStreams | None = self.app_state.get(STREAMS_STATE)
        scope = None
        if (
            streams is not None
            and self.messages == 1
            and self.plain is True
            and not self.config.root_path
            and self.config.limit_concurrency is None
            and self.marked.isdisjoint(UNUSUAL_HEADERS)
        ):
            scope = self._scope()
        if scope is None:
            self._hand_off()
            return
        self.serving = True
        if not streams.open_direct(scope, self):  # type: ignore[union-attr]
            self.serving = False
            self._hand_off()
            return
        self._head_done()
        self.received = self.url = b""
        del self.headers, self.marked  # nothing reads the head again

    def _scope(self) -> dict[str, Any] | None:
        """The request as uvicorn would give it to the app (behind its proxy-headers step),
        less what the stream never reads (``server``, a copy of the lifespan ``state``); None
        when it is not exactly ``/events``."""
        try:
            parsed = httptools.parse_url(self.url)
        except httptools.HttpParserError:  # uvicorn answers it
            return None
        if parsed.path != b"/events":
            return None
        client = _address(self.transport.get_extra_info("peername"))
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": self.config.asgi_version, "spec_version": "2.3"},
            "http_version": "1.1",
            "client": client,
            "scheme": "https" if self.config.is_ssl else "http",
            "root_path": "",
            "headers": self.headers,
            "method": "GET",
            "path": "/events",
            "raw_path": b"/events",
            "query_string": parsed.query or b"",
            "extensions": {PEER_EXTENSION: client},
        }
        if (
            self.config.proxy_headers
            and not self.marked.isdisjoint(FORWARDING_HEADERS)
            and not _run_at_once(_proxy_headers(self.config)(scope, None, None))
        ):
            return None
        return scope

    # what the stream asks of its connection

    def start_response(
        self, scope: Any, headers: list[tuple[bytes, bytes]], first_chunk: bytes
    ) -> None:
        """``200`` with ``headers``, chunked, and the body's first chunk: one write (and the
        access line uvicorn would write)."""
        access = ACCESS_LOG
        if access.hasHandlers():
            access.info(
                '%s - "%s %s HTTP/%s" %d', get_client_addr(scope), "GET",
                get_path_with_query_string(scope), "1.1", 200,
            )  # fmt: skip
        content = [b"HTTP/1.1 200 OK\r\n"]
        for name, value in (*self.server_state.default_headers, *headers):
            content += (name, b": ", value, b"\r\n")
        if not self.keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"transfer-encoding: chunked\r\n\r\n", first_chunk)
        self.transport.write(b"".join(content))

    def end_response(self, last: bytes, abort: bool = False) -> None:
        """End the stream: its last chunks and the terminating one (or drop the connection when
        ``abort``). A kept-alive connection's next request is then read afresh, as its first
        was: direct again if it can be, else by uvicorn."""
        self.serving = False
        self.lost_listener = None
        transport = self.transport
        if transport.is_closing():
            return
        if abort:
            transport.abort()
            return
        transport.write(last + LAST_CHUNK)
        self.server_state.total_requests += 1
        if not self.keep_alive:
            transport.close()
            return
        pending, self.pending = self.pending, b""
        self._head_done()
        self.server_state.connections.discard(self)
        front = type(self)(
            config=self.config,
            server_state=self.server_state,
            app_state=self.app_state,
            _loop=self.loop,
        )
        transport.set_protocol(front)
        front.connection_made(transport)
        transport.resume_reading()
        if not pending:
            # Idle until the next request: closed silently after uvicorn's keep-alive timeout.
            front.idle = True
            front.watch.watch(front, self.config.timeout_keep_alive)
            return
        try:
            front.data_received(pending)
        except Exception as exc:  # as uvloop does when a protocol's read callback fails
            self.loop.call_exception_handler(
                {"message": "reading a kept-alive request failed", "exception": exc}
            )
            transport.abort()

    def shutdown(self) -> None:
        """The server is stopping: a stream ends its connection when it ends (the drain ends
        the streams); a connection still reading its head is closed."""
        if self.serving:
            self.keep_alive = False
        else:
            self.transport.close()

    def _hand_off(self) -> None:
        """uvicorn's protocol serves this connection from here, from the bytes read so far,
        within what is left of the head's deadline."""
        deadline = self._head_deadline()
        received, self.received = self.received, b""
        self.parser = None
        delegate = self._hand_over()
        if deadline is not None:
            delegate._adopt_head_deadline(deadline)
        if received:
            delegate.data_received(received)

    def _hand_over(self) -> Any:
        self._head_done()
        self.server_state.connections.discard(self)
        delegate = self.delegate(
            config=self.config,
            server_state=self.server_state,
            app_state=self.app_state,
            _loop=self.loop,
        )
        self.transport.set_protocol(delegate)
        delegate.connection_made(self.transport)
        return delegate


ACCESS_LOG = logging.getLogger("uvicorn.access")
"""uvicorn's access logger (``--no-access-log`` leaves it no handler)."""
FORWARDING_HEADERS = frozenset({b"x-forwarded-for", b"x-forwarded-proto"})
"""The headers uvicorn's proxy-headers step reads: without them it changes nothing."""
UNUSUAL_HEADERS = frozenset({b"expect", b"upgrade", b"content-length", b"transfer-encoding"})
"""A ``GET /events`` with one of these is left to uvicorn (a body, an upgrade, 100-continue)."""
MARKED_HEADERS = FORWARDING_HEADERS | UNUSUAL_HEADERS


def _address(info: Any) -> tuple[str, int] | None:
    """A TCP address as uvicorn's scope holds it, from ``peername`` or ``sockname`` (uvicorn
    reads the same from a socket object, which uvloop builds afresh at each call)."""
    if isinstance(info, tuple) and len(info) >= 2:
        return (str(info[0]), int(info[1]))
    return None


def _run_at_once(coroutine: Coroutine[Any, Any, None]) -> bool:
    """Run a coroutine that never waits to its end now (False, closed, if it would wait)."""
    try:
        coroutine.send(None)
    except StopIteration:
        return True
    coroutine.close()
    return False


_proxy_steps: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _proxy_headers(config: Any) -> Any:
    """uvicorn's proxy-headers step as the server applies it (``Config.load``), for a direct
    stream's scope: the same trusted addresses, the same rewriting."""
    step = _proxy_steps.get(config)
    if step is None:
        from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

        step = ProxyHeadersMiddleware(_forwarded_only, trusted_hosts=config.forwarded_allow_ips)
        _proxy_steps[config] = step
    return step


def protocol_class(http: str, header_timeout: float, max_head_bytes: int) -> type[Any]:
    """uvicorn's ``http`` protocol (``"httptools"`` or ``"h11"``) with the head limits."""
    check_uvicorn()
    limits: dict[str, Any] = {"header_timeout": header_timeout, "max_head_bytes": max_head_bytes}
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        guarded = type("GuardedHttpToolsProtocol", (HttpToolsGuard, HttpToolsProtocol), limits)
        return type(
            "GuardedStreamFront", (StreamFront,), {**limits, "__slots__": (), "delegate": guarded}
        )
    return type("GuardedH11Protocol", (H11Guard, H11Protocol), limits)


REQUIRED: dict[str, tuple[str, ...]] = {
    "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol": (
        "connection_made", "connection_lost", "data_received", "on_message_begin", "on_url",
        "on_header", "on_headers_complete", "timeout_keep_alive_handler",
    ),
    "uvicorn.middleware.proxy_headers:ProxyHeadersMiddleware": ("__call__",),
    "uvicorn.protocols.http.httptools_impl:RequestResponseCycle": ("send", "run_asgi"),
    "uvicorn.protocols.http.h11_impl:H11Protocol": (
        "connection_made", "connection_lost", "data_received", "handle_events",
    ),
}  # fmt: skip
INIT_PARAMETERS = ("config", "server_state", "app_state", "_loop")


SERVER_STATE = ("connections", "default_headers", "total_requests")
"""What :class:`StreamFront` reads of uvicorn's ``ServerState``, as a connection does."""
CONFIG = ("asgi_version", "root_path", "limit_concurrency", "proxy_headers",
          "forwarded_allow_ips", "timeout_keep_alive", "is_ssl")  # fmt: skip


def _init_source(cls: type[Any]) -> str:
    try:
        return inspect.getsource(cls.__init__)
    except (OSError, TypeError):
        return ""


def check_uvicorn() -> None:
    """Fail at start-up, naming what changed, if uvicorn no longer has what this relies on."""
    import importlib

    for target, methods in REQUIRED.items():
        module_name, _, class_name = target.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except ImportError:
            if "httptools" in module_name:
                continue  # h11 is used instead
            raise
        missing = [name for name in methods if not callable(getattr(cls, name, None))]
        if class_name.endswith("Protocol"):
            parameters = inspect.signature(cls.__init__).parameters
            missing += [f"__init__({name}=)" for name in INIT_PARAMETERS if name not in parameters]
        if class_name == "HttpToolsProtocol" and "timeout_keep_alive_task" not in _init_source(cls):
            missing.append("timeout_keep_alive_task")
        if missing:
            raise RuntimeError(
                f"this uvicorn's {class_name} lacks {', '.join(missing)}: gateway/protocol.py "
                "needs updating for it"
            )
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    # Not a Config instance: making one configures logging for the whole process.
    options = inspect.signature(Config.__init__).parameters
    state = ServerState()
    lacking = [f"ServerState.{name}" for name in SERVER_STATE if not hasattr(state, name)]
    lacking += [
        f"Config.{name}" for name in CONFIG if name not in options and not hasattr(Config, name)
    ]
    if lacking:
        raise RuntimeError(
            f"this uvicorn lacks {', '.join(lacking)}: gateway/protocol.py needs updating for it"
        )
