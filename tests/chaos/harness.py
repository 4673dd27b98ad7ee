"""Parts for fault-injection scenarios, all real: redis-server processes (plain, and a Sentinel
setup), gateway nodes as processes, a loopback load balancer, browser-like SSE clients that
reconnect with ``Last-Event-ID``, publishers at a steady rate, and the delivery invariant that
every scenario ends with.

Each part has a ``close`` that the ``chaos`` fixture (tests/chaos/conftest.py) calls whatever
the outcome, so no process, port, file or thread outlives its test.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import inspect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import redis

from gateway.client import EventParser, ServerEvent
from gateway.config import Settings
from publisher import Publisher, Retention
from publisher.protocol import id_key, key_to_id
from tests.support.gateway import GatewayProcess
from tests.support.ports import free_port
from tests.support.redis_server import server_binary
from tests.support.waiting import wait_until

T = TypeVar("T")

NODE_ARGS = ("--connect-rate", "0", "--max-connections-per-subject", "0", "--heartbeat", "2")
"""Every chaos node: no admission limits (all clients come from 127.0.0.1) and a short
heartbeat, so a silently dead stream is noticed by the clients' idle timeout."""

SERVICE = "mymaster"
_AFTER_ALL = 1 << 130


def redis_binary() -> str:
    """Found on PATH or installed: the chaos suite never skips for a missing redis-server."""
    return server_binary()


def backfill_available() -> bool:
    """Whether the node keeps streams open through a pub/sub outage (spec 4): it has the
    self-probe setting that comes with it."""
    return "probe_interval" in {f.name for f in dataclasses.fields(Settings)}


def publisher_retries() -> bool:
    return "retry_for" in inspect.signature(Publisher.from_url).parameters


# -- Redis ------------------------------------------------------------------------------------


class RedisNode:
    """One redis-server with AOF on. ``kill`` is a SIGKILL; ``start`` again keeps the port and
    the data directory, so the AOF is replayed."""

    def __init__(self, binary: str, *extra: str) -> None:
        self.binary = binary
        self.extra = extra
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="sse-chaos-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def args(self) -> list[str]:
        return [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec", "--dir", self.dir,
            "--daemonize", "no", "--logfile", os.path.join(self.dir, "redis.log"), *self.extra,
        ]  # fmt: skip

    def client(self, **options: Any) -> redis.Redis:
        settings: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 1, **options}
        return redis.Redis(host="127.0.0.1", port=self.port, **settings)

    def start(self, timeout: float = 20.0) -> RedisNode:
        self.process = subprocess.Popen(
            self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        with contextlib.closing(self.client(socket_connect_timeout=0.2)) as client:
            while True:
                try:
                    client.ping()  # LOADING is a ConnectionError: wait it out too
                    return self
                except redis.ConnectionError:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server did not start (exit {self.process.poll()}):\n"
                            + self.log_tail()
                        ) from None
                    time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last AOF rewrite, connections cut by the kernel."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log_tail(self, size: int = 3000) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log"), "rb") as f:
                return f.read().decode("utf-8", "replace")[-size:]
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _info(client: redis.Redis, section: str) -> dict[str, Any]:
    info: dict[str, Any] = client.info(section)
    return info


