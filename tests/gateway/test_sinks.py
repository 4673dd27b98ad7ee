"""What ``gateway.sinks`` relies on in uvicorn, checked against a real uvicorn server (the
gateway's own httptools protocol) on a loopback port: if an upgrade changes any of it, these
fail, naming what changed, instead of streams silently taking the slow path or hanging."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvicorn

from gateway.protocol import CONNECTION_EXTENSION, check_uvicorn, protocol_class
from gateway.session import CloseReason, Session
from gateway.sinks import (
    HTTPTOOLS_MODULE,
    AsgiSink,
    DirectSink,
    abort,
    direct_sink,
    http_chunk,
    keepalive_options,
    listen_with_keepalive,
    server_sockets,
)
from tests.support.waiting import wait_until_async

TIMEOUT = 5.0
Handler = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def serve(handler: Handler, request: bytes) -> tuple[bytes, dict[str, Any]]:
    """Run ``handler`` as the ASGI app of a uvicorn server with the gateway's httptools
    protocol, send it ``request`` from a raw client, and return what the client read (until
    the server closed or the handler asked the client to hang up) and what the handler saw."""
    seen: dict[str, Any] = {"hang_up": asyncio.Event(), "done": asyncio.Event()}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        try:
            await handler(scope, send, seen)
        finally:
            seen["done"].set()

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    config = uvicorn.Config(
        app, http=protocol_class("httptools", 10.0, 65536), lifespan="off", log_level="error"
    )
    server = uvicorn.Server(config)
    running = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        await wait_until_async(lambda: server.started, "uvicorn started", TIMEOUT, 0.01)
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection(*listener.getsockname())
            writer.write(request)
            received = b""
            while not seen["hang_up"].is_set():
                read = asyncio.ensure_future(reader.read(65536))
                hang_up = asyncio.ensure_future(seen["hang_up"].wait())
                await asyncio.wait({read, hang_up}, return_when=asyncio.FIRST_COMPLETED)
                hang_up.cancel()
                if not read.done():
                    read.cancel()
                    break
                try:
                    chunk = read.result()
                except ConnectionError:
                    seen["reset"] = True
                    break
                if not chunk:
                    break
                received += chunk
            writer.close()
            await seen["done"].wait()
    finally:
        server.should_exit = True
        await asyncio.wait_for(running, TIMEOUT)
    return received, seen


GET = b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
GET_AND_CLOSE = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
START = {"type": "http.response.start", "status": 200, "headers": []}


def test_uvicorn_still_has_what_the_protocol_subclasses_override() -> None:
    check_uvicorn()


def test_a_chunked_httptools_response_gets_a_direct_sink_that_writes_chunks() -> None:
    async def handler(scope: dict[str, Any], send: Any, seen: dict[str, Any]) -> None:
        cycle = getattr(send, "__self__", None)
        seen["module"] = type(cycle).__module__
        seen["connection"] = scope["extensions"].get(CONNECTION_EXTENSION)
        await send(START)
        seen["chunked"] = getattr(cycle, "chunked_encoding", None)
        sink = direct_sink(scope, send)
        assert sink is not None, seen
        seen["buffered"] = sink.buffered()
        sink.write(http_chunk(b"hello"))
        lost = asyncio.Event()
        sink.watch(lost.set)
        seen["hang_up"].set()
        async with asyncio.timeout(TIMEOUT):
            await lost.wait()  # the protocol's connection_lost tells the sink
        seen["lost"] = True
        seen["closing"] = sink.transport.is_closing()

    received, seen = asyncio.run(serve(handler, GET))
    assert seen["module"] == HTTPTOOLS_MODULE
    assert seen["connection"] is not None
    assert seen["chunked"] is True
    assert seen["buffered"] == 0
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert body == b"5\r\nhello\r\n"
    assert seen["lost"]
    assert seen["closing"]


def test_the_end_of_a_direct_response_is_uvicorns_terminating_chunk() -> None:
    async def handler(scope: dict[str, Any], send: Any, seen: dict[str, Any]) -> None:
        await send(START)
        sink = direct_sink(scope, send)
        assert isinstance(sink, DirectSink)
        sink.write(http_chunk(b"last"))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    received, _ = asyncio.run(serve(handler, GET_AND_CLOSE))
    assert received.endswith(b"4\r\nlast\r\n0\r\n\r\n")


def test_abort_drops_the_connection_without_the_terminating_chunk() -> None:
    async def handler(scope: dict[str, Any], send: Any, seen: dict[str, Any]) -> None:
        await send(START)
        await send({"type": "http.response.body", "body": b"x", "more_body": True})
        await abort(send)

    received, _ = asyncio.run(serve(handler, GET))
    assert received.endswith(b"1\r\nx\r\n")
    assert not received.endswith(b"0\r\n\r\n")


def test_an_http_1_0_response_is_not_chunked_and_gets_no_direct_sink() -> None:
    async def handler(scope: dict[str, Any], send: Any, seen: dict[str, Any]) -> None:
        await send(START)
        seen["sink"] = direct_sink(scope, send)
        await send({"type": "http.response.body", "body": b"plain", "more_body": False})

    received, seen = asyncio.run(serve(handler, b"GET / HTTP/1.0\r\n\r\n"))
    assert seen["sink"] is None
    assert received.endswith(b"\r\n\r\nplain")


def test_a_wrapped_send_gets_no_direct_sink() -> None:
    async def handler(scope: dict[str, Any], send: Any, seen: dict[str, Any]) -> None:
        async def wrapped(message: Any) -> None:
            await send(message)

        await wrapped(START)
        seen["sink"] = direct_sink(scope, wrapped)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    _, seen = asyncio.run(serve(handler, GET_AND_CLOSE))
    assert seen["sink"] is None


@pytest.mark.skipif(not hasattr(socket, "TCP_KEEPIDLE"), reason="Linux keepalive options")
def test_keepalive_set_on_the_listener_is_inherited_by_each_connection() -> None:
    """Linux copies a listening socket's options to the sockets it accepts: keepalive is set
    once, not per connection."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listen_with_keepalive([listener], 30)
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT):
            accepted, _ = listener.accept()
            with accepted:
                for level, name, value in keepalive_options(30):
                    assert accepted.getsockopt(level, name) == value, (level, name)


