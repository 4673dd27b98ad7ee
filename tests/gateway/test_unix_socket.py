"""A node reaches Redis over a unix socket, as ``--redis-url unix://`` is documented to."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.gateway import GatewayProcess
from tests.support.redis_server import answers, server_binary
from tests.support.waiting import wait_until


@pytest.fixture
def unix_redis() -> Iterator[str]:
    """A redis-server listening on a unix socket only (short path: sockets allow ~100 bytes)."""
    server = server_binary()
    directory = Path(tempfile.mkdtemp(prefix="sse-redis-", dir="/tmp"))
    sock = directory / "redis.sock"
    process = subprocess.Popen(
        [server, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        cwd=directory,
    )
    try:
        with redis.Redis(unix_socket_path=str(sock), socket_timeout=1) as client:
            wait_until(lambda: answers(client), "redis-server on its unix socket")
        yield f"unix://{sock}"
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(directory, ignore_errors=True)


def test_a_node_on_a_unix_socket_url_becomes_ready_and_publishes(unix_redis: str) -> None:
    """The pub/sub link's pool passed ``socket_keepalive`` to unix socket connections, which
    do not take it: the link never came up (logged only as "not reachable") and the node
    stayed unready for ever."""
    gateway = GatewayProcess(redis_url=unix_redis)
    try:
        gateway.start(timeout=10)
        ready = httpx.get(f"{gateway.url}/readyz", timeout=5).json()
        assert ready["link"] == "up", ready
        answer = httpx.post(f"{gateway.url}/publish", json={"topic": "t", "data": "x"}, timeout=5)
        assert answer.status_code == 200, answer.text
    finally:
        gateway.close()