class SentinelSetup:
    """A primary, one replica (``--replicaof``) and three sentinels watching ``mymaster``.

    Both servers run with ``min-replicas-to-write 1``, as the README asks of a Sentinel
    deployment: a primary that has lost its replica (because it was just promoted) refuses
    writes instead of acknowledging publishes that the new primary will never have."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        fenced = ("--min-replicas-to-write", "1", "--min-replicas-max-lag", "10")
        self.primary = RedisNode(binary, *fenced)
        self.replica = RedisNode(
            binary, *fenced, "--replicaof", "127.0.0.1", str(self.primary.port)
        )
        self.nodes = {self.primary.port: self.primary, self.replica.port: self.replica}
        self.dir = tempfile.mkdtemp(prefix="sse-chaos-sentinel-")
        self.ports = [free_port() for _ in range(3)]
        self.processes: list[subprocess.Popen[bytes]] = []
        self._state = ""

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(
            port=self.ports[index],
            socket_timeout=5,
            socket_connect_timeout=1,
            decode_responses=True,
        )

    def start(self, timeout: float = 40.0) -> SentinelSetup:
        self.primary.start()
        self.replica.start()
        with contextlib.closing(self.replica.client()) as replica:
            wait_until(
                lambda: _info(replica, "replication").get("master_link_status") == "up",
                "the replica to sync",
                timeout,
            )
        for index, port in enumerate(self.ports):
            conf = os.path.join(self.dir, f"sentinel-{index}.conf")
            with open(conf, "w") as f:
                f.write(
                    f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {self.dir}\n"
                    f"logfile {self.dir}/sentinel-{index}.log\n"
                    f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                    f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                    f"sentinel failover-timeout {SERVICE} 5000\n"
                )
            self.processes.append(
                subprocess.Popen(
                    [self.binary, conf, "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        try:
            wait_until(self._settled, "the sentinels to see the replica and each other", timeout)
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}: {self._state}") from None
        return self

    def _settled(self) -> bool:
        for index in range(len(self.ports)):
            try:
                with contextlib.closing(self.sentinel(index)) as client:
                    replicas = client.execute_command(  # type: ignore[no-untyped-call]
                        "SENTINEL", "REPLICAS", SERVICE
                    )
                    others = client.execute_command(  # type: ignore[no-untyped-call]
                        "SENTINEL", "SENTINELS", SERVICE
                    )
            except redis.RedisError as exc:
                self._state = f"sentinel {index}: {exc}"
                return False
            fields = [_pairs(replica) for replica in replicas]
            self._state = f"sentinel {index}: {len(others)} other sentinels, replicas {fields}"
            if len(others) != len(self.ports) - 1 or len(replicas) != 1:
                return False
            if fields[0].get("flags") != "slave" or fields[0].get("master-link-status") != "ok":
                return False
        return True

    def master_port(self, index: int = 0) -> int:
        with contextlib.closing(self.sentinel(index)) as client:
            _, port = client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
            )
        return int(port)

    def failover(self, timeout: float = 30.0) -> tuple[int, int]:
        """``SENTINEL FAILOVER``; return (old, new) primary ports once every sentinel names the
        new primary, it is a primary, and the old one has been turned into its replica (which
        Sentinel does at its next look at the old primary, up to ~10 s after the promotion:
        until then the old primary still accepts writes)."""
        old = self.master_port()
        with contextlib.closing(self.sentinel()) as client:
            client.execute_command("SENTINEL", "FAILOVER", SERVICE)  # type: ignore[no-untyped-call]
        new = next(port for port in self.nodes if port != old)

        def done() -> bool:
            try:
                if any(self.master_port(i) != new for i in range(len(self.ports))):
                    return False
                with (
                    contextlib.closing(self.nodes[new].client()) as primary,
                    contextlib.closing(self.nodes[old].client()) as demoted,
                ):
                    if _info(primary, "replication").get("role") != "master":
                        return False
                    state = _info(demoted, "replication")
                    return bool(state.get("role") == "slave" and state.get("master_port") == new)
            except redis.RedisError:
                return False

        wait_until(done, "the failover to complete", timeout, 0.2)
        return old, new

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for node in self.nodes.values():
            node.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _pairs(flat: Any) -> dict[str, str]:
    if isinstance(flat, dict):
        return {str(k): str(v) for k, v in flat.items()}
    items = list(flat)
    return {str(items[i]): str(items[i + 1]) for i in range(0, len(items) - 1, 2)}


# -- event loops in threads -----------------------------------------------------------------


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


async def _cancel_all() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class LoopThread:
    """An event loop of its own, run by a daemon thread; ``close`` cancels every task on it."""

    def __init__(self, name: str) -> None:
        self.loop = _new_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_closed():
            return
        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                self.run(_cancel_all(), 20)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(20)
        if not self._thread.is_alive():
            self.loop.close()


# -- load balancer ------------------------------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (OSError, RuntimeError):
        pass


class LoadBalancer:
    """A round-robin TCP proxy on a free loopback port. Like an L4 load balancer, it tries the
    next backend when one refuses the connection; ``remove``/``add`` change the pool."""

    def __init__(self, backends: Iterable[int], connect_timeout: float = 2.0) -> None:
        self.backends = list(backends)
        self.connect_timeout = connect_timeout
        self.port = 0
        self.accepted = 0
        self.failed_connects = 0
        self.unrouted = 0
        self._turn = 0
        self._links: dict[asyncio.StreamWriter, tuple[int, asyncio.StreamWriter]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._thread = LoopThread("chaos-load-balancer")
        self._thread.run(self._listen())

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, backlog=2048)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def add(self, port: int) -> None:
        async def add() -> None:
            if port not in self.backends:
                self.backends.append(port)

        self._thread.run(add())

    def remove(self, port: int, close_open: bool = False) -> None:
        async def remove() -> None:
            if port in self.backends:
                self.backends.remove(port)
            if close_open:
                for client, (backend, upstream) in list(self._links.items()):
                    if backend == port:
                        client.transport.abort()
                        upstream.transport.abort()

        self._thread.run(remove())

    def open_to(self, port: int) -> int:
        """How many client connections are currently linked to backend ``port``."""

        async def count() -> int:
            return sum(1 for backend, _ in self._links.values() if backend == port)

        return self._thread.run(count())

    async def _connect(self) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in range(len(self.backends)):
            if not self.backends:
                break
            port = self.backends[self._turn % len(self.backends)]
            self._turn += 1
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), self.connect_timeout
                )
            except (OSError, TimeoutError):
                self.failed_connects += 1
                continue
            return port, reader, writer
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        backend = await self._connect()
        if backend is None:
            self.unrouted += 1
            writer.transport.abort()
            return
        port, upstream_reader, upstream = backend
        self._links[writer] = (port, upstream)
        up = asyncio.ensure_future(_pipe(reader, upstream))
        down = asyncio.ensure_future(_pipe(upstream_reader, writer))
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self._links.pop(writer, None)
            for side in (writer, upstream):
                side.close()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for client, (_, upstream) in list(self._links.items()):
            client.transport.abort()
            upstream.transport.abort()
        await _cancel_all()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._thread.run(self._stop(), 20)
        self._thread.close()


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


# -- publishers -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Published:
    tag: str
    id: str
    key: int
    topics: tuple[str, ...]
    at: float = 0.0
    """``time.monotonic()`` when the publish returned."""


def topic_plan(topics: Sequence[str], pair_every: int = 4) -> Callable[[int], tuple[str, ...]]:
    """Event ``seq`` goes to one topic, and every ``pair_every``th to two at once."""

    def plan(seq: int) -> tuple[str, ...]:
        first = topics[seq % len(topics)]
        if pair_every and seq % pair_every == 0 and len(topics) > 1:
            return first, topics[(seq + 1) % len(topics)]
        return (first,)

    return plan


class PublisherThread:
    """Publishes numbered events (``{"tag": ..., "pad": ...}``) at a steady rate (``batch`` at
    a time with ``publish_many``), directly to Redis; ``acked`` records every publish that
    returned an id, ``failed`` every one that raised (it may or may not have been stored)."""

    def __init__(
        self,
        url: str,
        prefix: str,
        topics: Sequence[str],
        rate: float,
        *,
        name: str = "p",
        retry_for: float | None = None,
        retention: Retention | None = None,
        payload_bytes: int = 0,
        pair_every: int = 4,
        batch: int = 1,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.plan = topic_plan(topics, pair_every)
        self.topics = tuple(topics)
        self.rate = rate
        self.name = name
        self.retry_for = retry_for
        self.retention = retention
        self.pad = "x" * payload_bytes
        self.batch = batch
        self.options = dict(options or {})
        self.acked: list[Published] = []
        self.failed: list[tuple[str, tuple[str, ...], str]] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"chaos-publisher-{name}")

    def open(self) -> Publisher:
        options = dict(self.options)
        if self.retry_for is not None:
            options["retry_for"] = self.retry_for
        return Publisher.from_url(self.url, prefix=self.prefix, retention=self.retention, **options)

    def start(self) -> PublisherThread:
        self._thread.start()
        self._opened.wait(30)
        if self._error is not None:
            self._thread.join(5)
            raise RuntimeError(f"publisher {self.name} did not start") from self._error
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"publisher {self.name} is stuck in a publish")

    def _main(self) -> None:
        try:
            pub = self.open()
        except BaseException as exc:
            self._error = exc
            self._opened.set()
            return
        self._opened.set()
        interval = self.batch / self.rate
        next_at = time.monotonic()
        seq = 0
        try:
            while not self._stop.is_set():
                batch = []
                for _ in range(self.batch):
                    seq += 1
                    tag = f"{self.name}-{seq}"
                    batch.append((tag, self.plan(seq)))
                began = time.monotonic()
                try:
                    if self.batch == 1:
                        tag, topics = batch[0]
                        ids = [pub.publish(list(topics), {"tag": tag, "pad": self.pad})]
                    else:
                        ids = pub.publish_many(
                            [(list(topics), {"tag": tag, "pad": self.pad}) for tag, topics in batch]
                        )
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    self.failed.extend((tag, topics, error) for tag, topics in batch)
                else:
                    at = time.monotonic()
                    for (tag, topics), event_id in zip(batch, ids, strict=True):
                        self.acked.append(Published(tag, event_id, id_key(event_id), topics, at))
                self.slowest = max(self.slowest, time.monotonic() - began)
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                elif delay < -1.0:
                    next_at = time.monotonic()  # after a stall, go on at the rate, no burst
        finally:
            pub.close()


@dataclasses.dataclass
class Publishes:
    """Publishes made by hand, for a :class:`Ledger` next to the publisher threads'."""

    acked: list[Published] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, tuple[str, ...], str]] = dataclasses.field(default_factory=list)


