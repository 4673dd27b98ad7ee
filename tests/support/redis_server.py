"""A throwaway redis-server on a free loopback port (or REDIS_URL, or a testcontainer)."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

from tests.support.ports import free_port
from tests.support.waiting import WaitTimeout, wait_until

INSTALL_HINT = (
    "redis-server is needed by the tests: install it (Debian/Ubuntu: apt-get install "
    "redis-server), or set REDIS_URL to a Redis >= 7.0 the tests may use"
)


class RedisServer:
    """One redis-server process on a free loopback port: the one Redis wrapper of the tests.

    ``extra`` are command-line options; ``aof`` turns the append-only file on (so a ``kill``
    then ``start`` replays it); ``conf`` runs it from a configuration file the caller wrote
    (``port``, ``bind`` and ``dir`` in it must be this server's: see ``tests/support/topology``).
    ``restart`` keeps the port and the data directory. Its log is ``log_tail()``."""

    def __init__(
        self,
        binary: str,
        *extra: str,
        aof: bool = False,
        conf: Path | None = None,
        port: int | None = None,
        directory: Path | None = None,
        password: str | None = None,
    ) -> None:
        self.binary = binary
        self.extra = extra
        self.aof = aof
        self.conf = conf
        self.password = password
        self.port = port or free_port()
        self._owns_dir = directory is None
        self.dir = (
            str(directory) if directory is not None else tempfile.mkdtemp(prefix="sse-redis-")
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> str:
        return os.path.join(self.dir, "redis.log")

    def args(self) -> list[str]:
        log = ["--daemonize", "no", "--logfile", self.log_path]
        if self.conf is not None:
            return [self.binary, str(self.conf), *log, *self.extra]
        aof = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.aof else [
            "--appendonly", "no"]  # fmt: skip
        return [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            *aof, "--dir", self.dir, *log, *self.extra,
        ]  # fmt: skip

    def client(self, **options: Any) -> redis.Redis:
        settings: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 1, **options}
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **settings)

    def start(self, timeout: float = 20.0) -> RedisServer:
        process = self.process = subprocess.Popen(
            self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        with contextlib.closing(self.client(socket_connect_timeout=0.2)) as client:
            # LOADING (an AOF replayed) is a ConnectionError: waited out too
            try:
                wait_until(lambda: process.poll() is not None or answers(client), "redis", timeout)
            except WaitTimeout:
                raise RuntimeError(f"redis-server did not start:\n{self.log_tail()}") from None
        if process.poll() is not None:
            raise RuntimeError(
                f"redis-server did not start (exit {process.poll()}):\n{self.log_tail()}"
            )
        return self

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
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-size:]
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        if self._owns_dir:
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


# -- Sentinel ----------------------------------------------------------------------------------

SERVICE = "mymaster"


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
        self.primary = RedisServer(binary, *fenced, aof=True)
        self.replica = RedisServer(
            binary, *fenced, "--replicaof", "127.0.0.1", str(self.primary.port), aof=True
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
