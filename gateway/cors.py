"""CORS for browsers on other origins: an allowlist, credentials for named origins only.

The stream route adds the headers itself (see :class:`gateway.app.StreamRouter`); the other
routes get them from :class:`CorsMiddleware`. A wildcard is never combined with credentials.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import HTTPError

Headers = list[tuple[bytes, bytes]]

ALLOW_METHODS = b"GET, HEAD, POST, OPTIONS"
ALLOW_HEADERS = b"authorization, content-type, last-event-id, cache-control, x-requested-with"
MAX_AGE = b"600"


def request_origin(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"origin":
            return bytes(value)
    return None


class CorsPolicy:
    def __init__(self, origins: Sequence[str]) -> None:
        self.any_origin = "*" in origins
        self.origins = frozenset(o.encode("latin-1") for o in origins if o != "*")
        self.enabled = bool(origins)

    def allows(self, origin: bytes) -> bool:
        """Pages of this origin may use the gateway (``--cors-origin``, or ``*``)."""
        return self.any_origin or origin in self.origins

    def headers_for(self, scope: Scope) -> Headers:
        """The CORS headers a response to this request carries (none for other origins)."""
        if not self.enabled:
            return []
        origin = request_origin(scope)
        if origin is None:
            return []
        if self.any_origin:
            return [(b"access-control-allow-origin", b"*")]
        if origin not in self.origins:
            return []
        return [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-credentials", b"true"),
            (b"vary", b"Origin"),
        ]

    def is_preflight(self, scope: Scope) -> bool:
        return scope["method"] == "OPTIONS" and any(
            name == b"access-control-request-method" for name, _ in scope["headers"]
        )

    async def preflight(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = self.headers_for(scope)
        if not headers:
            await HTTPError(
                403, "origin_not_allowed", "this origin may not use the gateway from a browser"
            )(scope, receive, send)
            return
        headers += [
            (b"access-control-allow-methods", ALLOW_METHODS),
            (b"access-control-allow-headers", ALLOW_HEADERS),
            (b"access-control-max-age", MAX_AGE),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b""})


class CorsMiddleware:
    """Adds the CORS headers to the responses of the non-stream routes."""

    def __init__(self, app: ASGIApp, policy: CorsPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = self.policy.headers_for(scope)
        if not headers:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                for name, value in headers:
                    response_headers.append(name.decode("latin-1"), value.decode("latin-1"))
            await send(message)

        await self.app(scope, receive, send_with_cors)
