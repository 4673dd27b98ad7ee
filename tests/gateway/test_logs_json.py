"""Issue 13 Logs: ``--log-format json`` writes one JSON object per line (uvicorn's lines and
the access log too), each stream's close is one ``stream closed`` line with its subject,
topics, duration, events and reason, and no token appears in any field. Plain stays the
default, with the same fields as ``key=value``. ``--forwarded-allow-ips`` reaches uvicorn."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from gateway.config import settings_from
from tests.support.gateway import GatewayProcess
from tests.support.sse import open_stream
from tests.support.tokens import SECRET, hs256
from tests.support.waiting import wait_until

# Minted at import: valid however long the suite runs.
READER = hs256(sub="alice", subscribe=["news"], ttl=24 * 3600)
PUBLISHER = hs256(sub="newsroom", subscribe=[], publish=["news"], ttl=24 * 3600)


@pytest.fixture
def nodes() -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for node in started:
        node.close()


def start(nodes: list[GatewayProcess], *args: str) -> GatewayProcess:
    node = GatewayProcess("--jwt-secret", SECRET, "--log-level", "info", "--access-log", *args)
    nodes.append(node)
    return node.start()


def publish(node: GatewayProcess, data: str) -> None:
    response = httpx.post(
        node.url + "/publish",
        json={"topic": "news", "data": data},
        headers={"authorization": f"Bearer {PUBLISHER}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text


def one_stream(node: GatewayProcess) -> None:
    """A stream that sends its token in the query (as EventSource must) gets one event from
    history, then one live (it is subscribed once the replay came), and is closed."""
    publish(node, "hello")

    async def scenario() -> list[str]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
            stream, reading = open_stream(
                client, node.url, ["news"], since=0, query=f"&token={READER}"
            )
            try:
                await stream.wait_for(lambda s: len(s.events) == 1)
                await asyncio.to_thread(publish, node, "again")
                await stream.wait_for(lambda s: len(s.events) == 2)
            finally:
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
        return stream.data()

    assert asyncio.run(scenario()) == ["hello", "again"]


def test_json_lines_carry_the_stream_close_and_never_a_token(
    nodes: list[GatewayProcess],
) -> None:
    node = start(nodes, "--log-format", "json")
    one_stream(node)
    node.wait_for_output('"stream closed"')
    node.stop()
    output = node.output()
    lines = [orjson.loads(line) for line in output.splitlines() if line.strip()]
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys(), line
    closed = [line for line in lines if line["message"] == "stream closed"]
    assert len(closed) == 1, closed
    (line,) = closed
    assert line["logger"] == "gateway.stream"
    assert line["level"] == "INFO"
    assert line["subject"] == "alice"
    assert line["topics"] == 1
    assert line["events"] == 2
    assert line["reason"] == "client_closed"
    assert isinstance(line["duration_s"], float)
    assert 0 <= line["duration_s"] < 10
    access = [line for line in lines if line["logger"] == "uvicorn.access"]
    streams = [line for line in access if line["path"].startswith("/events")]
    assert streams
    assert all("token=***" in line["path"] for line in streams), streams
    assert any(line["method"] == "POST" and line["status"] == 200 for line in access), access
    assert any(line["message"].startswith("sse-gateway ready") for line in lines)
    for token in (READER, PUBLISHER):
        for part in token.split("."):
            assert part not in output


def test_plain_lines_render_the_stream_close_as_key_value(nodes: list[GatewayProcess]) -> None:
    node = start(nodes)
    one_stream(node)
    node.wait_for_output("stream closed")
    line = next(line for line in node.output().splitlines() if "stream closed" in line)
    assert line.startswith("INFO:"), line
    assert " subject=alice topics=1 duration_s=" in line, line
    assert line.endswith(" events=2 reason=client_closed"), line
    assert READER.split(".")[2] not in node.output()


def access_client(node: GatewayProcess) -> str:
    """The client address of the access line of a request forwarded for 203.0.113.7."""
    response = httpx.get(
        node.url + "/healthz", headers={"x-forwarded-for": "203.0.113.7"}, timeout=5
    )
    assert response.status_code == 200

    def access_line() -> dict[str, Any] | None:
        for text in node.output().splitlines():
            line: dict[str, Any] = orjson.loads(text)
            if line.get("path") == "/healthz" and line["logger"] == "uvicorn.access":
                return line
        return None

    line = wait_until(access_line, "the access line of /healthz", 10, step=0.02)
    assert line is not None
    return str(line["client"])


def test_forwarded_allow_ips_decides_whose_forwarded_address_is_trusted(
    nodes: list[GatewayProcess],
) -> None:
    trusting = start(nodes, "--log-format", "json", "--forwarded-allow-ips", "127.0.0.1")
    assert access_client(trusting).startswith("203.0.113.7:")
    distrusting = start(nodes, "--log-format", "json", "--forwarded-allow-ips", "10.1.2.3")
    assert access_client(distrusting).startswith("127.0.0.1:")


def test_log_format_is_checked() -> None:
    assert settings_from(None, {"SSE_GATEWAY_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(SystemExit, match="--log-format: 'xml' is not one of plain, json"):
        settings_from(None, {"SSE_GATEWAY_LOG_FORMAT": "xml"})
    forwarded = settings_from(None, {"SSE_GATEWAY_FORWARDED_ALLOW_IPS": "10.0.0.1,10.0.0.2"})
    assert forwarded.forwarded_allow_ips == "10.0.0.1,10.0.0.2"
