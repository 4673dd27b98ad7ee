"""The listener's protocol (``gateway.protocol.StreamFront``): a fresh ``GET /events`` on topics
the node follows is served below uvicorn's request cycle, and everything else is handed to
uvicorn with the bytes read so far. Checked on a real node (the gateway app under uvicorn with
the gateway's protocol, in this process, so the test can see which protocol serves each
connection) with raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

import jwt
import pytest
import uvicorn

from gateway.app import Gateway
from gateway.config import Settings
from gateway.protocol import StreamFront, protocol_class
from gateway.stream import MAX_QUERY_FIELDS, query_fields
from publisher.protocol import make_message
from tests.support.clients import ChunkedDecoder
from tests.support.tokens import claims, rsa_jwk, rsa_key, sign
from tests.support.waiting import wait_until_async

TIMEOUT = 5.0


@contextlib.asynccontextmanager
async def node(
    front: bool = True, **options: Any
) -> AsyncIterator[tuple[Gateway, uvicorn.Server, int]]:
    """A node on the in-memory engine, on a free loopback port, in this loop; with
    ``front=False`` it runs uvicorn's protocol (with the head limits) alone, as before."""
    options.setdefault("allow_anonymous", True)
    settings = Settings(host="127.0.0.1", port=0, **options)
    gateway = Gateway(settings)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    http = protocol_class("httptools", 5.0, 65536)
    config = uvicorn.Config(
        gateway.app(), http=http if front else http.delegate, log_level="error",
        forwarded_allow_ips="127.0.0.1", timeout_graceful_shutdown=1,
    )  # fmt: skip
    server = uvicorn.Server(config)
    running = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        await wait_until_async(lambda: server.started, "the node started", TIMEOUT, 0.01)
        # The in-memory engine knows its position once it has published (a fresh stream needs
        # it to go live at once).
        await gateway.engine.publish(make_message("warm-up", "x"))
        yield gateway, server, listener.getsockname()[1]
    finally:
        server.should_exit = True
        await asyncio.wait_for(running, TIMEOUT * 3)
        listener.close()


class Client:
    """A raw HTTP/1.1 connection that reads a chunked event stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.head = b""
        self.body = b""
        self.raw = b""
        self.chunks = ChunkedDecoder()

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def send(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.writer.write(piece)
            await self.writer.drain()

    async def read_until(self, wanted: bytes) -> None:
        """Read until the body holds ``wanted`` (the head is split off first)."""
        async with asyncio.timeout(TIMEOUT):
            while wanted not in self.body:
                data = await self.reader.read(65536)
                assert data, f"closed before {wanted!r}: {self.head!r} {self.body!r}"
                self.raw += data
                if not self.head:
                    if b"\r\n\r\n" not in self.raw:
                        continue
                    self.head, _, data = self.raw.partition(b"\r\n\r\n")
                self.body += self.chunks.feed(data)

    async def read_response_end(self) -> None:
        """Read the stream to its terminating chunk."""
        async with asyncio.timeout(TIMEOUT):
            while not self.chunks.done:
                data = await self.reader.read(65536)
                assert data, f"closed before the last chunk: {self.body!r}"
                self.body += self.chunks.feed(data)

    def next_response(self) -> None:
        """Forget the last response: the connection's next one is read from its head."""
        self.head = self.body = self.raw = b""
        self.chunks = ChunkedDecoder()

    async def read_raw_until(self, wanted: bytes) -> None:
        async with asyncio.timeout(TIMEOUT):
            while wanted not in self.raw:
                data = await self.reader.read(65536)
                assert data, f"closed before {wanted!r}: {self.raw!r}"
                self.raw += data

    async def read_to_end(self) -> bytes:
        async with asyncio.timeout(TIMEOUT):
            rest = await self.reader.read()
        return rest

    def close(self) -> None:
        self.writer.close()


