"""A TCP proxy in front of a gateway that cuts connections in the middle of a frame.

Each connection forwards the gateway's bytes until they contain the next of ``cuts`` (a byte
string); it forwards up to the end of that marker, then closes both sides. The bytes that
reached the client thus end inside a frame. Later connections pass everything through.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Sequence
from concurrent.futures import Future

from tests.support.ports import free_port


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
