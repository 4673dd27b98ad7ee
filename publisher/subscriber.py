"""Read a gateway's stream from Python: a sync iterator and an asyncio one, on httpx.

>>> for event in subscribe("http://127.0.0.1:8000", ["jobs:42"]):
...     print(event.id, event.type, event.value)

It behaves like the browser's ``/client.js``:

- it reconnects with ``Last-Event-ID`` after a lost connection, a node's drain or a temporary
  refusal (``event: refused``, retried after its ``retry_ms``), and never yields an id twice;
- between failed attempts it waits a full-jitter exponential backoff (``initial`` doubling up
  to ``maximum``), reset by a good open; a ``retry:`` the server sends after the stream's last
  event (a drain's farewell) is honoured instead;
- ``token`` is a string or a function returning one, called before each connect, so an
  expired token (``event: token_expired``, or a 401 on reconnect) is replaced;
- a lost history is an event of type ``"reset"`` (``event.reset`` holds its reason and
  topics): refetch your state, then keep reading;
- it stops with :class:`SubscriptionError` on a 400, a 403, any other 4xx but 408 and 429, and
  on a 401 when ``token`` is not a function (or when a fresh token is refused three times in a
  row).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import random
import socket
import threading
import urllib.parse
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterator,
    Sequence,
)
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import httpx

from publisher.sse import EventParser, ServerEvent

__all__ = [
    "AsyncSubscription",
    "Event",
    "ResetInfo",
    "Subscription",
    "SubscriptionError",
    "asubscribe",
    "subscribe",
]

log = logging.getLogger("publisher.subscriber")

Token = str | Callable[[], str]
AsyncToken = str | Callable[[], str] | Callable[[], Awaitable[str]]

TERMINAL_401_IN_A_ROW = 3
"""Refusals of freshly fetched tokens after which the token function is taken to be broken."""
MAX_ERROR_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class ResetInfo:
    """What a ``reset`` event says: the reason and the topics whose history was lost."""

    reason: str
    topics: list[str]


@dataclass(frozen=True, slots=True)
class Event:
    """One event: ``id`` (``<ms>-<seq>``, or "" when the frame had none), ``type`` (the SSE
    ``event:`` name, ``"message"`` by default) and ``data``, the raw string."""

    id: str
    type: str
    data: str

    @property
    def value(self) -> Any:
        """The data as JSON when it parses, else the string (as ``/client.js`` hands it)."""
        try:
            return json.loads(self.data)
        except ValueError:
            return self.data

    @property
    def reset(self) -> ResetInfo | None:
        """For a ``reset`` event, its reason and topics; ``None`` for any other event."""
        if self.type != "reset":
            return None
        value = self.value
        if not isinstance(value, dict):
            return ResetInfo("unknown", [])
        topics = value.get("topics")
        return ResetInfo(
            str(value.get("reason", "unknown")),
            [str(t) for t in topics] if isinstance(topics, list) else [],
        )


class SubscriptionError(Exception):
    """The gateway refused the stream for good (bad request, forbidden, unauthenticated)."""

    def __init__(self, message: str, *, status: int, error: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error


def _position(event_id: str) -> tuple[int, int] | None:
    """``<ms>-<seq>`` as a pair that compares in stream order; None for any other id."""
    ms, dash, seq = event_id.partition("-")
    if not dash or not ms.isdigit() or not seq.isdigit():
        return None
    return int(ms), int(seq)


def _events_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/events"):
        path += "/events"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


class _Core:
    """The I/O-free part shared by both iterators: requests, the handling of each response and
    each parsed event, and the delays between attempts."""

    def __init__(
        self,
        url: str,
        topics: Sequence[str],
        *,
        last_event_id: str | None,
        since: int | None,
        types: Sequence[str] | None,
        token_is_function: bool,
        initial: float,
        maximum: float,
    ) -> None:
        if not topics:
            raise ValueError("at least one topic is required")
        self.url = _events_url(url)
        self.topics = list(topics)
        self.since = since
        self.types = list(types or [])
        self.token_is_function = token_is_function
        self.initial = initial
        self.maximum = maximum
        self.parser = EventParser(last_id=last_event_id or "")
        self.delivered = _position(last_event_id or "")
        self.status = "connecting"
        self.failures = 0
        self.refused_tokens = 0
        self.next_delay: float | None = None
        self.hint: float | None = None
        """A ``retry:`` received after the stream's last event: the server's own delay."""

    @property
    def last_event_id(self) -> str:
        return self.parser.last_id

    def params(self) -> httpx.QueryParams:
        query = [("topic", topic) for topic in self.topics]
        if self.types:
            query.append(("types", ",".join(self.types)))
        if self.since is not None and not self.parser.last_id:
            query.append(("since", str(self.since)))
        return httpx.QueryParams(tuple(query))

    def headers(self, token: str | None) -> dict[str, str]:
        headers = {"accept": "text/event-stream", "cache-control": "no-store"}
        if self.parser.last_id:
            headers["last-event-id"] = self.parser.last_id
        if token:
            headers["authorization"] = f"Bearer {token}"
        return headers

    def backoff(self) -> float:
        """Full jitter: uniform in [0, min(maximum, initial * 2**failures)]."""
        ceiling = min(self.maximum, self.initial * 2 ** min(self.failures, 30))
        self.failures += 1
        return random.uniform(0, ceiling)

    def refused(self, status: int, body: bytes, retry_after: str | None) -> float:
        """A response other than a stream: the delay before retrying, or raises the
        :class:`SubscriptionError` that stops the subscription."""
        error: str | None = None
        message = body[:300].decode("utf-8", "replace")
        try:
            reply = json.loads(body)
        except ValueError:
            reply = None
        if isinstance(reply, dict):
            error = reply.get("error") if isinstance(reply.get("error"), str) else None
            message = str(reply.get("message") or message)
        text = f"gateway refused the stream ({status} {error or ''}): {message}"
        terminal = SubscriptionError(text, status=status, error=error)
        if status == 401:
            self.refused_tokens += 1
            if not self.token_is_function or self.refused_tokens >= TERMINAL_401_IN_A_ROW:
                raise terminal
            log.info("%s; asking for a new token", text)
            return 0 if self.refused_tokens == 1 else self.backoff()
        if 400 <= status < 500 and status not in (408, 429):
            raise terminal
        log.warning("%s; retrying", text)
        delay = self.backoff()
        if retry_after and retry_after.strip().isdigit():
            delay = max(delay, float(retry_after.strip()))
        return delay

    def opened(self) -> None:
        """A 200 event stream: a stream, or a temporary refusal (``event: refused``)."""
        self.parser.reset()
        self.refused_tokens = 0
        self.next_delay = None
        self.hint = None

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse a chunk; return the events for the caller, act on the control events."""
        self.parser.retry = None
        events = self.parser.feed(chunk)
        accepted = "ok" in self.parser.comments  # the preamble of a stream (not a refusal)
        self.parser.comments.clear()
        out: list[Event] = []
        for event in events:
            self.hint = None
            if (item := self._event(event)) is not None:
                out.append(item)
        if accepted or out:
            self.status = "open"
            self.failures = 0  # a good open: the backoff starts over
        if self.parser.retry is not None:
            self.hint = self.parser.retry / 1000
        return out

    def _event(self, event: ServerEvent) -> Event | None:
        if event.event == "refused":
            try:
                info = json.loads(event.data)
                retry_ms = float(info["retry_ms"])
            except (ValueError, KeyError, TypeError):
                info, retry_ms = {}, self.initial * 1000
            log.info("stream refused for now (%s); retrying", info.get("reason", "unknown"))
            self.next_delay = max(0.0, retry_ms / 1000)
            return None
        if event.event == "token_expired":
            self.next_delay = 0.0 if self.token_is_function else self.backoff()
            return None
        item = Event(event.id if event.has_id else "", event.event, event.data)
        if event.event == "reset":
            # Positions start again from what the server says is retained.
            self.delivered = _position(event.id) if event.has_id else None
            return item
        if event.has_id and (position := _position(event.id)) is not None:
            if self.delivered is not None and position <= self.delivered:
                return None
            self.delivered = position
        return item

    def ended(self) -> float:
        """The stream of an open connection ended (or broke): the delay before the next."""
        self.status = "reconnecting"
        self.parser.reset()
        if self.next_delay is not None:
            return self.next_delay
        if self.hint is not None:
            return self.hint
        return self.backoff()

    def closed_by_server(self) -> float:
        delay = self.ended()
        log.info("stream ended by the server; resuming after %s in %.1fs", self._after(), delay)
        return delay

    def lost(self, exc: Exception) -> float:
        """An open stream broke off (a cut, a node that died): resume after a delay."""
        delay = self.ended()
        log.info("stream lost (%s); resuming after %s in %.1fs", exc, self._after(), delay)
        return delay

    def broke(self, exc: Exception) -> float:
        """A transport error: an open stream was lost, or a connect failed."""
        return self.lost(exc) if self.status == "open" else self.failed(exc)

    def _after(self) -> str:
        return self.parser.last_id or "the start"

    def failed(self, exc: Exception) -> float:
        self.status = "reconnecting"
        self.parser.reset()
        log.info("stream connection failed (%s); retrying", exc)
        return self.backoff()