# -- the invariant ----------------------------------------------------------------------------


class Ledger:
    """What the publishers know: every acknowledged publish by tag, by id and per topic.

    ``maybe`` names publishes whose delivery is allowed but not required: those that raised
    (they may have been stored), and any the scenario knows Redis itself lost."""

    def __init__(
        self, publishers: Iterable[PublisherThread | Publishes], exclude: Iterable[str] = ()
    ) -> None:
        excluded = set(exclude)
        sources = list(publishers)
        self.by_tag: dict[str, Published] = {}
        self.maybe: set[str] = set(excluded)
        topic_keys: dict[str, list[int]] = collections.defaultdict(list)
        for publisher in sources:
            self.maybe.update(tag for tag, _, _ in publisher.failed)
            for p in publisher.acked:
                if p.tag in excluded:
                    continue
                self.by_tag[p.tag] = p
                for topic in p.topics:
                    topic_keys[topic].append(p.key)
        self.by_key = {p.key: p for p in self.by_tag.values()}
        self.topic_keys = {t: sorted(keys) for t, keys in topic_keys.items()}
        self.failed = sum(len(p.failed) for p in sources)

    def newest(self, topics: Iterable[str]) -> int:
        return max((self.topic_keys[t][-1] for t in topics if self.topic_keys.get(t)), default=0)


