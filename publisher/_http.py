"""Publishing through a gateway's ``POST /publish`` (for processes without Redis access)."""

from __future__ import annotations

import asyncio
import http.client
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import orjson

from publisher._retry import Backoff
from publisher.protocol import Message, PublishError
from publisher.publish_plan import DEFAULT_RETRY_FOR

_T = TypeVar("_T")

RETRIED = frozenset({429, 502, 503, 504})
"""Statuses that say "not now": overload, pacing, a node or its store briefly unavailable."""


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds (the HTTP-date form is not used by the gateway)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


DEFAULT_TIMEOUT = 10.0
"""Seconds one request to the gateway may take."""
MAX_BATCH = 1000
"""Events per ``POST /publish`` at most (the gateway's limit)."""
BATCH_BYTES = 48 * 1024
"""A batch is cut before its body passes this size (the gateway accepts 64 KiB by default); a
batch the gateway still finds too large is split in two and sent again."""


def _item(message: Message) -> dict[str, Any]:
    # The text the Redis transport would store, so both transports deliver the same bytes.
    item: dict[str, Any] = {
        "topics": list(message.topics),
        "data": message.text,
        "idempotency_key": message.idempotency_key,
    }
    if message.event is not None:
        item["event"] = message.event
    return item


def _batches(messages: list[Message]) -> list[list[Message]]:
    batches: list[list[Message]] = []
    size = 0
    for message in messages:
        cost = len(orjson.dumps(_item(message))) + 1
        if not batches or len(batches[-1]) >= MAX_BATCH or size + cost > BATCH_BYTES:
            batches.append([])
            size = 2
        batches[-1].append(message)
        size += cost
    return batches


def _refusal(status: int, reply: Any, raw: bytes, retry_after: str | None) -> PublishError:
    detail = reply.get("message") if isinstance(reply, dict) else None
    code = reply.get("error") if isinstance(reply, dict) else None
    return PublishError(
        f"gateway refused the request ({status}): {detail or raw[:200]!r}",
        status=status,
        error=code if isinstance(code, str) else None,
        retry_after=_seconds(retry_after),
    )


def _too_large(exc: PublishError) -> bool:
    """The batch, not its events, was refused: smaller batches may pass."""
    return exc.status == 413 or exc.error in ("batch_too_large", "invalid_body")


class HttpTransport:
    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry_for: float = DEFAULT_RETRY_FOR,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.scheme = parsed.scheme
        self.host = parsed.hostname
        self.port = parsed.port
        self.base = parsed.path.rstrip("/")
        self.path = self.base + "/publish"
        self.token = token
        self.timeout = timeout
        self.retry_for = retry_for

    def _connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def _request(
        self, conn: http.client.HTTPConnection, method: str, path: str, body: bytes | None
    ) -> Any:
        """The JSON reply of a 200; any other answer is a ``PublishError``."""
        headers = {"content-type": "application/json"} if body is not None else {}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        try:
            reply = orjson.loads(raw)
        except orjson.JSONDecodeError:
            reply = None
        if response.status != 200 or not isinstance(reply, dict):
            raise _refusal(response.status, reply, raw, response.getheader("retry-after"))
        return reply

    def _retrying(self, call: Callable[[http.client.HTTPConnection], _T]) -> _T:
        """``call`` until the gateway answers; a connection error, a 429 and a 502, 503 or
        504 are retried (idempotency keys make that safe) for ``retry_for`` seconds, no
        sooner than ``Retry-After`` says. Any other refusal (a 4xx, a 500 or a 507) cannot
        succeed by sending the same request again and is raised at once."""
        backoff = Backoff(self.retry_for)
        conn = self._connect()
        try:
            while True:
                try:
                    return call(conn)
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
        finally:
            conn.close()

    def _post_one(self, conn: http.client.HTTPConnection, message: Message) -> str:
        reply = self._request(conn, "POST", self.path, orjson.dumps(_item(message)))
        if "id" not in reply:
            raise PublishError(f"gateway answered without an id: {reply!r:.200}", status=200)
        return str(reply["id"])

    def _post_batch(self, conn: http.client.HTTPConnection, batch: list[Message]) -> list[str]:
        reply = self._request(conn, "POST", self.path, orjson.dumps([_item(m) for m in batch]))
        results = reply.get("results")
        if not isinstance(results, list) or len(results) != len(batch):
            raise PublishError(f"gateway answered without ids: {reply!r:.200}", status=200)
        return [str(result["id"]) for result in results]

    def _send_batch(self, batch: list[Message]) -> list[str]:
        if len(batch) == 1:
            return [self._retrying(lambda conn: self._post_one(conn, batch[0]))]
        try:
            return self._retrying(lambda conn: self._post_batch(conn, batch))
        except PublishError as exc:
            if not _too_large(exc):
                raise
        half = len(batch) // 2
        return self._send_batch(batch[:half]) + self._send_batch(batch[half:])

    def send(self, messages: list[Message]) -> list[str]:
        """One ``POST /publish`` per batch of up to :data:`MAX_BATCH` events (a JSON list);
        a single event is posted as a JSON object. A batch the gateway refuses as too large
        (413, ``batch_too_large``; or a gateway without batches) is split and sent again."""
        ids: list[str] = []
        for batch in _batches(messages):
            ids.extend(self._send_batch(batch))
        return ids

    def position(self, topics: tuple[str, ...] = ()) -> str:
        """``GET /position``; a token-mode gateway needs ``topics`` the token may read."""
        query = urllib.parse.urlencode([("topic", topic) for topic in topics])
        path = self.base + "/position" + (f"?{query}" if query else "")

        def read(conn: http.client.HTTPConnection) -> str:
            reply = self._request(conn, "GET", path, None)
            if not isinstance(reply.get("id"), str):
                raise PublishError(f"gateway answered without an id: {reply!r:.200}", status=200)
            return str(reply["id"])

        return self._retrying(read)

    def close(self) -> None:
        pass


class AsyncHttpTransport:
    """The blocking transport run in a worker thread: publishing over HTTP is not a hot path."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retry_for: float = DEFAULT_RETRY_FOR,
    ) -> None:
        self.sync = HttpTransport(url, token, timeout, retry_for)

    async def send(self, messages: list[Message]) -> list[str]:
        return await asyncio.to_thread(self.sync.send, messages)

    async def position(self, topics: tuple[str, ...] = ()) -> str:
        return await asyncio.to_thread(self.sync.position, topics)

    async def close(self) -> None:
        pass
