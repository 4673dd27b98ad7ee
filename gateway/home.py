"""``GET /``: where to go from here, instead of a 404.

A browser on a ``--demo`` node is sent to ``/demo``; everyone else gets a JSON index of the
endpoints (a browser shows it as text)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from gateway.config import Settings
from gateway.demo import TOPICS


class Home:
    def __init__(self, settings: Settings) -> None:
        self.demo = settings.demo
        endpoints = {
            "events": "GET /events?topic=NAME: a Server-Sent Events stream of one or more topics "
            "(README: Protocol, GET /events)",
            "publish": 'POST /publish {"topic": NAME, "data": ...} (README: POST /publish)',
            "healthz": "GET /healthz",
            "readyz": "GET /readyz",
            "metrics": "GET /metrics",
            "client": "GET /client.js: the browser client, an ES module (types: /client.d.ts)",
        }
        if self.demo:
            endpoints["demo"] = f"GET /demo: a live page of the topics {', '.join(TOPICS)}"
        else:
            endpoints["demo"] = "off: start the node with --demo to serve a live page at /demo"
        self.index = {"service": "sse-gateway", "endpoints": endpoints}

    async def serve(self, request: Request) -> Response:
        if self.demo and "text/html" in request.headers.get("accept", ""):
            return RedirectResponse("/demo", status_code=302)
        return JSONResponse(self.index)