def wait_caught_up(clients: Sequence[SSEClient], ledger: Ledger, timeout: float = 45.0) -> float:
    """Wait until every client has received the newest acknowledged event of its topics (or
    the timeout: the invariant then says what is missing). Returns the seconds waited."""
    began = time.monotonic()
    targets = [(client, ledger.newest(client.topics)) for client in clients]
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: all(c.last_key >= t for c, t in targets), "catch-up", timeout, 0.2)
    return time.monotonic() - began


def _tag(data: str) -> str | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value.get("tag") if isinstance(value, dict) else None


def _reset_topics(reset: Received) -> set[str] | None:
    try:
        return set(json.loads(reset.data)["topics"])
    except (ValueError, KeyError, TypeError):
        return None


def check_client(client: SSEClient, ledger: Ledger, reset_allowed: bool = False) -> list[str]:
    """What is wrong with what ``client`` received (empty when nothing is).

    From its first received event on, each of its topics must have delivered exactly the
    acknowledged publishes of that topic, in id order, none twice, nothing else; a gap is
    allowed only where a ``reset`` naming the topic came in between (and only when resets
    are allowed at all)."""
    label = f"client {client.name} {list(client.topics)}"
    sequence = list(client.received)
    resets = [(i, r) for i, r in enumerate(sequence) if r.event == "reset"]
    events = [(i, r) for i, r in enumerate(sequence) if r.event != "reset"]
    problems: list[str] = []
    if resets and not reset_allowed:
        problems.append(f"{label}: unexpected reset: {[r.data for _, r in resets][:3]}")
    if not events:
        return [*problems, f"{label}: received no events ({client.describe()})"]

    previous: Received | None = None
    for index, r in events:
        if previous is not None and r.key <= previous.key:
            what = "duplicate" if r.key == previous.key else "out-of-order"
            problems.append(f"{label}: {what} id {r.id} after {previous.id} (#{index})")
        previous = r

    mine: dict[str, list[tuple[int, int]]] = {t: [] for t in client.topics}
    for index, r in events:
        tag = _tag(r.data)
        published = ledger.by_tag.get(tag) if tag else None
        if published is None:
            if tag not in ledger.maybe:
                problems.append(f"{label}: extra event {r.id} {r.data[:60]!r}: never acknowledged")
            continue
        if published.key != r.key:
            problems.append(f"{label}: {tag} arrived as id {r.id}, acknowledged as {published.id}")
        topics = [t for t in published.topics if t in mine]
        if not topics:
            problems.append(f"{label}: extra event {r.id}: published to {list(published.topics)}")
        for topic in topics:
            mine[topic].append((index, published.key))

    first_index, first = events[0]
    for topic in client.topics:
        keys = ledger.topic_keys.get(topic, [])
        last_index, last_key = first_index, first.key - 1
        for index, key in [*mine[topic], (len(sequence), _AFTER_ALL)]:
            lo, hi = bisect.bisect_right(keys, last_key), bisect.bisect_left(keys, key)
            if hi > lo:
                covered = reset_allowed and any(
                    last_index < at < index and topic in (_reset_topics(r) or {topic})
                    for at, r in resets
                )
                if not covered:
                    missing = [ledger.by_key[k].id for k in keys[lo : min(hi, lo + 3)]]
                    where = (
                        "at the end" if key == _AFTER_ALL else f"before {key_to_id(key)}"
                    ) + f" (after {key_to_id(last_key) if index != first_index else 'start'})"
                    problems.append(
                        f"{label}: topic {topic}: {hi - lo} acknowledged events missing {where}; "
                        f"first missing {missing}"
                    )
            last_index, last_key = index, key
    if problems:
        problems.append(f"{label}: state: {client.describe()}")
    return problems


