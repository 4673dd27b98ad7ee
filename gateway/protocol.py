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
from collections.abc import Callable
from typing import Any

import h11
import orjson
from uvicorn.protocols.http.h11_impl import H11Protocol

from gateway.errors import HTTPError

PEER_EXTENSION = "sse_gateway.peer"
CONNECTION_EXTENSION = "sse_gateway.connection"
"""``scope["extensions"]`` key of the httptools protocol serving the request: a direct sink
(``gateway.sinks``) sets its ``lost_listener`` to hear of the connection's loss."""
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


def protocol_class(http: str, header_timeout: float, max_head_bytes: int) -> type[Any]:
    """uvicorn's ``http`` protocol (``"httptools"`` or ``"h11"``) with the head limits."""
    check_uvicorn()
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        bases: tuple[type[Any], ...] = (HttpToolsGuard, HttpToolsProtocol)
    else:
        bases = (H11Guard, H11Protocol)
    limits = {"header_timeout": header_timeout, "max_head_bytes": max_head_bytes}
    return type(f"Guarded{bases[1].__name__}", bases, limits)


REQUIRED: dict[str, tuple[str, ...]] = {
    "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol": (
        "connection_made", "connection_lost", "data_received", "on_message_begin", "on_url",
        "on_header", "on_headers_complete",
    ),
    "uvicorn.protocols.http.httptools_impl:RequestResponseCycle": ("send", "run_asgi"),
    "uvicorn.protocols.http.h11_impl:H11Protocol": (
        "connection_made", "connection_lost", "data_received", "handle_events",
    ),
}  # fmt: skip
INIT_PARAMETERS = ("config", "server_state", "app_state", "_loop")


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
        if missing:
            raise RuntimeError(
                f"this uvicorn's {class_name} lacks {', '.join(missing)}: gateway/protocol.py "
                "needs updating for it"
            )
