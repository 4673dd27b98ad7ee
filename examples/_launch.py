"""The one-command launcher the examples share.

An example is a Starlette app built by a function of an :class:`Example`::

    from _launch import Example, run_example

    def build(example: Example) -> Starlette: ...

    if __name__ == "__main__":
        run_example(build, gateway_args=["--jwt-leeway", "0"], jwt=True)

``run_example`` finds a gateway, then serves the app and prints ``example: <page URL>``:

- ``GATEWAY_URL`` set: that gateway is used as it is (it must already allow the app's origin in
  ``--cors-origin`` and, with ``jwt=True``, verify ``EXAMPLE_JWT_SECRET``);
- else it starts ``sse-gateway serve`` itself on a free loopback port, on Redis when
  ``REDIS_URL`` is set and on the embedded engine otherwise, with ``--cors-origin`` for the
  app's origin (the page imports ``<gateway>/client.js`` and opens streams from the app's
  origin), ``--jwt-secret`` when ``jwt=True``, and ``gateway_args``; it waits for ``/readyz``
  and stops the gateway when the app stops.

The app listens on ``127.0.0.1:$PORT`` (a free port when ``PORT`` is unset). Examples run as
``python examples/<name>/app.py``; importing this module puts the repository root on
``sys.path`` so ``publisher`` imports from a checkout too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import jwt
import uvicorn
from starlette.applications import Starlette

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from publisher import AsyncPublisher, Publisher  # noqa: E402

DEV_SECRET = "sse-gateway-example-secret-change-me-0123456789"
READY_TIMEOUT = 20.0


@dataclass(frozen=True)
class Example:
    """Where an example's parts are: the page's gateway, the app, Redis, the token secret."""

    gateway_url: str
    app_url: str
    redis_url: str | None
    jwt_secret: str

    def token(
        self,
        sub: str,
        *,
        subscribe: Sequence[str] = (),
        publish: Sequence[str] = (),
        ttl: float = 60.0,
    ) -> str:
        """An HS256 token the gateway accepts, granting those topic patterns for ``ttl`` s."""
        claims = {
            "sub": sub,
            "exp": int(time.time() + ttl),
            "sse": {"subscribe": list(subscribe), "publish": list(publish)},
        }
        return jwt.encode(claims, self.jwt_secret, algorithm="HS256")

    def publisher_url(self) -> str:
        """Redis when the example runs on Redis (no token needed), else the gateway."""
        return self.redis_url or self.gateway_url

    def publisher(self, token: str | None = None) -> Publisher:
        return Publisher.from_url(self.publisher_url(), token=token)

    def async_publisher(self, token: str | None = None) -> AsyncPublisher:
        return AsyncPublisher.from_url(self.publisher_url(), token=token)


def _listen() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(os.environ.get("PORT", "0"))))
    sock.listen(128)
    return sock


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the gateway exited with {process.returncode} at start")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.05)
    raise SystemExit(f"the gateway was not ready within {READY_TIMEOUT:.0f} s")


def _start_gateway(
    app_port: int, redis_url: str | None, args: Sequence[str]
) -> tuple[str, subprocess.Popen[bytes]]:
    port = _free_port()
    command = [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)]
    command += ["--log-level", "warning", "--no-access-log"]
    command += ["--cors-origin", f"http://127.0.0.1:{app_port}"]
    command += ["--cors-origin", f"http://localhost:{app_port}"]
    if redis_url:
        command += ["--redis-url", redis_url]
    env = {k: v for k, v in os.environ.items() if k != "SSE_GATEWAY_REDIS_URL"}
    process = subprocess.Popen([*command, *args], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process)
    except BaseException:
        _stop(process)
        raise
    return url, process


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    """uvicorn re-raises SIGTERM/SIGINT once it has shut down: exit through ``finally`` (and
    without a traceback) so the gateway this launcher started is stopped too."""
    raise SystemExit(128 + signum)


def run_example(
    build: Callable[[Example], Starlette],
    *,
    gateway_args: Sequence[str] = (),
    jwt: bool = False,
) -> None:
    """Find or start the gateway, build the app with :class:`Example`, serve it, and print
    ``example: <URL>`` once the app's port is listening. Blocks until SIGINT/SIGTERM."""
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, _exit_on_signal)
    sock = _listen()
    app_port = int(sock.getsockname()[1])
    secret = os.environ.get("EXAMPLE_JWT_SECRET", DEV_SECRET)
    redis_url = os.environ.get("REDIS_URL") or None
    gateway: subprocess.Popen[bytes] | None = None
    gateway_url = os.environ.get("GATEWAY_URL", "").rstrip("/")
    if not gateway_url:
        args = [*(["--jwt-secret", secret] if jwt else []), *gateway_args]
        gateway_url, gateway = _start_gateway(app_port, redis_url, args)
    try:
        example = Example(gateway_url, f"http://127.0.0.1:{app_port}", redis_url, secret)
        app = build(example)
        print(f"gateway: {gateway_url}", flush=True)
        print(f"example: {example.app_url}/", flush=True)
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        if gateway is not None:
            _stop(gateway)
