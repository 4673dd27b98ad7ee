"""Job progress example: worker processes run jobs with ``Publisher.job()``; a dashboard shows
one progress bar per job and server, and a failed job's error.

The page restores its bars after a reload: it keeps the bars and the last event id in
``sessionStorage`` and resumes after that id (``Last-Event-ID``); a first visit replays the
last minutes of history with ``since``, and ``?since=<epoch ms>`` in the page's URL replays
from that time.

Run: ``python examples/job_progress/app.py`` (README in this folder).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _launch import Example, run_example
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse
from starlette.routing import Route

HERE = Path(__file__).resolve().parent
WORKERS = int(os.environ.get("WORKERS", "3"))
TOPIC = "jobs"
WORKER_TOKEN_TTL = 12 * 3600
HISTORY_MINUTES = 10
"""How far back a first visit replays."""


def start_workers(example: Example) -> list[subprocess.Popen[bytes]]:
    """The workers publish with a token of their own (ignored when they publish to Redis)."""
    token = example.token("job-workers", publish=[TOPIC], ttl=WORKER_TOKEN_TTL)
    env = {**os.environ, "PUBLISHER_URL": example.publisher_url(), "PUBLISHER_TOKEN": token}
    worker = str(HERE / "worker.py")
    return [subprocess.Popen([sys.executable, worker, str(n)], env=env) for n in range(WORKERS)]


def build(example: Example) -> Starlette:
    if not re.fullmatch(r"https?://[\w.:\[\]-]+", example.gateway_url):
        raise SystemExit(f"not a plain gateway URL: {example.gateway_url!r}")
    page_html = (
        (HERE / "page.html")
        .read_text()
        .replace("{{GATEWAY}}", example.gateway_url)
        .replace("{{HISTORY_MINUTES}}", str(HISTORY_MINUTES))
    )

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(page_html)

    async def token(request: Request) -> PlainTextResponse:
        """The page's stream token: a real app checks its session here."""
        return PlainTextResponse(example.token("dashboard", subscribe=[TOPIC], ttl=300))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        workers = start_workers(example)
        try:
            yield
        finally:
            for process in workers:
                process.terminate()
            for process in workers:
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

    return Starlette(routes=[Route("/", page), Route("/token", token)], lifespan=lifespan)


if __name__ == "__main__":
    run_example(build, jwt=True)
