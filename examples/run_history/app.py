"""A crawler's run-history table: a server-rendered snapshot that the page keeps live.

The page gets the runs and the stream position of ``crawler:<id>`` in one response, then
follows the topic from that position (``fetch`` transport, ``Authorization`` header), so a run
that changes between the snapshot and the subscribe is replayed, never lost.

Run: ``python examples/run_history/app.py``, then ``python examples/run_history/worker.py URL``.
"""

from __future__ import annotations

import asyncio
import html
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _launch import Example, run_example
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route

TOKEN_TTL = 60.0
PAGE = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")


class Runs:
    """The app's store: runs by id, in memory (a table in a real app)."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    def start(self, crawler: str, url: str) -> dict[str, Any]:
        run_id = next(self._ids)
        run = {"id": run_id, "crawler": crawler, "url": url, "status": "running",
               "pages": 0, "started_at": time.time(), "finished_at": None}  # fmt: skip
        self.rows[run_id] = run
        return dict(run)

    def finish(self, run_id: int, pages: int, status: str) -> dict[str, Any]:
        run = self.rows.get(run_id)
        if run is None:
            raise HTTPException(404, f"no run {run_id}")
        run.update(status=status, pages=pages, finished_at=time.time())
        return dict(run)

    def of(self, crawler: str) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows.values() if r["crawler"] == crawler]


def row_html(run: dict[str, Any]) -> str:
    """The same row the page's script renders for a live event."""
    return (
        f'<tr data-run="{run["id"]}" class="{html.escape(run["status"])}"><td>#{run["id"]}</td>'
        f"<td>{html.escape(run['url'])}</td><td class=status>{html.escape(run['status'])}</td>"
        f"<td>{run['pages']}</td></tr>"
    )


def build(example: Example) -> Starlette:
    runs = Runs()
    # The app publishes over HTTP with its own token (or straight to Redis when it has one).
    app_token = example.token(
        "run-history-app", subscribe=["crawler:*"], publish=["crawler:*"], ttl=7 * 86400
    )
    pub = example.async_publisher(app_token)
    lock = asyncio.Lock()  # one HTTP connection: one request at a time

    async def page(request: Request) -> HTMLResponse:
        crawler = request.path_params.get("crawler", "1")
        topic = f"crawler:{crawler}"
        async with lock:
            position = await pub.position(topic)  # first the position, then the rows
        rows = runs.of(crawler)
        config = {"gateway": example.gateway_url, "crawler": crawler, "position": position}
        body = (
            PAGE.replace("{{crawler}}", html.escape(crawler))
            .replace("{{rows}}", "\n".join(row_html(r) for r in reversed(rows)))
            .replace("{{config}}", json.dumps(config).replace("<", "\\u003c"))
        )
        return HTMLResponse(body, headers={"cache-control": "no-store"})

    async def token(request: Request) -> PlainTextResponse:
        """A short-lived token for one crawler's topic (a real app checks the user first)."""
        crawler = request.path_params["crawler"]
        tok = example.token("viewer", subscribe=[f"crawler:{crawler}"], ttl=TOKEN_TTL)
        return PlainTextResponse(tok, headers={"cache-control": "no-store"})

    async def start(request: Request) -> JSONResponse:
        body = await request.json()
        run = runs.start(str(body.get("crawler", "1")), str(body.get("url", "")))
        async with lock:
            await pub.publish(f"crawler:{run['crawler']}", run, event="run_started")
        return JSONResponse(run, status_code=201)

    async def finish(request: Request) -> JSONResponse:
        body = await request.json()
        status = "failed" if body.get("failed") else "completed"
        run = runs.finish(int(request.path_params["run"]), int(body.get("pages", 0)), status)
        async with lock:
            await pub.publish(f"crawler:{run['crawler']}", run, event="run_completed")
        return JSONResponse(run)

    return Starlette(
        routes=[
            Route("/", page),
            Route("/crawlers/{crawler}", page),
            Route("/crawlers/{crawler}/token", token),
            Route("/api/runs", start, methods=["POST"]),
            Route("/api/runs/{run:int}/finish", finish, methods=["POST"]),
        ]
    )


if __name__ == "__main__":
    run_example(build, jwt=True)
