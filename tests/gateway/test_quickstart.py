"""The embedded engine works with no Redis at all: what a newcomer sees with one command."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import redis

from tests.conftest import GatewayFactory
from tests.support.gateway import GatewayProcess
from tests.support.waiting import let_time_pass_async, wait_until


async def read_raw(port: int, path: str, until: bytes, timeout: float) -> tuple[bytes, list[float]]:
    """Speak HTTP/1.1 on a raw socket, like curl, until ``until`` arrives or time runs out."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode())
    received = b""
    times: list[float] = []
    try:
        async with asyncio.timeout(timeout):
            while until not in received:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                received += chunk
                times.append(time.monotonic())
    except TimeoutError:
        pass
    finally:
        writer.close()
    return received, times


def test_serve_without_redis_streams_preamble_heartbeats_and_published_events(
    gateway_factory: GatewayFactory,
) -> None:
    gateway: GatewayProcess = gateway_factory(
        "--heartbeat", "0.5", "--retry-ms", "1500", "--log-level", "info"
    )
    assert "in-memory engine" in gateway.output()

    async def scenario() -> tuple[bytes, list[float]]:
        reading = asyncio.create_task(
            read_raw(gateway.port, "/events?topic=demo", b"data: hello", timeout=15)
        )
        await let_time_pass_async(1.8, "a quiet stream: heartbeats every 0.5 s")
        cli = [sys.executable, "-m", "gateway.cli", "publish", "demo", "hello"]
        result = await asyncio.to_thread(
            subprocess.run, [*cli, "--url", gateway.url], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().count("-") == 1
        return await reading

    raw, _ = asyncio.run(scenario())
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    headers = head.lower()
    assert b"content-type: text/event-stream; charset=utf-8" in headers
    assert b"cache-control: no-store" in headers
    assert b"x-accel-buffering: no" in headers
    assert b"content-encoding" not in headers
    assert b"\r\nconnection:" not in headers
    decoded = _dechunk(body)
    assert decoded.startswith(b"retry: 1500\n\n: ok\n\n")
    pings = decoded.count(b": ping\n\n")
    assert 2 <= pings <= 5, decoded
    assert b"data: hello\n\n" in decoded
    assert decoded.index(b": ping") < decoded.index(b"data: hello")


def test_heartbeat_interval_follows_configuration(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory("--heartbeat", "0.4")
    raw, _ = asyncio.run(read_raw(gateway.port, "/events?topic=quiet", b"\x00", timeout=2.2))
    pings = _dechunk(raw.partition(b"\r\n\r\n")[2]).count(b": ping")
    assert 3 <= pings <= 6, pings
    gateway2 = gateway_factory("--heartbeat", "5")
    raw2, _ = asyncio.run(read_raw(gateway2.port, "/events?topic=quiet", b"\x00", timeout=1.5))
    assert b": ping" not in _dechunk(raw2.partition(b"\r\n\r\n")[2])


def _dechunk(body: bytes) -> bytes:
    """Decode as much of a chunked body as arrived."""
    out = b""
    while body:
        size_line, sep, rest = body.partition(b"\r\n")
        if not sep:
            break
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


def test_tail_prints_events_and_publish_cli_speaks_redis_directly(
    gateway_factory: GatewayFactory, redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    gateway = gateway_factory("--prefix", prefix, redis_url=redis_url)
    cli = [sys.executable, "-m", "gateway.cli"]
    tail = subprocess.Popen(
        [*cli, "tail", "news", "--url", gateway.url, "--count", "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        # tail prints events only: its stream is subscribed once Redis counts the node's
        # subscription to the topic's channel (the node subscribes for its first client)
        wait_until(
            lambda: redis_client.pubsub_numsub(f"{prefix}:c:news")[0][1] == 1,
            "the node subscribed to news for tail",
        )
        publish = [*cli, "publish", "--url", redis_url, "--prefix", prefix]
        first = subprocess.run([*publish, "news", "plain"], capture_output=True, text=True)
        second = subprocess.run(
            [*publish, "news,other", '{"a": 1}', "--json", "--event", "update"],
            capture_output=True,
            text=True,
        )
        assert first.returncode == 0, first.stderr
        assert second.returncode == 0, second.stderr
        out, _ = tail.communicate(timeout=15)
    finally:
        tail.kill()
        tail.wait()
    assert out.splitlines() == [
        f"{first.stdout.strip()}\tmessage\tplain",
        f'{second.stdout.strip()}\tupdate\t{{"a":1}}',
    ]


def test_publish_cli_reports_a_refused_publish(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    cli = [sys.executable, "-m", "gateway.cli", "publish", "--url", gateway.url]
    result = subprocess.run([*cli, "bad topic", "x"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "invalid topic" in result.stderr
