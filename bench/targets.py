"""The servers under test (gateway, naive baseline, nchan), the Redis they share, and how events
are published to each."""

import contextlib
import http.client
import os
import resource
import shutil
import signal
import socket
import string
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import orjson
import redis

from bench.load import REPO_ROOT
from bench.publish import Sender

TOPIC = "bench"
PREFIX = "bench"
NCHAN_CONF = Path(__file__).with_name("nchan.conf")
NCHAN_MODULE_PATHS = (
    Path("/usr/lib/nginx/modules/ngx_nchan_module.so"),
    Path("/usr/lib64/nginx/modules/ngx_nchan_module.so"),
    Path("/usr/local/nginx/modules/ngx_nchan_module.so"),
)
READY_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_status(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return 0
    finally:
        conn.close()


class ManagedProcess:
    """A child in its own session (so the whole group, workers included, is stopped by its
    id), with output in a log file. Every live one is in ``LIVE`` until stopped."""

    LIVE: ClassVar[set["ManagedProcess"]] = set()

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=cwd, start_new_session=True,
            )  # fmt: skip
        ManagedProcess.LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_until(self, check: Callable[[], bool], timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.tail()}")
            if check():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, grace: float = 5.0) -> None:
        ManagedProcess.LIVE.discard(self)
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    @classmethod
    def stop_all(cls) -> None:
        for process in list(cls.LIVE):
            process.stop(grace=2.0)