def events_request(topic: str, *headers: bytes) -> bytes:
    lines = [f"GET /events?topic={topic} HTTP/1.1".encode(), b"Host: 127.0.0.1", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def served_directly(server: uvicorn.Server) -> int:
    return sum(
        1 for c in server.server_state.connections if isinstance(c, StreamFront) and c.serving
    )


def without_date(head: bytes) -> list[bytes]:
    return [line for line in head.split(b"\r\n") if not line.lower().startswith(b"date:")]


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def test_a_fresh_stream_on_a_followed_topic_is_served_below_the_request_cycle() -> None:
    """The first stream on a topic subscribes it (through uvicorn, which awaits); the next is
    answered by the listener's protocol itself, with the same head and preamble, and both get
    every event."""

    async def scenario() -> None:
        async with node() as (gateway, server, port):
            first = await Client.connect(port)
            await first.send(events_request("news"))
            await first.read_until(b": ok\n\n")
            assert served_directly(server) == 0
            second = await Client.connect(port)
            await second.send(events_request("news"))
            await second.read_until(b": ok\n\n")
            assert served_directly(server) == 1
            assert without_date(second.head) == without_date(first.head)
            assert second.body == first.body
            published = await gateway.engine.publish(make_message("news", {"n": 1}))
            for client in (first, second):
                await client.read_until(f"id: {published}".encode())
                assert client.body.count(b"data:") == 1
            second.close()
            await wait_until_async(
                lambda: len(gateway.hub.subscribers) == 1, "the direct stream left", TIMEOUT
            )
            assert gateway.stream.admission.open == 1
            first.close()

    run(scenario)


def test_other_requests_and_split_heads_are_served_by_uvicorn_from_the_bytes_read() -> None:
    async def scenario() -> None:
        async with node() as (_gateway, server, port):
            holder = await Client.connect(port)
            await holder.send(events_request("t"))
            await holder.read_until(b": ok\n\n")
            # a request line that arrives a few bytes at a time is still a direct stream
            split = await Client.connect(port)
            request = events_request("t")
            await split.send(request[:2], request[2:9], request[9:30], request[30:])
            await split.read_until(b": ok\n\n")
            assert served_directly(server) == 1
            # a route that is not /events, a position, HEAD and HTTP/1.0 go to uvicorn
            for raw, expect in [
                (b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b" 200 "),
                (
                    b"GET /eventsx?topic=t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    b" 404 ",
                ),
                (
                    b"HEAD /events?topic=t HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    b" 200 ",
                ),
                (b"GET /events?topic=t&since=1 HTTP/1.0\r\nHost: x\r\n\r\n", b" 200 "),
                (b"GET /events HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", b" 400 "),
            ]:
                other = await Client.connect(port)
                await other.send(raw)
                async with asyncio.timeout(TIMEOUT):
                    line = await other.reader.readline()
                assert expect in line, (raw, line)
                other.close()
            assert served_directly(server) == 1
            for client in (holder, split):
                client.close()

    run(scenario)


def test_a_kept_alive_connection_serves_its_next_request_once_the_stream_ends() -> None:
    """A stream ended by the node (here its maximum lifetime) ends its chunked response; the
    connection then serves the next request, or closes when the client asked for that."""

    async def scenario() -> None:
        async with node(max_lifetime=0.3) as (_gateway, server, port):
            holder = await Client.connect(port)
            await holder.send(events_request("t"))
            await holder.read_until(b": ok\n\n")
            kept = await Client.connect(port)
            await kept.send(events_request("t"))
            await kept.read_until(b": ok\n\n")
            assert served_directly(server) == 1
            await kept.read_response_end()
            assert kept.body.endswith(b"\n\n")
            assert b"retry:" in kept.body.split(b": ok\n\n", 1)[1]
            await kept.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await kept.read_to_end()
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
            closing = await Client.connect(port)
            await closing.send(events_request("t", b"Connection: close"))
            await closing.read_until(b": ok\n\n")
            assert b"connection: close" in closing.head.lower()
            rest = await closing.read_to_end()  # the node closes it after the stream
            assert rest.endswith(b"0\r\n\r\n")
            for client in (holder, kept, closing):
                client.close()

    run(scenario)


def test_the_next_request_on_a_kept_alive_connection_is_read_afresh() -> None:
    """After a direct stream ends, the connection's next ``GET /events`` is direct again, and
    bytes a client sent behind an open stream (70 KB: past the bound, reading pauses) wait
    for it to end and are then answered as uvicorn answers them."""

    async def scenario() -> None:
        async with node(max_lifetime=0.5) as (gateway, server, port):
            holder = await Client.connect(port)
            await holder.send(events_request("t"))
            await holder.read_until(b": ok\n\n")
            again = await Client.connect(port)
            for _ in range(2):
                again.next_response()
                await again.send(events_request("t"))
                await again.read_until(b": ok\n\n")
                assert served_directly(server) == 1
                await again.read_response_end()
            behind = await Client.connect(port)
            await behind.send(events_request("t"))
            await behind.read_until(b": ok\n\n")
            padding = b"X-Pad: " + b"x" * 70_000 + b"\r\n"
            await behind.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + padding + b"\r\n")
            published = await gateway.engine.publish(make_message("t", "still streaming"))
            await behind.read_until(f"id: {published}".encode())
            await behind.read_response_end()
            answer = await behind.read_to_end()
            assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
            for client in (holder, again, behind):
                client.close()

    run(scenario)


