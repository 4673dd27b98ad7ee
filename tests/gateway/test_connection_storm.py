"""A reconnect storm: hundreds of streams opened in the same instant, each resuming from an id,
all get their replay and then every live event; none is turned away because the node ran out
of Redis connections."""

from __future__ import annotations

import asyncio

from tests.conftest import NodeFactory

STREAMS = 400


async def _open(port: int, last_event_id: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /events?topic=storm HTTP/1.1\r\nHost: t\r\nLast-Event-ID: {last_event_id}\r\n\r\n"
        .encode()
    )  # fmt: skip
    await writer.drain()
    return reader, writer


async def _read_until(reader: asyncio.StreamReader, marker: bytes, timeout: float) -> bytes:
    data = b""
    async with asyncio.timeout(timeout):
        while marker not in data:
            chunk = await reader.read(65536)
            if not chunk:
                return data
            data += chunk
    return data


def test_hundreds_of_streams_resuming_at_once_all_get_replay_and_live(
    node_factory: NodeFactory,
) -> None:
    node = node_factory("--connect-rate", "0", "--max-connections-per-subject", "0")
    first = node.publish("storm", "before")
    replayed = node.publish("storm", "missed")
    port = node.gateway.port

    async def scenario() -> list[bytes]:
        opened = await asyncio.gather(*(_open(port, first) for _ in range(STREAMS)))
        try:
            heads = await asyncio.gather(
                *(_read_until(reader, replayed.encode(), 30) for reader, _ in opened)
            )
            live = await asyncio.to_thread(node.publish, "storm", "live")
            bodies = await asyncio.gather(
                *(_read_until(reader, live.encode(), 30) for reader, _ in opened)
            )
            return [head + body for head, body in zip(heads, bodies, strict=True)]
        finally:
            for _, writer in opened:
                writer.close()

    streams = asyncio.run(scenario())
    refused = [s for s in streams if b"unavailable" in s]
    assert not refused, f"{len(refused)} of {STREAMS} streams refused: {refused[0][-300:]!r}"
    for stream in streams:
        assert stream.startswith(b"HTTP/1.1 200"), stream[:200]
        assert stream.count(b"data: missed") == 1
        assert stream.count(b"data: live") == 1
        assert b"data: before" not in stream
    assert "Too many connections" not in node.gateway.output()
