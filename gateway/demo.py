"""``serve --demo``: simulated jobs published through the node's own engine, and ``/demo``.

For development: the settings refuse ``--demo`` together with token keys, because the page reads
and publishes without a token. Every process started with ``--demo`` publishes jobs of its own
(job ids carry a tag per process), so two demo nodes on one Redis show both sets on each page;
nodes started without ``--demo`` publish nothing.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import logging
import random
import re
import secrets
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from gateway.engines.base import Engine, EngineUnavailable
from gateway.errors import HTTPError
from gateway.publishing import PublishFailed
from publisher import NotReplicated, make_message

log = logging.getLogger("gateway.demo")

JOBS_TOPIC = "demo:jobs"
"""Job events: ``started``, ``progress`` (about 5 a second per job), ``completed``, ``failed``."""
CHAT_TOPIC = "demo:chat"
"""What the page's box (and ``sse-gateway publish demo:chat ...``) publishes."""
TOPICS = (JOBS_TOPIC, CHAT_TOPIC)

JOB_EVERY = 3.0
"""Seconds between new jobs."""
TICK = 0.2
"""Seconds between two progress events of one job."""
MAX_RUNNING = 3
FAIL_ONE_IN = 8
JOB_NAMES = (
    "resize images",
    "import customers.csv",
    "send newsletter",
    "build monthly report",
    "transcode video",
    "reindex search",
)

PAGE = Path(__file__).with_name("static") / "demo.html"


def job_data(name: str, job_id: str, current: int, total: int, **extra: Any) -> dict[str, Any]:
    """The fields every job event carries (those of ``publisher``'s ``job()`` helper)."""
    percent = round(100 * current / total, 1) if total else 100.0
    return {
        "job": name,
        "jobId": job_id,
        "epochMs": int(time.time() * 1000),
        "progress": {"current": current, "total": total, "percent": percent},
        **extra,
    }


class DemoPublisher:
    """Starts a job every ``job_every`` seconds (at most ``MAX_RUNNING`` at once), each
    reporting progress every ``tick`` seconds; one job in ``FAIL_ONE_IN`` fails midway."""

    def __init__(
        self,
        engine: Engine,
        *,
        job_every: float = JOB_EVERY,
        tick: float = TICK,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self.job_every = job_every
        self.tick = tick
        self.rng = rng or random.Random()
        self.tag = secrets.token_hex(2)
        """Names this process's jobs, so other demo nodes (or this one restarted) differ."""
        self.count = 0
        self.failing = False
        self._task: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()

    def start(self, page_url: str = "/demo") -> None:
        log.info("demo: simulated jobs on %s; open %s", JOBS_TOPIC, page_url)
        self._task = asyncio.create_task(self._run(), name="sse-gateway demo")

    def halt(self) -> None:
        """Stop publishing now (drain or shutdown); ``stop`` waits for the tasks to end."""
        for task in (self._task, *self._jobs):
            if task is not None:
                task.cancel()

    async def stop(self) -> None:
        self.halt()
        tasks = [t for t in (self._task, *self._jobs) if t is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def _run(self) -> None:
        while True:
            if len(self._jobs) < MAX_RUNNING:
                job = asyncio.create_task(self._job(), name="sse-gateway demo job")
                self._jobs.add(job)
                job.add_done_callback(self._jobs.discard)
            await asyncio.sleep(self.job_every)

    async def _job(self) -> None:
        self.count += 1
        job_id = f"{self.tag}-{self.count}"
        name = self.rng.choice(JOB_NAMES)
        total = self.rng.randint(15, 40)
        fails = self.rng.randrange(FAIL_ONE_IN) == 0
        fail_at = self.rng.randint(total // 3, total - 1) if fails else None
        await self._send("started", job_data(name, job_id, 0, total))
        for current in range(1, total + 1):
            await asyncio.sleep(self.tick)
            if current == fail_at:
                error = {"type": "TimeoutError", "message": "the storage did not answer in 5 s"}
                # as publisher's job(): the last progress reported, and the error
                failed = job_data(name, job_id, current - 1, total, error=error)
                await self._send("failed", failed)
                return
            await self._send("progress", job_data(name, job_id, current, total))
        await self._send("completed", job_data(name, job_id, total, total))

    async def _send(self, event: str, data: dict[str, Any]) -> None:
        # Nobody retries a simulated event by its key: nothing to remember.
        message = dataclasses.replace(make_message(JOBS_TOPIC, data, event), remember=False)
        try:
            await self.engine.publish(message)
        except NotReplicated:
            pass  # stored and delivered
        except (EngineUnavailable, PublishFailed) as exc:
            if not self.failing:
                log.warning("demo publisher: %s (events of the demo jobs are skipped)", exc)
            self.failing = True
            return
        if self.failing:
            log.info("demo publisher: publishing again")
            self.failing = False


def page_url(host: str, port: int) -> str:
    """Where a browser on this machine finds ``/demo`` (for the start-up log)."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}/demo" if ":" in host else f"http://{host}:{port}/demo"


def _source_hash(html: str, tag: str) -> str:
    """The CSP hash of the page's one inline ``<tag>`` element."""
    match = re.search(rf"<{tag}[^>]*>(.*?)</{tag}>", html, re.S)
    assert match is not None, f"demo.html has no <{tag}>"
    digest = hashlib.sha256(match.group(1).encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


class DemoPage:
    """``GET /demo``: the page with a Content-Security-Policy that lets only its own inline
    script and style run (what it shows of events is text, never markup, but a policy is a
    second guard); without ``--demo``, a 404 that says how to turn it on."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.body = PAGE.read_bytes() if enabled else b""
        if enabled:
            html = self.body.decode()
            self.headers = {
                "cache-control": "no-cache",
                "x-content-type-options": "nosniff",
                "referrer-policy": "no-referrer",
                "content-security-policy": (
                    f"default-src 'none'; script-src 'self' {_source_hash(html, 'script')}; "
                    f"style-src {_source_hash(html, 'style')}; connect-src 'self'; "
                    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
                ),
            }

    async def serve(self, request: Request) -> Response:
        if not self.enabled:
            return HTTPError(
                404, "demo_disabled",
                "the demo page is served by a node started with --demo (sse-gateway serve --demo)",
            ).response()  # fmt: skip
        return Response(self.body, media_type="text/html; charset=utf-8", headers=self.headers)
