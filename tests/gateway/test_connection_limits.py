"""Connection-level attacks on a node without a proxy (issue 10 E).

- Half-sent request headers were never timed out: a slowloris client held its connection (and
  a file descriptor) for as long as it kept trickling bytes. A head must now be complete within
  ``--header-timeout`` seconds.
- Header bytes were unbounded while being read: 4 x 64 MiB of unfinished headers grew the
  process by 257 MB before the 431 check ran. An unfinished head is now refused once it passes
  ``--max-header-bytes`` + ``--max-query-bytes`` + 8 KiB for the request line.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.protocol import PEER_EXTENSION, check_uvicorn, head_bound, protocol_class
from tests.support.gateway import GatewayProcess
from tests.support.waiting import wait_until

HEAD_START = b"GET /events?topic=slow HTTP/1.1\r\nHost: 127.0.0.1\r\n"


@pytest.fixture
def node() -> Iterator[GatewayProcess]:
    """A node whose headers must arrive within 1 s. The timeout is given by variable, so the
    same test runs (and fails) on a build without it."""
    env = {"SSE_GATEWAY_HEADER_TIMEOUT": "1"}
    gateway = GatewayProcess("--connect-rate", "0", "--heartbeat", "0.3", env=env)
    try:
        yield gateway.start()
    finally:
        gateway.close()


def connect(gateway: GatewayProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    sock.setblocking(False)
    return sock


def closed_by_server(sock: socket.socket) -> bool | None:
    """True once the server closed (or reset) the connection; None while it stays open."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return None
    except OSError:
        return True


def test_slowloris_connections_are_closed_after_the_header_timeout(
    node: GatewayProcess,
) -> None:
    """Issue 10 E, slowloris: heads trickled a line at a time, and connections that send
    nothing, are closed once the header timeout passes."""
    trickling = [connect(node) for _ in range(20)]
    silent = [connect(node) for _ in range(5)]
    for sock in trickling:
        sock.send(HEAD_START)
    deadline = time.monotonic() + 10
    open_ = set(trickling + silent)
    line = 0
    while open_ and time.monotonic() < deadline:
        for sock in list(open_):
            if closed_by_server(sock):
                open_.discard(sock)
            elif sock in trickling:
                with contextlib.suppress(OSError):
                    sock.send(b"X-Slow-%d: y\r\n" % line)
        line += 1
        time.sleep(0.1)  # a header line every 0.1 s from the trickling clients
    held = len(open_)
    for sock in trickling + silent:
        sock.close()
    assert held == 0, f"{held} of 25 half-open connections still held after 10s"
    assert node.process is not None
    assert node.process.poll() is None


def test_a_slow_head_gets_a_408_and_a_stream_outlives_the_header_timeout(
    node: GatewayProcess,
) -> None:
    """Issue 10 E, slowloris: the timeout covers the head only. A started head that does not
    finish is answered 408 JSON; a stream whose head arrived stays open past the timeout."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as stream:
        stream.sendall(b"GET /events?topic=fine HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as slow:
            slow.sendall(HEAD_START)
            answer = b""
            while chunk := slow.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert b'"error":"header_timeout"' in answer
        received = b""
        while received.count(b": ping") < 6:  # 1.8 s of heartbeats: past the 1 s timeout
            chunk = stream.recv(65536)
            assert chunk, f"the stream was closed: {received!r}"
            received += chunk
        assert received.startswith(b"HTTP/1.1 200 ")


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def send_unfinished_header(port: int, limit: int) -> tuple[int, bytes]:
    """Send one endless header, up to ``limit`` bytes; return the bytes sent before the server
    refused, and what it answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sent = 0
    try:
        sock.sendall(HEAD_START + b"X-Endless: ")
        chunk = b"x" * 65536
        while sent < limit:
            try:
                sock.sendall(chunk)
            except OSError:
                break
            sent += len(chunk)
        sock.settimeout(0.5 if sent >= limit else 10)
        try:
            answer = sock.recv(65536)
        except (TimeoutError, OSError):
            answer = b""
        return sent, answer
    finally:
        sock.close()


def test_an_endless_header_is_refused_before_it_grows_the_process(node: GatewayProcess) -> None:
    """Issue 10 E, unbounded header bytes: 4 connections each sending 16 MiB of one
    unfinished header grew the node by tens of MB; each is now refused after a bounded head
    (a 431, or a reset when the refusal races the client's writes)."""
    assert node.process is not None
    before = rss(node.pid)
    limit = 16 << 20
    results = [send_unfinished_header(node.port, limit) for _ in range(4)]
    grown = rss(node.pid) - before
    for sent, answer in results:
        assert sent < limit, "the node read 16 MiB of one unfinished header"
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert grown < 8 << 20, f"RSS grew by {grown / 1e6:.1f} MB"


def test_the_uvicorn_internals_the_limits_rely_on_are_there() -> None:
    """gateway/protocol.py subclasses uvicorn's protocols: an upgrade that renames what it
    overrides fails here, and at start-up, rather than silently dropping the limits."""
    check_uvicorn()
    for http in ("httptools", "h11"):
        cls = protocol_class(http, 3.0, head_bound(100, 100))
        assert cls.header_timeout == 3.0
        assert cls.max_head_bytes == 100 + 100 + 8192
        assert PEER_EXTENSION == "sse_gateway.peer"


def test_a_complete_head_over_the_bound_is_a_431_however_it_arrives(node: GatewayProcess) -> None:
    """Issue 10 E, unbounded header bytes: a complete head over the bound gets the same JSON
    431 whether it came in one read or many, and the app never sees it."""
    head = HEAD_START + b"X-Big: " + b"x" * 40_000 + b"\r\n\r\n"
    for pieces in ([head], [head[i : i + 1000] for i in range(0, len(head), 1000)]):
        with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
            for piece in pieces:
                with contextlib.suppress(OSError):
                    sock.sendall(piece)
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    answer += chunk
        assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
        if len(pieces) == 1:
            assert b'"error":"headers_too_large"' in answer, answer[:300]


def test_the_h11_fallback_has_the_same_limits_and_records_the_peer() -> None:
    """Without httptools uvicorn speaks h11: the header timeout and the peer record hold there
    too (its head size is bounded by ``h11_max_incomplete_event_size``)."""
    import asyncio
    import threading

    import uvicorn

    from tests.support.ports import free_port

    peers: list[object] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        peers.append((scope.get("extensions") or {}).get(PEER_EXTENSION))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
        http=protocol_class("h11", 0.5, head_bound(100, 100)),
        h11_max_incomplete_event_size=head_bound(100, 100),
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "uvicorn started", 10, step=0.02)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 204 ")
            assert peers == [("127.0.0.1", sock.getsockname()[1])], peers
        with socket.create_connection(("127.0.0.1", port), timeout=10) as slow:
            slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            answer = b""
            while chunk := slow.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    finally:
        server.should_exit = True
        thread.join(10)
