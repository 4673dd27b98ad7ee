"""Connections do not live forever: ``--max-lifetime`` ends each stream after a jittered time
(telling the client when to come back, and it resumes with nothing lost), and
``--tcp-keepalive`` makes the kernel probe idle clients so a vanished one is released."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import GatewayFactory, NodeFactory
from tests.support.sse import SSEStream
from tests.support.waiting import let_time_pass_async, wait_until

LIFETIME = 2.0
RETRY_MS = 3000
RETRY_AT_END = re.compile(rb"retry: (\d+)\n\n\Z")


class TimedStream(SSEStream):
    """An SSE stream that also keeps the raw bytes and when it opened and closed."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.raw = b""
        self.opened_at = 0.0
        self.closed_at = 0.0

    async def read(self, client: httpx.AsyncClient) -> None:
        async with client.stream("GET", self.url, headers=self.headers) as response:
            self.opened_at = time.monotonic()
            self.status = response.status_code
            self._changed.set()
            async for chunk in response.aiter_raw():
                self.raw += chunk
                self.events.extend(self.parser.feed(chunk))
                self._changed.set()
        self.closed_at = time.monotonic()
        self.closed_by_server = True
        self._changed.set()


# -- maximum lifetime ----------------------------------------------------------------------------


def test_a_stream_is_closed_after_its_lifetime_and_resumes_with_nothing_lost(
    node_factory: NodeFactory,
) -> None:
    node = node_factory("--max-lifetime", str(LIFETIME), "--retry-ms", str(RETRY_MS))
    start = node.publish("t", "start")
    published: list[str] = []
    stop = threading.Event()

    def publish_all_along() -> None:
        with node.new_publisher() as pub:
            while not stop.is_set():
                published.append(pub.publish("t", f"e{len(published)}"))
                time.sleep(0.02)  # the publisher's pace: about 50 events a second

    async def scenario() -> list[TimedStream]:
        lives: list[TimedStream] = []
        publisher = threading.Thread(target=publish_all_along)
        publisher.start()
        try:
            async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
                last = start
                for _ in range(2):
                    stream = TimedStream(node.url, ["t"], last_event_id=last)
                    lives.append(stream)
                    task = asyncio.create_task(stream.read(http))
                    try:
                        await stream.wait_for(lambda s: s.closed_by_server, timeout=LIFETIME + 3)
                    finally:
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                    last = stream.parser.last_id or last
                stop.set()
                await asyncio.to_thread(publisher.join)
                final = await asyncio.to_thread(node.publish, "t", "end")
                published.append(final)
                resumed = TimedStream(node.url, ["t"], last_event_id=last)
                task = asyncio.create_task(resumed.read(http))
                try:
                    await resumed.wait_for(lambda s: s.parser.last_id == final, timeout=10)
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                lives.append(resumed)
        finally:
            stop.set()
            publisher.join()
        return lives

    *closed, resumed = asyncio.run(scenario())
    for stream in closed:
        assert stream.status == 200
        lived = stream.closed_at - stream.opened_at
        assert LIFETIME * 0.9 - 0.05 <= lived <= LIFETIME + 0.5, lived
        farewell = RETRY_AT_END.search(stream.raw)
        assert farewell, f"no retry: line at the end of the stream: {stream.raw[-80:]!r}"
        assert RETRY_MS // 2 <= int(farewell.group(1)) <= RETRY_MS * 3 // 2
    received = [e.id for stream in [*closed, resumed] for e in stream.events]
    assert received == published, (
        f"{len(received)} received, {len(published)} published, "
        f"{len(received) - len(set(received))} duplicates, "
        f"missing {sorted(set(published) - set(received))[:5]}"
    )
    assert all(stream.events for stream in closed), "a lifetime passed without any event"


def test_without_a_maximum_lifetime_a_stream_stays_open(gateway_factory: GatewayFactory) -> None:
    node = gateway_factory("--heartbeat", "0.5")

    async def scenario() -> TimedStream:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
            stream = TimedStream(node.url, ["t"])
            task = asyncio.create_task(stream.read(http))
            try:
                await stream.wait_for(lambda s: s.status == 200)
                await let_time_pass_async(LIFETIME + 0.5, "longer than a lifetime would be")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return stream

    stream = asyncio.run(scenario())
    assert stream.status == 200
    assert not stream.closed_by_server
    assert stream.parser.comments.count("ping") >= 2


