"""TCP proxies for tests, all in one place, each on an event loop in a thread:

- ``LoadBalancer``: an L4 balancer over gateway nodes (round robin, retried on refusal).
- ``FreezingProxy`` / ``BlackholeProxy``: in front of Redis; connections can be frozen
  (the pub/sub ones, one by its local port, or all of them: the network goes black).
- ``ReplyCutter``: in front of Redis; loses the replies of chosen EVAL/EVALSHA commands.
- ``CuttingProxy``: in front of a gateway; cuts each response in the middle of a frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import Future

from tests.support.loop import LoopThread, cancel_all
from tests.support.ports import free_port

# -- cutting HTTP responses ----------------------------------------------------------------------


class CuttingProxy:
    def __init__(self, upstream_port: int, cuts: Sequence[bytes]) -> None:
        self.upstream_port = upstream_port
        self.cuts = list(cuts)
        self.port = free_port()
        self.requests: list[bytes] = []
        """The request head of each connection, in order."""
        self.cut_done = threading.Event()
        """Set once every cut has happened."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CuttingProxy:
        self._thread.start()
        future: Future[asyncio.Server] = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", self.port), self._loop
        )
        self._server = future.result(10)
        return self

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # Cancelled at close: end quietly (a cancelled connection task is logged as an error).
        with contextlib.suppress(asyncio.CancelledError, asyncio.IncompleteReadError):
            await self._connection(client_r, client_w)

    async def _connection(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        cut = self.cuts.pop(0) if self.cuts else None
        try:
            up_r, up_w = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream_port), 10
            )
        except OSError:
            client_w.close()
            return
        head = await asyncio.wait_for(client_r.readuntil(b"\r\n\r\n"), 10)
        self.requests.append(head)
        up_w.write(head)
        upstream = asyncio.create_task(self._pipe(client_r, up_w))
        try:
            await self._forward(up_r, client_w, cut)
        finally:
            upstream.cancel()
            for writer in (client_w, up_w):
                writer.close()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await writer.wait_closed()
            if cut is not None and not self.cuts:
                self.cut_done.set()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()

    @staticmethod
    async def _forward(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cut: bytes | None
    ) -> None:
        seen = b""
        with contextlib.suppress(OSError):
            while chunk := await reader.read(65536):
                if cut is None:
                    writer.write(chunk)
                    await writer.drain()
                    continue
                seen += chunk
                at = seen.find(cut)
                if at == -1:
                    writer.write(chunk)
                    await writer.drain()
                    continue
                end = at + len(cut)
                writer.write(chunk[: len(chunk) - (len(seen) - end)])
                await writer.drain()
                return


# -- load balancer ------------------------------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (OSError, RuntimeError):
        pass


class LoopServer:
    """A TCP server on a free loopback port, run by a loop thread of its own: the shape every
    proxy below shares. A subclass sets what ``_accept`` needs, then calls ``__init__``."""

    backlog = 100

    def __init__(self, name: str) -> None:
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._thread = LoopThread(name)
        self._thread.run(self._listen())

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", 0, backlog=self.backlog
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await cancel_all()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._thread.run(self._stop(), 20)
        self._thread.close()


class LoadBalancer(LoopServer):
    """A round-robin TCP proxy on a free loopback port. Like an L4 load balancer, it tries the
    next backend when one refuses the connection; ``remove``/``add`` change the pool."""

    backlog = 2048

    def __init__(self, backends: Iterable[int], connect_timeout: float = 2.0) -> None:
        self.backends = list(backends)
        self.connect_timeout = connect_timeout
        self.accepted = 0
        self.failed_connects = 0
        self.unrouted = 0
        self._turn = 0
        self._links: dict[asyncio.StreamWriter, tuple[int, asyncio.StreamWriter]] = {}
        super().__init__("chaos-load-balancer")

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
        for client, (_, upstream) in list(self._links.items()):
            client.transport.abort()
            upstream.transport.abort()
        await super()._stop()


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


class ReplyCutter(LoopServer):
    """A TCP proxy in front of Redis that loses replies: for the EVAL/EVALSHA commands numbered
    in ``cut_at`` (counted across connections, from 1) it forwards the command, and when
    Redis's reply comes back (so the script ran) it cuts both connections instead of
    forwarding it. ``cut`` lists the event tags whose reply was lost."""

    def __init__(self, redis_port: int, cut_at: Iterable[int]) -> None:
        self.redis_port = redis_port
        self.cut_at = set(cut_at)
        self.evals = 0
        self.cut: list[str] = []
        super().__init__("chaos-reply-cutter")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

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


class FreezingProxy(LoopServer):
    """A TCP proxy in front of Redis for gateway nodes. ``freeze_pubsub`` makes every pub/sub
    connection open now silently dead: bytes are swallowed both ways and nothing is closed,
    as when a NAT or firewall forgets a connection (``freeze`` does it to one connection, by
    the local port of its upstream side, as Redis's CLIENT LIST shows it). New connections
    pass normally, unless ``black`` is set: then they are accepted and swallow every byte from
    the start."""

    def __init__(self, redis_port: int, name: str = "chaos-freezing-proxy") -> None:
        self.redis_port = redis_port
        self.black = False
        self.links: list[dict[str, bool]] = []
        self.upstream_ports: list[int] = []
        """The local port of each connection to Redis, in the order they were opened."""
        self._by_port: dict[int, dict[str, bool]] = {}
        super().__init__(name)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

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

    def freeze(self, upstream_port: int) -> None:
        """Freeze the one connection whose upstream side has this local port."""

        async def freeze() -> None:
            self._by_port[upstream_port]["frozen"] = True

        self._thread.run(freeze())

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
            port = int(upstream.get_extra_info("sockname")[1])
            self._by_port[port] = link
            self.upstream_ports.append(port)

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