def test_a_trusted_proxy_forwards_the_address_that_the_limits_count() -> None:
    """uvicorn's proxy-headers rule applies to direct streams too: behind a trusted proxy, the
    per-address limits count the forwarded address."""

    async def scenario() -> None:
        async with node(max_connections_per_address=1) as (gateway, server, port):
            holder = await Client.connect(port)
            await holder.send(events_request("t"))
            await holder.read_until(b": ok\n\n")
            forwarded = b"X-Forwarded-For: 203.0.113.9"
            first = await Client.connect(port)
            await first.send(events_request("t", forwarded))
            await first.read_until(b": ok\n\n")
            assert served_directly(server) == 1
            assert gateway.stream.admission.by_address_open.get("203.0.113.9") == 1
            refused = await Client.connect(port)
            await refused.send(events_request("t", forwarded, b"Accept: text/event-stream"))
            await refused.read_raw_until(b"too_many_address_connections")
            assert served_directly(server) == 1
            for client in (holder, first, refused):
                client.close()

    run(scenario)


async def exchange(port: int, request: bytes, opened: list[asyncio.StreamWriter]) -> bytes:
    """Send one request on a fresh connection (kept in ``opened``); read its answer: a stream
    up to ``: ok``, a refusal whole. The date line and the jittered retry delays are blanked."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    opened.append(writer)
    raw = b""
    writer.write(request)
    async with asyncio.timeout(TIMEOUT):
        while True:
            head, found, body = raw.partition(b"\r\n\r\n")
            if found:
                length = re.search(rb"(?im)^content-length: *(\d+)", head)
                if length is not None and len(body) >= int(length.group(1)):
                    break
                if b": ok\n\n" in body:
                    break
            data = await reader.read(65536)
            if not data:
                break
            raw += data
    raw = re.sub(rb"(?im)^date: [^\r]*\r\n", b"", raw)
    raw = re.sub(rb"retry: \d+|\"retry_ms\":\d+|retry-after: \d+", b"<retry>", raw)
    return re.sub(rb"(?m)^[0-9a-f]+\r$", b"<size>\r", raw)


def requests_for(tokens: dict[str, str]) -> list[bytes]:
    """Requests on the followed topic ``t`` (and a few on others), good and bad."""
    origin = b"Origin: https://app.example"
    plain = [
        events_request("t"),
        events_request("t", origin),
        events_request("t", b"Origin: https://evil.example"),
        events_request("t&types=a,b"),
        events_request("t&types=,,"),
        events_request("t", b"Connection: close"),
        events_request("t", b"Accept: text/event-stream"),
        events_request("t&topic=other"),
        events_request("bad%20topic"),
        events_request("t&lastEventId=garbage"),
        events_request("t", b"Last-Event-ID: 0-0"),
        events_request("t&since=99999999999999999999"),
        events_request("t&" + "x" * 20_000),
        events_request("t", b"Host: evil.example"),
        events_request("t&cache=1", b"X-Forwarded-For: 198.51.100.7"),
    ]
    with_tokens = [
        events_request(f"t&token={token}") for token in tokens.values()
    ] + [
        events_request("t", f"Authorization: Bearer {token}".encode()) for token in tokens.values()
    ] + [
        events_request("t", f"Cookie: sse_token={token}".encode()) for token in tokens.values()
    ]  # fmt: skip
    return plain + with_tokens


def answers(options: dict[str, Any], tokens: dict[str, str]) -> list[list[bytes]]:
    async def scenario(front: bool) -> list[bytes]:
        async with node(front=front, **options) as (_gateway, server, port):
            holder = await Client.connect(port)
            await holder.send(events_request(f"t&token={tokens['good']}"))
            await holder.read_until(b": ok\n\n")
            opened: list[asyncio.StreamWriter] = []
            result = [await exchange(port, r, opened) for r in requests_for(tokens)]
            direct = served_directly(server)
            holder.close()
            for writer in opened:
                writer.close()
            result.append(b"direct=%d" % direct)
            return result

    return [asyncio.run(scenario(front)) for front in (True, False)]


def test_every_answer_below_the_request_cycle_is_the_answer_uvicorn_gives() -> None:
    """The same requests, good and bad, to a node with the listener's protocol and to one
    with uvicorn's alone: byte for byte the same answers (bar the date and jittered delays)."""
    secret = "a-test-secret-of-enough-length-0123456789abcdef"
    now = int(time.time())

    def token(**claims: Any) -> str:
        body = {"sub": "alice", "sse": {"subscribe": ["t", "other"]}, "exp": now + 3600}
        return jwt.encode({**body, **claims}, secret, algorithm="HS256")

    tokens = {
        "good": token(),
        "not granted": token(sse={"subscribe": ["elsewhere"]}),
        "expired": token(exp=now - 3600),
        "forged": jwt.encode({"sub": "alice"}, "another-secret-of-enough-length-0123456789ab"),
        "garbage": "not-a-jwt",
    }
    # Served below the request cycle: anonymous, every plain stream with no position on ``t``
    # alone (9, and the 15 whose tokens an anonymous node ignores); with a key, the good token
    # sent in each of the 3 ways.
    for options, direct in (
        ({"cors_origin": ("https://app.example",)}, b"direct=24"),
        ({"jwt_secret": (secret,), "allow_anonymous": False, "public_topics": ()}, b"direct=3"),
    ):
        with_front, without = answers(options, tokens)
        assert with_front[:-1] == without[:-1], options
        assert (with_front[-1], without[-1]) == (direct, b"direct=0"), options