class RedisServer:
    """A throwaway redis-server on a free loopback port, shared by all runs (flushed between)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server not found (apt-get install redis-server)")
        self.port = free_port()
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(workdir), "--maxclients", "60000"]
        argv += ["--protected-mode", "no"]
        self.process = ManagedProcess("redis-server", argv, workdir / "redis.log")
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis.from_url(self.url, protocol=2, socket_timeout=10)
        self.process.wait_until(self._pings)

    def _pings(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    @property
    def pid(self) -> int:
        return self.process.pid

    def flush(self) -> None:
        self.client.flushall()

    def stop(self) -> None:
        self.client.close()
        self.process.stop()


@dataclass
class Server:
    target: str
    process: ManagedProcess
    port: int
    url: str
    workers: int
    logs: tuple[Path, ...] = ()

    def stop(self) -> None:
        self.process.stop()


class Target(ABC):
    name: str
    uses_redis = True
    resumes = True
    """Whether a client can resume with Last-Event-ID (the ``storm`` scenario)."""

    def __init__(self, redis_url: str, logs: Path) -> None:
        self.redis_url = redis_url
        self.logs = logs
        self._starts = 0

    def unavailable(self) -> str | None:
        """Why this target cannot run here, or None."""
        return None

    def _log(self) -> Path:
        self._starts += 1
        return self.logs / f"{self.name}-{self._starts}.log"

    @abstractmethod
    def start(self, workers: int = 1) -> Server: ...

    @abstractmethod
    def sender(self, server: Server) -> Sender: ...


class GatewaySender:
    def __init__(self, redis_url: str) -> None:
        from publisher import Publisher

        self.publisher = Publisher.from_url(redis_url, prefix=PREFIX)

    def send(self, events: list[dict[str, Any]]) -> None:
        self.publisher.publish_many([(TOPIC, event) for event in events])

    def drain(self, timeout: float) -> bool:
        return True  # publish_many returns once Redis has the events

    def close(self) -> None:
        self.publisher.close()


class GatewayTarget(Target):
    name = "gateway"

    def __init__(self, redis_url: str, logs: Path) -> None:
        super().__init__(redis_url, logs)
        self._help: str | None = None

    def serve_help(self) -> str:
        if self._help is None:
            done = subprocess.run(
                [sys.executable, "-m", "gateway.cli", "serve", "--help"],
                capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
            )  # fmt: skip
            self._help = done.stdout + done.stderr
        return self._help

    def supports_workers(self) -> bool:
        return "--workers" in self.serve_help()

    def unavailable(self) -> str | None:
        if "--redis-url" not in self.serve_help():
            return "`python -m gateway.cli serve --help` failed:\n" + self.serve_help()[-2000:]
        return None

    def start(self, workers: int = 1) -> Server:
        port = free_port()
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)]
        argv += ["--redis-url", self.redis_url, "--prefix", PREFIX, "--log-level", "warning"]
        argv += ["--no-access-log", "--connect-rate", "0", "--max-connections", "30000"]
        argv += ["--max-connections-per-subject", "0", "--heartbeat", "15"]
        argv += ["--drain-seconds", "0"]
        if workers != 1:
            if not self.supports_workers():
                raise RuntimeError("sse-gateway serve has no --workers option")
            argv += ["--workers", str(workers)]
        process = ManagedProcess(self.name, argv, self._log(), cwd=REPO_ROOT)
        process.wait_until(lambda: http_status(port, "/readyz") == 200)
        url = f"http://127.0.0.1:{port}/events?topic={TOPIC}"
        return Server(self.name, process, port, url, workers, (process.log,))

    def sender(self, server: Server) -> Sender:
        return GatewaySender(self.redis_url)


class RedisPublishSender:
    """Plain ``PUBLISH <channel> <json>``, pipelined per batch."""

    def __init__(self, redis_url: str) -> None:
        self.client = redis.Redis.from_url(redis_url, protocol=2, socket_timeout=10)

    def send(self, events: list[dict[str, Any]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for event in events:
            pipe.publish(TOPIC, orjson.dumps(event))
        pipe.execute()

    def drain(self, timeout: float) -> bool:
        return True  # execute() returns once Redis has published them

    def close(self) -> None:
        self.client.close()


class NaiveTarget(Target):
    name = "naive"
    resumes = False  # plain pub/sub: nothing is kept to resume from

    def start(self, workers: int = 1) -> Server:
        port = free_port()
        argv = [sys.executable, "-m", "bench.baselines.naive", "--port", str(port)]
        argv += ["--redis-url", self.redis_url]
        process = ManagedProcess(self.name, argv, self._log(), cwd=REPO_ROOT)
        process.wait_until(lambda: tcp_open(port))
        url = f"http://127.0.0.1:{port}/events?topic={TOPIC}"
        return Server(self.name, process, port, url, 1, (process.log,))

    def sender(self, server: Server) -> Sender:
        return RedisPublishSender(self.redis_url)


def read_http_response(sock: socket.socket, buffer: bytes) -> tuple[int, bytes]:
    """One ``Content-Length`` response from a keep-alive connection: (status, what is left)."""

    def fill(data: bytes) -> bytes:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        return data + chunk

    while b"\r\n\r\n" not in buffer:
        buffer = fill(buffer)
    head, buffer = buffer.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    while len(buffer) < length:
        buffer = fill(buffer)
    return int(lines[0].split()[1]), buffer[length:]


class NchanSender:
    """nchan takes one message per POST. A batch goes out as pipelined HTTP/1.1 requests in one
    write, and a reader thread consumes the answers, so the publisher is never paced by the
    measured server's answers (the other targets publish to Redis, not to the server): an
    overloaded nginx shows up as latency, not as a slower publisher."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.reader: threading.Thread | None = None
        self.error: str | None = None
        self.answered = 0
        self.sent = 0

    def _connect(self) -> socket.socket:
        if self.sock is None:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)
            self.sock, self.error = sock, None
            self.reader = threading.Thread(target=self._read_answers, args=(sock,), daemon=True)
            self.reader.start()
        return self.sock

    def _read_answers(self, sock: socket.socket) -> None:
        buffer = b""
        try:
            while True:
                status, buffer = read_http_response(sock, buffer)
                self.answered += 1
                if status >= 300:
                    self.error = f"nchan /pub answered {status}"
        except (OSError, ValueError, IndexError) as exc:
            if self.sock is sock:
                self.error = f"nchan publisher connection: {exc}"

    def send(self, events: list[dict[str, Any]]) -> None:
        if self.error is not None:
            error = self.error
            self.close()
            raise ConnectionError(error)
        head = "POST /pub HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        requests = []
        for event in events:
            body = orjson.dumps(event)
            requests.append(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        try:
            self._connect().sendall(b"".join(requests))
        except OSError:
            self.close()
            raise
        self.sent += len(requests)

    def drain(self, timeout: float) -> bool:
        """Waits for nchan's answer to every POST sent (they are read by another thread)."""
        deadline = time.monotonic() + timeout
        while self.answered < self.sent and self.error is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return self.error is None

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if self.reader is not None:
            self.reader.join(timeout=5)
            self.reader = None


def find_nginx() -> Path | None:
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    return Path(found) if found else None


def find_nchan_module() -> Path | None:
    for path in NCHAN_MODULE_PATHS:
        if path.is_file():
            return path
    if shutil.which("dpkg") is None:
        return None
    done = subprocess.run(
        ["dpkg", "-L", "libnginx-mod-nchan"], capture_output=True, text=True, check=False
    )
    for line in done.stdout.splitlines():
        if line.endswith("ngx_nchan_module.so") and Path(line).is_file():
            return Path(line)
    return None


class NchanTarget(Target):
    name = "nchan"
    uses_redis = False

    def __init__(self, redis_url: str, logs: Path) -> None:
        super().__init__(redis_url, logs)
        self.nginx = find_nginx()
        self.module = find_nchan_module()

    def unavailable(self) -> str | None:
        if self.nginx is None:
            return "not installed (no nginx; apt-get install nginx libnginx-mod-nchan)"
        if self.module is None:
            return "not installed (no ngx_nchan_module.so; apt-get install libnginx-mod-nchan)"
        return None

    def start(self, workers: int = 1) -> Server:
        if self.nginx is None or self.module is None:
            raise RuntimeError(f"nchan: {self.unavailable()}")
        port = free_port()
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if nofile == resource.RLIM_INFINITY:
            nofile = 65536
        prefix = self.logs / f"nchan-{self._starts + 1}"
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(
            string.Template(NCHAN_CONF.read_text()).substitute(
                module=self.module, workers=workers, nofile=nofile,
                worker_connections=min(32768, nofile),
                prefix=prefix, port=port,
            )
        )  # fmt: skip
        argv = [
            str(self.nginx),
            "-c",
            str(conf),
            "-p",
            f"{prefix}/",
            "-e",
            str(prefix / "error.log"),
        ]
        process = ManagedProcess(self.name, argv, self._log())
        process.wait_until(lambda: tcp_open(port))
        url = f"http://127.0.0.1:{port}/sub"
        return Server(self.name, process, port, url, workers, (process.log, prefix / "error.log"))

    def sender(self, server: Server) -> Sender:
        return NchanSender(server.port)


TARGETS: dict[str, type[Target]] = {
    "gateway": GatewayTarget,
    "naive": NaiveTarget,
    "nchan": NchanTarget,
}
