"""Issue 11, acceptance 6: the README's quick start, run as written (on a free port instead of
8000): the gateway starts with ``--demo``, the page it names is served, and a ``curl``'d stream
gets what ``sse-gateway publish`` sends.

The install step is not run (the tests run from the installed checkout); the ``sse-gateway``
commands run as ``python -m gateway.cli`` from this checkout, the same program."""

from __future__ import annotations

import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.support.ports import free_port
from tests.support.waiting import WaitTimeout, wait_until

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
WAIT = 20.0


def quick_start() -> tuple[str, list[list[str]]]:
    """The section's prose and its ``sh`` blocks, each as a list of command lines."""
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.+?)\n```", section, re.S)
    return section, [[line for line in block.splitlines() if line.strip()] for block in blocks]


def as_run(line: str, port: int) -> list[str]:
    """A README command as this test runs it: on ``port``, with this checkout's program."""
    words = shlex.split(line.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))
    if words[0] != "sse-gateway":
        return words
    words = [sys.executable, "-m", "gateway.cli", *words[1:]]
    if words[3] == "publish":
        words += ["--url", f"http://127.0.0.1:{port}"]
    return words


class Lines:
    """A process's output lines, read by a thread so every wait on them has a bound."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        assert process.stdout is not None
        stdout = process.stdout
        threading.Thread(target=self._read, args=(stdout,), daemon=True).start()

    def _read(self, stdout: IO[str]) -> None:
        for line in stdout:
            self._queue.put(line)

    def wait_for(self, text: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.seen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} not seen in {timeout}s: {self.seen}")
            try:
                self.seen.append(self._queue.get(timeout=left).rstrip("\n"))
            except queue.Empty:
                continue


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def wait_ready(url: str, server: subprocess.Popen[str], log: Path) -> None:

    def ready() -> bool:
        assert server.poll() is None, f"the gateway exited:\n{log.read_text()}"
        try:
            return httpx.get(url + "/readyz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, "the gateway ready", WAIT)
    except WaitTimeout:
        raise AssertionError(f"the gateway was not ready in {WAIT}s:\n{log.read_text()}") from None


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is missing")
def test_the_readme_quick_start_runs_as_written(
    processes: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    section, blocks = quick_start()
    assert len(blocks) == 3, blocks
    (install_and_serve,), (curl,), publishes = blocks
    install, serve = install_and_serve.split(" && ")
    assert install == "pip install -e ."
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    log = tmp_path / "gateway.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            as_run(serve, port), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "SSE_GATEWAY_PORT": str(port)},
        )  # fmt: skip
    processes.append(server)
    wait_ready(url, server, log)

    # the page the prose says to open
    pages = re.findall(r"http://127\.0\.0\.1:8000(/\S*)", section.split("```sh", 2)[1])
    page_path = pages[0].rstrip(".:,")
    assert page_path == "/demo"
    page = httpx.get(url + page_path, timeout=5)
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert 'from "/client.js"' in page.text
    assert httpx.get(url + "/client.js", timeout=5).status_code == 200
    home = httpx.get(url + "/", headers={"accept": "text/html"}, timeout=5)
    assert (home.status_code, home.headers["location"]) == (302, "/demo")

    # the stream, then the publishes; the stream shows each published event with its id
    stream = subprocess.Popen(as_run(curl, port), stdout=subprocess.PIPE, text=True)
    processes.append(stream)
    lines = Lines(stream)
    lines.wait_for(": ok")  # subscribed: every event published from now on reaches it
    for line in publishes:
        result = subprocess.run(
            as_run(line, port), cwd=ROOT, capture_output=True, text=True, timeout=WAIT
        )
        assert result.returncode == 0, result.stderr
        event_id = result.stdout.strip()
        assert re.fullmatch(r"\d+-\d+", event_id), result.stdout
        lines.wait_for(f"id: {event_id}")
    lines.wait_for('data: {"progress":50}')
    text = "\n".join(lines.seen)
    assert "data: hello, world" in text
    assert "event: progress" in text