def test_a_failure_while_opening_drops_that_connection_and_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception in a direct opening never escapes into the protocol's callback: the
    connection is dropped, and the hub, the admission counts and the gauge are as before."""

    def broken(*args: Any) -> None:
        raise RuntimeError("broken transport")

    async def scenario() -> None:
        async with node() as (gateway, _server, port):
            holder = await Client.connect(port)
            await holder.send(events_request("t"))
            await holder.read_until(b": ok\n\n")
            monkeypatch.setattr(StreamFront, "start_response", broken)
            doomed = await Client.connect(port)
            await doomed.send(events_request("t"))
            assert await doomed.read_to_end() == b""
            await wait_until_async(
                lambda: len(gateway.hub.subscribers) == 1, "the failed stream left", TIMEOUT
            )
            assert gateway.stream.admission.open == 1
            assert gateway.metrics.registry.get_sample_value("sse_connections") == 1
            holder.close()
            doomed.close()

    run(scenario)
    assert "broken transport" in caplog.text


def test_a_token_checked_against_cached_jwks_keys_opens_below_the_request_cycle() -> None:
    """A key the node holds fresh from its JWKS verifies without a wait; a ``kid`` it does not
    hold sends the request through uvicorn, which decides as before."""
    key, rotated = rsa_key(), rsa_key()
    served = [rsa_jwk(key, "k1")]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"keys": served}).encode()
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    jwks = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=jwks.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{jwks.server_address[1]}/jwks.json"

    def token(signer: Any, kid: str) -> str:
        return sign(claims(subscribe=["t"]), signer, "RS256", headers={"kid": kid})

    async def scenario() -> None:
        async with node(jwks_url=url, allow_anonymous=False) as (_gateway, server, port):
            holder = await Client.connect(port)
            await holder.send(events_request(f"t&token={token(key, 'k1')}"))
            await holder.read_until(b": ok\n\n")  # through uvicorn: the first on ``t``
            cached = await Client.connect(port)
            await cached.send(events_request(f"t&token={token(key, 'k1')}"))
            await cached.read_until(b": ok\n\n")
            assert served_directly(server) == 1
            # a kid the node does not hold: through uvicorn, which may fetch the set again
            # (at a bounded rate: here too soon after the first fetch, so a 401)
            unknown = await Client.connect(port)
            await unknown.send(events_request(f"t&token={token(rotated, 'k2')}"))
            await unknown.read_raw_until(b"invalid_token")
            assert unknown.raw.startswith(b"HTTP/1.1 401 ")
            assert served_directly(server) == 1
            for client in (holder, cached, unknown):
                client.close()

    try:
        run(scenario)
    finally:
        jwks.shutdown()
        jwks.server_close()
        thread.join(5)


def test_the_quick_query_parse_is_parse_qsl() -> None:
    """``query_fields`` skips ``parse_qsl``'s decoding only when there is nothing to decode;
    its answers (and its refusal of too many fields) are ``parse_qsl``'s."""
    queries = [
        "", "a", "a=", "=b", "a=b", "a=b=c", "&&", "a&b", "a=1&&b=2&", "topic=x&topic=y",
        "é=ü", "a;b=c", "a=b;c", "t=%41&x=+", "a+b=c%20d", "&" * 254, "&" * 255, "&" * 256,
        "x=" + "&y=" * 255, "x=" + "&y=" * 256, "topic=news&since=1&types=a,b&token=e.y.z",
    ]  # fmt: skip

    def parsed(parse: Callable[[str], list[tuple[str, str]]], query: str) -> object:
        try:
            return parse(query)
        except ValueError:
            return "refused"

    def reference(query: str) -> list[tuple[str, str]]:
        return parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)

    for query in queries:
        assert parsed(query_fields, query) == parsed(reference, query), query[:40]
