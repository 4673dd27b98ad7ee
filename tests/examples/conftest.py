"""Example tests: each example starts with the command from its README, in Chromium (Debian's
``/usr/bin/chromium`` via Playwright, skipped where missing, as in tests/browser/).

``deployment`` runs each test twice: on the embedded engine with no Redis (the example starts
its own gateway), and on Redis with two gateway nodes behind a loopback balancer, which the
example is pointed at with ``GATEWAY_URL``."""

from __future__ import annotations

import os
import queue
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.browser.conftest import browser
from tests.support.gateway import GatewayProcess
from tests.support.ports import free_port
from tests.support.proxy import LoadBalancer
from tests.support.tokens import SECRET

__all__ = ["browser"]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("SSE_GATEWAY_TEST_ARTIFACTS") or ROOT / "tests" / ".artifacts")
START_TIMEOUT = 30.0


def readme_command(name: str) -> list[str]:
    """The ``python examples/<name>/app.py`` line of the example's README, as argv."""
    text = (ROOT / "examples" / name / "README.md").read_text(encoding="utf-8")
    match = re.search(rf"^python (examples/{name}/app\.py.*)$", text, re.MULTILINE)
    assert match, f"examples/{name}/README.md shows no 'python examples/{name}/app.py' command"
    return [sys.executable, *shlex.split(match.group(1))]


class ExampleProcess:
    """An example started as a person would; ``url`` is the page URL it printed."""

    def __init__(self, command: Sequence[str], env: dict[str, str]) -> None:
        fd, self.log_path = tempfile.mkstemp(prefix="sse-example-", suffix=".log")
        self.log = os.fdopen(fd, "wb")
        self.process = subprocess.Popen(
            list(command), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=self.log
        )
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(lines,), daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT
        self.url = ""
        self.gateway_url = ""
        while not self.url:
            try:
                line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                output = self.output()
                self.stop()
                raise RuntimeError(f"no 'example:' line in {START_TIMEOUT}s:\n{output}") from None
            if line.startswith("gateway: "):
                self.gateway_url = line.split(" ", 1)[1].strip()
            if line.startswith("example: "):
                self.url = line.split(" ", 1)[1].strip()

    def _read(self, lines: queue.Queue[str]) -> None:
        assert self.process.stdout is not None
        with self.process.stdout as stdout:  # closed at the end of the output
            for raw in stdout:
                lines.put(raw.decode("utf-8", "replace"))
        lines.put("")

    def output(self) -> str:
        self.log.flush()
        return Path(self.log_path).read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        os.unlink(self.log_path)


Launch = Callable[..., ExampleProcess]


@pytest.fixture(params=["embedded", "redis-2-nodes"])
def launch(request: pytest.FixtureRequest) -> Iterator[Launch]:
    """``launch(name, node_args=(), env={})`` starts examples/<name> with its README command;
    ``node_args`` are the gateway options the example passes when it starts its own."""
    started: list[Any] = []
    mode: str = request.param

    def start(
        name: str, node_args: Sequence[str] = (), env: dict[str, str] | None = None
    ) -> ExampleProcess:
        skip = ("REDIS_URL", "GATEWAY_URL", "PORT")
        env = {k: v for k, v in os.environ.items() if k not in skip} | (env or {})
        env["EXAMPLE_JWT_SECRET"] = SECRET
        if mode != "embedded":
            redis_url = request.getfixturevalue("redis_url")
            prefix = request.getfixturevalue("prefix")
            port = free_port()
            args = ["--prefix", prefix, "--jwt-secret", SECRET, *node_args]
            args += ["--cors-origin", f"http://127.0.0.1:{port}"]
            for _ in range(2):
                node = GatewayProcess(*args, redis_url=redis_url)
                started.append(node)
                node.start()
            balancer = LoadBalancer(n.port for n in started if isinstance(n, GatewayProcess))
            started.append(balancer)
            env["GATEWAY_URL"] = f"http://127.0.0.1:{balancer.port}"
            env["PORT"] = str(port)
        example = ExampleProcess(readme_command(name), env)
        started.append(example)
        return example

    start.mode = mode  # type: ignore[attr-defined]
    yield start
    for part in reversed(started):
        if isinstance(part, ExampleProcess):
            part.stop()
        else:
            part.close()


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
