"""A throwaway redis-server on a free loopback port (or REDIS_URL, or a testcontainer)."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator

import redis

from tests.support.ports import free_port
from tests.support.waiting import wait_until

INSTALL_HINT = (
    "redis-server is needed by the tests: install it (Debian/Ubuntu: apt-get install "
    "redis-server), or set REDIS_URL to a Redis >= 7.0 the tests may use"
)


class RedisServer:
    """One redis-server process; ``restart`` keeps its port and data directory."""

    def __init__(self, binary: str, *extra: str) -> None:
        self.binary = binary
        self.extra = extra
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="sse-gateway-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", self.dir, "--daemonize", "no", *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        process = self.process
        with redis.Redis(port=self.port, socket_connect_timeout=0.2) as client:
            try:
                wait_until(lambda: process.poll() is not None or answers(client), "redis-server")
            except AssertionError:
                raise RuntimeError("redis-server did not start in 10 s") from None
        if process.poll() is not None:
            raise RuntimeError(f"redis-server did not start (exit {process.poll()})")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def answers(client: redis.Redis) -> bool:
    """Whether the Redis behind ``client`` answers a PING (False while it cannot be reached)."""
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _apt_install() -> str | None:
    """Install Debian's redis-server when running as root with apt; None if that is impossible."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        if subprocess.run(args, env=env, capture_output=True).returncode != 0:
            return None
    return shutil.which("redis-server")


def _docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    result = subprocess.run(["docker", "info"], capture_output=True, timeout=10)
    return result.returncode == 0


@functools.cache
def server_binary() -> str:
    """Debian's redis-server: on PATH, else installed (as root, with apt), else
    ``RuntimeError`` saying how to install it. Tests that need a Redis of their own ask here
    and never skip: a suite that skips its Redis scenarios on a fresh machine reports green
    for what it did not test."""
    binary = shutil.which("redis-server") or _apt_install()
    if binary is None:
        raise RuntimeError(INSTALL_HINT)
    return binary


@contextlib.contextmanager
def own_redis(*extra: str) -> Iterator[RedisServer]:
    """A redis-server of a test's own (``extra``: its command-line options), which the test
    may stop, restart on its port, fill or break; closed when the block ends."""
    server = RedisServer(server_binary(), *extra)
    try:
        server.start()
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    """Yield a Redis URL for the test session, and stop what was started for it."""
    if url := os.environ.get("REDIS_URL"):
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None and _docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"
        return
    server = RedisServer(binary or server_binary())
    server.start()
    try:
        yield server.url
    finally:
        server.close()


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode() if isinstance(value, str) else value


def stream_entries(
    client: redis.Redis,
    key: str,
    first: str = "-",
    last: str = "+",
    *,
    count: int | None = None,
    newest_first: bool = False,
) -> list[tuple[str, dict[bytes, bytes]]]:
    """The entries of the Redis stream ``key`` (XRANGE, or XREVRANGE if ``newest_first``):
    each id as text, with its fields."""
    if newest_first:
        raw = client.xrevrange(key, last, first, count)
    else:
        raw = client.xrange(key, first, last, count)
    return [
        (
            _as_bytes(entry_id or b"").decode(),
            {_as_bytes(k): _as_bytes(v) for k, v in fields.items()},
        )
        for entry_id, fields in raw or []
        if fields is not None
    ]