def _timeout(read_timeout: float) -> httpx.Timeout:
    return httpx.Timeout(10.0, read=read_timeout)


class Subscription:
    """Iterate to receive events; ``close()`` (or leaving a ``with`` block) stops for good."""

    def __init__(
        self,
        url: str,
        topics: Sequence[str],
        *,
        token: Token | None = None,
        last_event_id: str | None = None,
        since: int | None = None,
        types: Sequence[str] | None = None,
        initial: float = 1.0,
        maximum: float = 30.0,
        read_timeout: float = 60.0,
        client: httpx.Client | None = None,
    ) -> None:
        self._core = _Core(
            url, topics, last_event_id=last_event_id, since=since, types=types,
            token_is_function=callable(token), initial=initial, maximum=maximum,
        )  # fmt: skip
        self._token = token
        self._own_client = client is None
        self._client = client or httpx.Client(timeout=_timeout(read_timeout))
        self._closed = threading.Event()
        self._response: httpx.Response | None = None
        self._events = self._run()

    @property
    def last_event_id(self) -> str:
        """The id to resume from (``Last-Event-ID`` of the next connect)."""
        return self._core.last_event_id

    @property
    def status(self) -> str:
        """``"connecting"``, ``"open"``, ``"reconnecting"`` or ``"closed"``."""
        return self._core.status

    def _fetch_token(self) -> str | None:
        token = self._token
        return token() if callable(token) else token

    def _run(self) -> Generator[Event, None, None]:
        core = self._core
        while not self._closed.is_set():
            delay: float
            try:
                token = self._fetch_token()
                with self._client.stream(
                    "GET", core.url, params=core.params(), headers=core.headers(token)
                ) as response:
                    self._response = response
                    kind = response.headers.get("content-type", "")
                    if response.status_code != 200 or not kind.startswith("text/event-stream"):
                        body = _read_some(response.iter_bytes())
                        delay = core.refused(
                            response.status_code, body, response.headers.get("retry-after")
                        )
                    else:
                        core.opened()
                        for chunk in response.iter_bytes():
                            yield from core.feed(chunk)
                        delay = core.closed_by_server()
            except (httpx.TransportError, httpx.StreamError) as exc:
                if self._closed.is_set():
                    break
                delay = core.broke(exc)
            finally:
                self._response = None
            core.status = "reconnecting"
            if self._closed.wait(delay):
                break
        core.status = "closed"

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Event:
        try:
            return next(self._events)
        except BaseException:
            self._core.status = "closed"
            self._close_client()
            raise

    def close(self) -> None:
        """Stop for good; safe to call from another thread (it ends a blocked read)."""
        self._closed.set()
        try:
            self._events.close()
        except ValueError:  # being iterated in another thread: wake its read, it stops then
            if (response := self._response) is not None:
                _shut_down(response)
            return
        self._close_client()
        self._core.status = "closed"

    def _close_client(self) -> None:
        if self._own_client:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _shut_down(response: httpx.Response) -> None:
    """Shut the response's socket down, which ends a read blocked on it in another thread
    (closing the response there would not: a blocked ``recv`` does not notice a ``close``)."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _read_some(chunks: Iterator[bytes]) -> bytes:
    body = b""
    for chunk in chunks:
        body += chunk
        if len(body) >= MAX_ERROR_BODY:
            break
    return body


async def _aread_some(chunks: AsyncIterator[bytes]) -> bytes:
    body = b""
    async for chunk in chunks:
        body += chunk
        if len(body) >= MAX_ERROR_BODY:
            break
    return body


class AsyncSubscription:
    """The asyncio twin of :class:`Subscription`: ``async for event in sub``."""

    def __init__(
        self,
        url: str,
        topics: Sequence[str],
        *,
        token: AsyncToken | None = None,
        last_event_id: str | None = None,
        since: int | None = None,
        types: Sequence[str] | None = None,
        initial: float = 1.0,
        maximum: float = 30.0,
        read_timeout: float = 60.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._core = _Core(
            url, topics, last_event_id=last_event_id, since=since, types=types,
            token_is_function=callable(token), initial=initial, maximum=maximum,
        )  # fmt: skip
        self._token = token
        self._own_client = client is None
        self._client = client or httpx.AsyncClient(timeout=_timeout(read_timeout))
        self._closed = asyncio.Event()
        self._events = self._run()

    @property
    def last_event_id(self) -> str:
        return self._core.last_event_id

    @property
    def status(self) -> str:
        return self._core.status

    async def _fetch_token(self) -> str | None:
        token = self._token
        if not callable(token):
            return token
        value = token()
        if inspect.isawaitable(value):
            value = await value
        return str(value)

    async def _run(self) -> AsyncGenerator[Event, None]:
        core = self._core
        while not self._closed.is_set():
            delay: float
            try:
                token = await self._fetch_token()
                async with self._client.stream(
                    "GET", core.url, params=core.params(), headers=core.headers(token)
                ) as response:
                    kind = response.headers.get("content-type", "")
                    if response.status_code != 200 or not kind.startswith("text/event-stream"):
                        body = await _aread_some(response.aiter_bytes())
                        delay = core.refused(
                            response.status_code, body, response.headers.get("retry-after")
                        )
                    else:
                        core.opened()
                        async for chunk in response.aiter_bytes():
                            for event in core.feed(chunk):
                                yield event
                        delay = core.closed_by_server()
            except (httpx.TransportError, httpx.StreamError) as exc:
                if self._closed.is_set():
                    break
                delay = core.broke(exc)
            core.status = "reconnecting"
            try:
                await asyncio.wait_for(self._closed.wait(), delay)
                break
            except TimeoutError:
                pass
        core.status = "closed"

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        try:
            return await anext(self._events)
        except BaseException:
            self._core.status = "closed"
            await self._close_client()
            raise

    async def aclose(self) -> None:
        """Stop for good."""
        self._closed.set()
        try:
            await self._events.aclose()
        except RuntimeError:  # being iterated by another task: it stops at its next step
            return
        await self._close_client()
        self._core.status = "closed"

    async def _close_client(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def subscribe(url: str, topics: str | Sequence[str], **options: Any) -> Subscription:
    """A :class:`Subscription` to ``topics`` on the node (or balancer) at ``url``."""
    return Subscription(url, [topics] if isinstance(topics, str) else topics, **options)


def asubscribe(url: str, topics: str | Sequence[str], **options: Any) -> AsyncSubscription:
    """An :class:`AsyncSubscription` to ``topics`` on the node (or balancer) at ``url``."""
    return AsyncSubscription(url, [topics] if isinstance(topics, str) else topics, **options)
