"""The browser client, served by every node: ``/client.js`` and its types ``/client.d.ts``.

Pages import it from the node (or the balancer) they stream from, so its version always
matches the gateway's. Cached for a few minutes, then revalidated by ETag (a 304 is cheap)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

STATIC = Path(__file__).parent / "static"
CACHE_CONTROL = "public, max-age=300"


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str
    etag: str

    @classmethod
    def load(cls, name: str, content_type: str) -> Asset:
        body = (STATIC / name).read_bytes()
        return cls(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')

    async def serve(self, request: Request) -> Response:
        headers = {
            "etag": self.etag,
            "cache-control": CACHE_CONTROL,
            "x-content-type-options": "nosniff",
        }
        tags = _etags(request.headers.get("if-none-match", ""))
        if self.etag in tags or "*" in tags:
            return Response(status_code=304, headers=headers)
        return Response(self.body, media_type=self.content_type, headers=headers)


def _etags(header: str) -> set[str]:
    """The tags of an ``If-None-Match`` header (weak ones compare as strong, as RFC 9110's
    weak comparison does for GET); ``*`` matches any."""
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}


def asset_routes() -> list[Route]:
    """``GET``/``HEAD`` routes for the client and its types, read once at start."""
    script = Asset.load("client.js", "application/javascript; charset=utf-8")
    types = Asset.load("client.d.ts", "application/typescript; charset=utf-8")
    return [
        Route("/client.js", script.serve, methods=["GET"]),
        Route("/client.d.ts", types.serve, methods=["GET"]),
    ]
