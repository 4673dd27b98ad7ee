"""Gateway nodes as real processes: ``sse-gateway serve`` under uvicorn on a free port."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from tests.support.ports import free_port
from tests.support.waiting import WaitTimeout, wait_until


class GatewayProcess:
    def __init__(self, *args: str, redis_url: str | None = None, env: dict[str, str] | None = None):
        self.port = free_port()
        self.args = list(args)
        if redis_url:
            self.args += ["--redis-url", redis_url]
        self.env = {**os.environ, **(env or {})}
        self.env.pop("SSE_GATEWAY_REDIS_URL", None)
        fd, self.log_path = tempfile.mkstemp(prefix="sse-gateway-", suffix=".log")
        self.log = os.fdopen(fd, "wb")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 15.0) -> GatewayProcess:
        command = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, "--log-level", "warning", "--no-access-log", *self.args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"gateway exited at start:\n{self.output()}")
            try:
                return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_until(ready, "the gateway ready", timeout)
        except WaitTimeout:
            raise RuntimeError(f"gateway not ready in {timeout}s:\n{self.output()}") from None
        return self

    def output(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def wait_for_output(self, text: str, timeout: float = 10.0) -> str:
        """Wait until the node has logged ``text``; return its log."""
        try:
            wait_until(lambda: text in self.output(), f"{text!r} logged", timeout, step=0.02)
        except AssertionError:
            raise AssertionError(f"{text!r} never logged:\n{self.output()[-3000:]}") from None
        return self.output()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        self.process = None
        return code

    def close(self) -> None:
        self.stop()
        self.log.close()
        os.unlink(self.log_path)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def metric(self, name: str) -> float:
        """The sum of a metric's samples whose name and labels start with ``name``."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name):
                total += float(line.rsplit(" ", 1)[1])
        return total


def settled_sockets(pid: int, timeout: float = 3.0) -> int:
    """How many sockets a process holds once the count has held still for 0.3 s (readiness
    probes and other short connections may still be closing)."""
    count = open_sockets(pid)
    steady_since = time.monotonic()

    def steady() -> bool:
        nonlocal count, steady_since
        now = open_sockets(pid)
        if now != count:
            count, steady_since = now, time.monotonic()
        return time.monotonic() - steady_since >= 0.3

    with contextlib.suppress(WaitTimeout):  # still moving: the latest count
        wait_until(steady, "the socket count to hold still", timeout)
    return count


def open_sockets(pid: int) -> int:
    """How many sockets a process holds open."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
        except OSError:
            pass
    return count