def test_a_started_uvicorn_server_lists_its_listening_sockets() -> None:
    """The CLI sets keepalive on the sockets uvicorn listens on, found through the server."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        return None

    async def scenario() -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            config = uvicorn.Config(app, lifespan="off", log_level="error")
            server = uvicorn.Server(config)
            running = asyncio.create_task(server.serve(sockets=[listener]))
            try:
                await wait_until_async(lambda: server.started, "uvicorn started", TIMEOUT, 0.01)
                names = [sock.getsockname() for sock in server_sockets(server)]
                assert names == [listener.getsockname()]
            finally:
                server.should_exit = True
                await asyncio.wait_for(running, TIMEOUT)

    asyncio.run(scenario())


def _asgi_session(timeout: float) -> tuple[Session, AsgiSink]:
    async def never_sent(message: Any) -> None:
        await asyncio.Event().wait()

    session = Session(("a",), None, 10_000)
    asgi = AsgiSink(never_sent, timeout)
    session.listener = asgi.closing
    return session, asgi


def test_a_shed_that_races_an_expiring_send_timeout_closes_without_raising() -> None:
    """A send timeout that has fired but whose task has not run yet cannot be moved; a slow
    consumer shed in that same loop turn (from the hub's fan-out) must still just close."""

    async def scenario() -> None:
        session, asgi = _asgi_session(10)
        loop = asyncio.get_running_loop()
        closed: list[bool] = []

        async def a_send_that_times_out() -> None:
            # Callbacks run in order: the timeout fires (the send's task is told to stop, but
            # has not run yet), then the shed closes the session, then the task runs.
            async with asyncio.timeout(0) as sending:
                asgi._sending = sending
                loop.call_soon(lambda: closed.append(session.close("slow_consumer")))
                await asyncio.sleep(1)

        with pytest.raises(TimeoutError):
            await a_send_that_times_out()
        assert closed == [True]
        assert session.reason is CloseReason.SLOW_CONSUMER

    asyncio.run(scenario())


def test_a_failing_close_listener_does_not_escape_into_the_caller() -> None:
    session = Session(("a",), None, 10_000)

    def broken(closing: Session) -> None:
        raise RuntimeError("a driver bug")

    session.listener = broken
    assert session.close("slow_consumer") is True
    assert session.closed


def test_any_close_cuts_a_stream_s_opening_short() -> None:
    """A drain (``shutdown``) must not wait for a subscribe or a history read of a stream it
    closed: the opening ends at once, whatever the close reason."""

    async def scenario() -> None:
        session, asgi = _asgi_session(10)

        async def opening() -> None:
            async with asgi.opening():
                await asyncio.Event().wait()  # a subscribe that never answers

        task = asyncio.create_task(opening())
        await wait_until_async(lambda: asgi._opening is not None, "the opening began", TIMEOUT)
        session.close("shutdown")
        done, _ = await asyncio.wait({task}, timeout=TIMEOUT)
        assert task in done, "the opening was still waiting after the stream closed"
        assert isinstance(task.exception(), TimeoutError)

    asyncio.run(scenario())


def test_checking_uvicorn_leaves_the_process_logging_alone() -> None:
    """``check_uvicorn`` runs when the protocol class is made: it must not configure logging
    (making a ``uvicorn.Config`` does), which would bring back a disabled access log."""
    import logging

    access = logging.getLogger("uvicorn.access")
    saved = access.handlers, access.propagate
    access.handlers, access.propagate = [], False
    try:
        check_uvicorn()
        assert (access.handlers, access.propagate) == ([], False)
    finally:
        access.handlers, access.propagate = saved