def check_delivery(
    clients: Sequence[SSEClient],
    ledger: Ledger,
    reset_allowed: Callable[[SSEClient], bool] = lambda client: False,
) -> None:
    """Assert the invariant for every client, with a readable account of what went wrong."""
    problems: list[str] = []
    bad = 0
    for client in clients:
        found = check_client(client, ledger, reset_allowed(client))
        if found:
            bad += 1
            problems.extend(found)
    if problems:
        head = (
            f"{bad} of {len(clients)} clients broke the delivery invariant "
            f"({len(ledger.by_tag)} acknowledged publishes, {ledger.failed} failed, "
            f"{len(ledger.maybe)} allowed either way):"
        )
        shown = problems[:40]
        more = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise AssertionError(head + "\n" + "\n".join(shown) + more)


def summary(clients: Sequence[SSEClient], ledger: Ledger) -> str:
    """One line on what happened, printed by each scenario (shown with ``-s`` or on failure)."""
    counts = [sum(r.event != "reset" for r in c.received) for c in clients]
    return (
        f"{len(ledger.by_tag)} acked, {ledger.failed} failed publishes; {len(clients)} clients "
        f"received {sum(counts)} events (min {min(counts, default=0)}), "
        f"{sum(c.reconnects for c in clients)} reconnects, "
        f"{sum(len(c.resets) for c in clients)} resets, "
        f"statuses {dict(sum((c.statuses for c in clients), collections.Counter()))}, "
        f"errors {dict(collections.Counter(e[:40] for c in clients for e in c.errors))}"
    )


