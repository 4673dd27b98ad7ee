"""Publishing through a gateway's ``POST /publish`` (for processes without Redis access)."""

from __future__ import annotations

import asyncio
import http.client
import time
import urllib.parse
from typing import Any

import orjson

from publisher._message import Message, PublishError
from publisher._retry import Backoff

RETRIED = frozenset({429, 502, 503, 504})
"""Statuses that say "not now": overload, pacing, a node or its store briefly unavailable."""


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds (the HTTP-date form is not used by the gateway)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


class HttpTransport:
    def __init__(
        self, url: str, token: str | None = None, timeout: float = 10.0, retry_for: float = 10.0
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.scheme = parsed.scheme
        self.host = parsed.hostname
        self.port = parsed.port
        self.path = parsed.path.rstrip("/") + "/publish"
        self.token = token
        self.timeout = timeout
        self.retry_for = retry_for

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _post(self, conn: http.client.HTTPConnection, message: Message) -> str:
        # The text the Redis transport would store, so both transports deliver the same bytes.
        payload: dict[str, Any] = {
            "topics": list(message.topics),
            "data": message.text,
            "idempotency_key": message.idempotency_key,
        }
        if message.event is not None:
            payload["event"] = message.event
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        conn.request("POST", self.path, body=orjson.dumps(payload), headers=headers)
        response = conn.getresponse()
        raw = response.read()
        try:
            reply = orjson.loads(raw)
        except orjson.JSONDecodeError:
            reply = {}
        if response.status != 200 or not isinstance(reply, dict) or "id" not in reply:
            detail = reply.get("message") if isinstance(reply, dict) else None
            code = reply.get("error") if isinstance(reply, dict) else None
            raise PublishError(
                f"gateway refused the publish ({response.status}): {detail or raw[:200]!r}",
                status=response.status,
                error=code if isinstance(code, str) else None,
                retry_after=_seconds(response.getheader("retry-after")),
            )
        return str(reply["id"])

    def send(self, messages: list[Message]) -> list[str]:
        """Each message is posted until the gateway answers; a connection error, a 429 and a
        502, 503 or 504 are retried (the idempotency key makes that safe) for ``retry_for``
        seconds, no sooner than ``Retry-After`` says. Any other refusal (a 4xx, a 500 or a
        507) cannot succeed by sending the same request again and is raised at once."""
        ids: list[str] = []
        conn = self._connect()
        try:
            for message in messages:
                backoff = Backoff(self.retry_for)
                while True:
                    try:
                        ids.append(self._post(conn, message))
                        break
                    except (OSError, http.client.HTTPException, PublishError) as exc:
                        retryable = not isinstance(exc, PublishError) or exc.status in RETRIED
                        delay = backoff.next_delay() if retryable else None
                        if delay is None:
                            raise
                        if isinstance(exc, PublishError) and exc.retry_after:
                            if exc.retry_after > backoff.left():
                                raise
                            delay = max(delay, exc.retry_after)
                        conn.close()
                        time.sleep(delay)
                        conn = self._connect()
            return ids
        finally:
            conn.close()

    def close(self) -> None:
        pass


class AsyncHttpTransport:
    """The blocking transport run in a worker thread: publishing over HTTP is not a hot path."""

    def __init__(
        self, url: str, token: str | None = None, timeout: float = 10.0, retry_for: float = 10.0
    ) -> None:
        self.sync = HttpTransport(url, token, timeout, retry_for)

    async def send(self, messages: list[Message]) -> list[str]:
        return await asyncio.to_thread(self.sync.send, messages)

    async def close(self) -> None:
        pass
