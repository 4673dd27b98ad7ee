"""JSON error responses: every refusal names its problem, never a traceback."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send


class HTTPError(Exception):
    def __init__(
        self, status: int, error: str, message: str, headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.headers = headers or {}
        self.extra = extra

    def response(self) -> JSONResponse:
        body = {"error": self.error, "message": self.message, **self.extra}
        return JSONResponse(body, status_code=self.status, headers=self.headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.response()(scope, receive, send)


def bad_request(error: str, message: str, **extra: Any) -> HTTPError:
    return HTTPError(400, error, message, **extra)
