"""A publish body that never finishes arriving is timed out like an unfinished head."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.gateway import GatewayProcess


@pytest.fixture
def node() -> Iterator[GatewayProcess]:
    """A node whose requests must arrive within 1 s (given by variable, so the same test runs,
    and fails, on a build without the option)."""
    gateway = GatewayProcess(env={"SSE_GATEWAY_HEADER_TIMEOUT": "1"})
    try:
        yield gateway.start()
    finally:
        gateway.close()


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:
        pass
    return data


def test_a_publish_body_that_never_finishes_is_answered_408_and_closed(
    node: GatewayProcess,
) -> None:
    """Issue 10 E, slowloris: the header timeout closed unfinished heads, but a ``POST
    /publish`` whose head was complete and whose body never finished held its connection (and
    a file descriptor) for ever. The body must arrive within ``--header-timeout`` too."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(
            b"POST /publish HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            b'{"topic": "slow", '
        )
        answer = read_until_closed(sock)
    assert time.monotonic() - started < 8, "the unfinished body was never timed out"
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b'"error":"body_timeout"' in answer
    published = httpx.post(f"{node.url}/publish", json={"topic": "slow", "data": "on time"})
    assert published.status_code == 200, published.text