def stored_tags(client: redis.Redis, prefix: str, topics: Iterable[str]) -> dict[str, list[str]]:
    """Every tag stored in the topics' streams, with the stream ids it is stored under (one
    per topic it was published to)."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    for topic in topics:
        entries: Any = client.xrange(f"{prefix}:s:{topic}", "-", "+")
        for entry_id, fields in entries:
            body = fields[b"f"].decode("utf-8", "replace")
            data = "\n".join(
                line[5:].removeprefix(" ") for line in body.split("\n") if line.startswith("data:")
            )
            tag = _tag(data)
            if tag:
                found[tag].append(entry_id.decode())
    return found


def socket_peers(pid: int) -> collections.Counter[int]:
    """The TCP sockets a process holds, counted by remote port (0: listening)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    peers: collections.Counter[int] = collections.Counter()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[9] in inodes:
                    peers[int(fields[2].rsplit(":", 1)[1], 16)] += 1
    return peers


# -- a proxy that loses replies ----------------------------------------------------------------


def _commands(buffer: bytes) -> tuple[list[list[bytes]], bytes]:
    """Complete RESP commands (arrays of bulk strings) at the start of ``buffer``, and the rest."""
    commands = []
    pos = 0
    while True:
        end = buffer.find(b"\r\n", pos)
        if end < 0 or buffer[pos : pos + 1] != b"*":
            break
        count = int(buffer[pos + 1 : end])
        at = end + 2
        args: list[bytes] = []
        complete = True
        for _ in range(count):
            end = buffer.find(b"\r\n", at)
            if end < 0:
                complete = False
                break
            size = int(buffer[at + 1 : end])
            start = end + 2
            if len(buffer) < start + size + 2:
                complete = False
                break
            args.append(buffer[start : start + size])
            at = start + size + 2
        if not complete:
            break
        commands.append(args)
        pos = at
    return commands, buffer[pos:]


_TAG = re.compile(rb'"tag":"([^"]+)"')


class ReplyCutter:
    """A TCP proxy in front of Redis that loses replies: for the EVAL/EVALSHA commands numbered
    in ``cut_at`` (counted across connections, from 1) it forwards the command, and when
    Redis's reply comes back (so the script ran) it cuts both connections instead of
    forwarding it. ``cut`` lists the event tags whose reply was lost."""

    def __init__(self, redis_port: int, cut_at: Iterable[int]) -> None:
        self.redis_port = redis_port
        self.cut_at = set(cut_at)
        self.evals = 0
        self.cut: list[str] = []
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._thread = LoopThread("chaos-reply-cutter")
        self._thread.run(self._listen())

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.redis_port)
        except OSError:
            writer.transport.abort()
            return
        doomed: list[str] = []

        async def requests() -> None:
            buffer = b""
            while data := await reader.read(1 << 16):
                commands, buffer = _commands(buffer + data)
                for args in commands:
                    if args[0].upper() in (b"EVAL", b"EVALSHA"):
                        self.evals += 1
                        if self.evals in self.cut_at:
                            match = _TAG.search(b"".join(args[1:]))
                            doomed.append(match.group(1).decode() if match else "?")
                upstream.write(data)
                await upstream.drain()

        async def replies() -> None:
            while data := await upstream_reader.read(1 << 16):
                if doomed:
                    self.cut.extend(doomed)
                    return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(requests()), asyncio.ensure_future(replies())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.transport.abort()
            upstream.transport.abort()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await _cancel_all()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._thread.run(self._stop(), 20)
        self._thread.close()