def test_lifetimes_are_jittered_so_clients_do_not_return_together(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory("--max-lifetime", str(LIFETIME), "--connect-rate", "0")

    async def scenario() -> list[TimedStream]:
        limits = httpx.Limits(max_connections=20)
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None), limits=limits) as http:
            streams = [TimedStream(gateway.url, ["t"]) for _ in range(10)]
            tasks = [asyncio.create_task(s.read(http)) for s in streams]
            try:
                for stream in streams:
                    await stream.wait_for(lambda s: s.closed_by_server, timeout=LIFETIME + 3)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return streams

    streams = asyncio.run(scenario())
    lived = sorted(s.closed_at - s.opened_at for s in streams)
    assert lived[-1] - lived[0] >= 0.02, f"every stream lived the same time: {lived}"
    hints = {RETRY_AT_END.search(s.raw).group(1) for s in streams}  # type: ignore[union-attr]
    assert len(hints) > 1, f"every client was told the same retry: {hints}"


# -- TCP keepalive -------------------------------------------------------------------------------


@pytest.fixture
def ss() -> str:
    binary = shutil.which("ss")
    if binary is None:
        pytest.skip("needs ss (iproute2) to read the server socket's timers")
    return binary


@pytest.fixture
def raw_stream() -> Iterator[list[socket.socket]]:
    """Plain sockets holding streams open; closed at the end of the test."""
    sockets: list[socket.socket] = []
    yield sockets
    for sock in sockets:
        sock.close()


def open_raw_stream(port: int, sockets: list[socket.socket]) -> int:
    """Open ``GET /events`` on a plain socket, read the headers; return the local port."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sockets.append(sock)
    sock.sendall(
        b"GET /events?topic=t HTTP/1.1\r\nhost: 127.0.0.1\r\naccept: text/event-stream\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, f"the gateway closed the stream: {head!r}"
        head += chunk
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return int(sock.getsockname()[1])


def server_socket_timer(ss: str, server_port: int, client_port: int) -> str:
    """The ``timer:(...)`` of the gateway's end of the connection ('' if it has none)."""
    result = subprocess.run(
        [ss, "-tnoiH", "state", "established",
         f"( sport = :{server_port} and dport = :{client_port} )"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert f":{client_port}" in result.stdout, f"no such socket in ss output: {result.stdout!r}"
    match = re.search(r"timer:\(([^)]*)\)", result.stdout)
    return match.group(1) if match else ""


@pytest.mark.parametrize(("flags", "idle"), [(["--tcp-keepalive", "7"], 7.0), ([], 30.0)],
                         ids=["7s", "default"])  # fmt: skip
def test_the_gateway_turns_tcp_keepalive_on_for_stream_sockets(
    gateway_factory: GatewayFactory,
    ss: str,
    raw_stream: list[socket.socket],
    flags: list[str],
    idle: float,
) -> None:
    gateway = gateway_factory(*flags)
    client_port = open_raw_stream(gateway.port, raw_stream)

    timers: list[str] = []

    def keepalive() -> bool:
        timers.append(server_socket_timer(ss, gateway.port, client_port))
        return timers[-1].startswith("keepalive")

    wait_until(keepalive, "a keepalive timer on the server socket", 5)
    timer = timers[-1]

    # ``keepalive,7sec,0`` (iproute2 6.1 writes ``6.996ms`` for 6.996 s): the first probe is
    # due within the configured idle time, not after the kernel's default of two hours.
    due = re.fullmatch(r"keepalive,([\d.]+)(?:ms|sec),\d+", timer)
    assert due, f"not due within a minute: {timer}"
    assert 0 < float(due.group(1)) <= idle, timer


def test_tcp_keepalive_zero_leaves_stream_sockets_without_keepalive(
    gateway_factory: GatewayFactory, ss: str, raw_stream: list[socket.socket]
) -> None:
    gateway = gateway_factory("--tcp-keepalive", "0")
    client_port = open_raw_stream(gateway.port, raw_stream)
    # once the preamble is acknowledged, no retransmission timer ("on") either
    timers: list[str] = []

    def acknowledged() -> bool:
        timers.append(server_socket_timer(ss, gateway.port, client_port))
        return not timers[-1].startswith("on")

    wait_until(acknowledged, "the preamble acknowledged", 5)
    assert timers[-1] == ""