class FreezingProxy:
    """A TCP proxy in front of Redis for gateway nodes. ``freeze_pubsub`` makes every pub/sub
    connection open now silently dead: bytes are swallowed both ways and nothing is closed,
    as when a NAT or firewall forgets a connection. New connections pass normally, unless
    ``black`` is set: then they are accepted and swallow every byte from the start."""

    def __init__(self, redis_port: int, name: str = "chaos-freezing-proxy") -> None:
        self.redis_port = redis_port
        self.port = 0
        self.black = False
        self.links: list[dict[str, bool]] = []
        self._server: asyncio.AbstractServer | None = None
        self._thread = LoopThread(name)
        self._thread.run(self._listen())

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def _freeze(self, pubsub_only: bool) -> int:
        """Freeze the open connections (only the pub/sub ones if asked); return how many."""

        async def freeze() -> int:
            doomed = [
                link
                for link in self.links
                if not link["closed"] and (link["pubsub"] or not pubsub_only)
            ]
            for link in doomed:
                link["frozen"] = True
            return len(doomed)

        return self._thread.run(freeze())

    def freeze_pubsub(self) -> int:
        """Freeze the pub/sub connections open now; return how many."""
        return self._freeze(pubsub_only=True)

    def pubsub_links(self) -> int:
        """Pub/sub connections open and not frozen."""

        async def count() -> int:
            return sum(
                1
                for link in self.links
                if link["pubsub"] and not (link["frozen"] or link["closed"])
            )

        return self._thread.run(count())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = {"pubsub": False, "frozen": self.black, "closed": False}
        self.links.append(link)
        upstream: asyncio.StreamWriter | None = None
        try:
            if link["frozen"]:
                while await reader.read(1 << 16):
                    pass
                return
            try:
                upstream_reader, upstream = await asyncio.open_connection(
                    "127.0.0.1", self.redis_port
                )
            except OSError:
                return

            async def requests() -> None:
                assert upstream is not None
                buffer = b""
                while data := await reader.read(1 << 16):
                    if not link["pubsub"]:
                        commands, buffer = _commands(buffer + data)
                        link["pubsub"] = any(
                            args[0].upper() in (b"SUBSCRIBE", b"PSUBSCRIBE") for args in commands
                        )
                    if not link["frozen"]:
                        upstream.write(data)
                        await upstream.drain()

            async def replies() -> None:
                while data := await upstream_reader.read(1 << 16):
                    if not link["frozen"]:
                        writer.write(data)
                        await writer.drain()

            tasks = [asyncio.ensure_future(requests()), asyncio.ensure_future(replies())]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        except (asyncio.CancelledError, OSError):
            pass
        finally:
            link["closed"] = True
            writer.transport.abort()
            if upstream is not None:
                upstream.transport.abort()

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await _cancel_all()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._thread.run(self._stop(), 20)
        self._thread.close()


# -- the fixture's object ---------------------------------------------------------------------


class Chaos:
    """Starts the parts of a scenario and closes each of them, newest first, at teardown."""

    def __init__(self) -> None:
        self.prefix = "chaos" + uuid.uuid4().hex[:8]
        self.nodes: list[GatewayProcess] = []
        self.redis_nodes: list[RedisNode] = []
        self.failed = False
        self._cleanups: list[Callable[[], None]] = []
        self._pool: ClientPool | None = None

    def defer(self, cleanup: Callable[[], None]) -> None:
        self._cleanups.append(cleanup)

    def binary(self) -> str:
        return redis_binary()

    def redis(self, *extra: str) -> RedisNode:
        node = RedisNode(self.binary(), *extra)
        self.defer(node.close)
        self.redis_nodes.append(node)
        return node.start()

    def sentinel(self) -> SentinelSetup:
        setup = SentinelSetup(self.binary())
        self.defer(setup.close)
        self.redis_nodes.extend(setup.nodes.values())
        return setup.start()

    def node(self, redis_url: str, *extra: str, port: int | None = None) -> GatewayProcess:
        node = GatewayProcess(*NODE_ARGS, "--prefix", self.prefix, *extra, redis_url=redis_url)
        return self._start(node, port)

    def restart(self, old: GatewayProcess, *extra: str) -> GatewayProcess:
        """A new process with the same arguments on the same port."""
        return self._start(GatewayProcess(*old.args, *extra), old.port)

    def _start(self, node: GatewayProcess, port: int | None) -> GatewayProcess:
        if port is not None:
            node.port = port
        self.nodes.append(node)

        def close() -> None:
            node.stop(timeout=10)
            node.close()

        self.defer(close)
        return node.start(timeout=30)

    def load_balancer(self, nodes: Iterable[GatewayProcess]) -> LoadBalancer:
        lb = LoadBalancer(node.port for node in nodes)
        self.defer(lb.close)
        return lb

    def clients(
        self, port: int, topic_sets: Sequence[Sequence[str]], name: str = "c", **options: Any
    ) -> list[SSEClient]:
        if self._pool is None:
            self._pool = ClientPool()
            self.defer(self._pool.close)
        return self._pool.spawn(port, topic_sets, name, **options)

    @property
    def pool(self) -> ClientPool:
        assert self._pool is not None
        return self._pool

    def publisher(
        self, url: str, topics: Sequence[str], rate: float, **options: Any
    ) -> PublisherThread:
        publisher = PublisherThread(url, self.prefix, topics, rate, **options)

        def stop() -> None:
            with contextlib.suppress(RuntimeError):
                publisher.stop(30)

        self.defer(stop)
        return publisher

    def reply_cutter(self, redis_port: int, cut_at: Iterable[int]) -> ReplyCutter:
        cutter = ReplyCutter(redis_port, cut_at)
        self.defer(cutter.close)
        return cutter

    def freezing_proxy(self, redis_port: int) -> FreezingProxy:
        proxy = FreezingProxy(redis_port)
        self.defer(proxy.close)
        return proxy

    def stalled(self) -> StalledClients:
        stalled = StalledClients()
        self.defer(stalled.close)
        return stalled

    def report(self) -> str:
        """The tail of every node's and Redis's log, for a failed scenario."""
        parts = []
        for node in self.nodes:
            with contextlib.suppress(OSError):
                parts.append(f"--- gateway :{node.port} ---\n{node.output()[-4000:]}")
        for redis_node in self.redis_nodes:
            parts.append(f"--- redis :{redis_node.port} ---\n{redis_node.log_tail(1500)}")
        return "\n".join(parts)

    def close(self) -> None:
        if self.failed:
            print(self.report())
        while self._cleanups:
            cleanup = self._cleanups.pop()
            try:
                cleanup()
            except Exception:
                traceback.print_exc()


# -- a proxy that blackholes -----------------------------------------------------------------


class BlackholeProxy(FreezingProxy):
    """A TCP proxy in front of Redis whose network can go black: between ``blackhole`` and
    ``restore`` every byte is dropped both ways and nothing is closed, on the connections open
    at the start and on every one accepted meanwhile (the connect itself succeeds, as the
    kernel completes it, so only the replies never come). After ``restore`` new connections
    pass normally; the ones that went black stay black, as when a NAT lost their state."""

    def __init__(self, redis_port: int) -> None:
        super().__init__(redis_port, "chaos-blackhole-proxy")

    def blackhole(self) -> int:
        """Drop every byte from now on; return how many connections were open."""
        self.black = True
        return self._freeze(pubsub_only=False)

    def restore(self) -> None:
        """Serve new connections normally again."""
        self.black = False

    def live_pubsub_links(self) -> int:
        """Pub/sub connections open and passing bytes."""
        return self.pubsub_links()
