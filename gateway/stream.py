"""``GET /events``: one SSE connection's lifecycle, as a raw ASGI app.

Order matters for a gapless stream: subscribe (holding live frames), then read the replay,
then send it, then release the held frames through the per-client id rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from dataclasses import dataclass
from urllib.parse import parse_qsl

import orjson
from starlette.types import Message, Receive, Scope, Send

from gateway.auth import (
    Authorizer,
    Identity,
    request_token,
)
from gateway.config import Settings
from gateway.cors import CorsPolicy, Headers
from gateway.engines.base import (
    Engine,
    EngineUnavailable,
    HistoryBroken,
    InvalidStore,
    Position,
    PositionKind,
    Replay,
)
from gateway.errors import HTTPError, bad_request
from gateway.hub import SHED_REASONS, Hub, Subscriber, Transport
from gateway.limits import Admission, check_sizes
from gateway.metrics import Metrics
from publisher.protocol import (
    MAX_TOPIC_LENGTH,
    check_field,
    comment,
    event,
    is_valid_topic,
    key_to_id,
    retry,
)

log = logging.getLogger("gateway.stream")

MAX_QUERY_FIELDS = 256
KEEPALIVE_PROBES = 3
MAX_SINCE_MS = 1 << 53
ENGINE_UNAVAILABLE = "the event store cannot be reached; retry later"
INVALID_STORE = "the event store holds data this node cannot read; retry later"


@dataclass(frozen=True, slots=True)
class StreamRequest:
    topics: tuple[str, ...]
    position: Position | None
    types: frozenset[bytes] | None
    token: str | None = None
    """The ``token`` query parameter, for EventSource, which cannot set headers."""


def parse_stream_request(scope: Scope, max_topics: int = 64) -> StreamRequest:
    try:
        fields = parse_qsl(
            scope["query_string"].decode("latin-1"),
            keep_blank_values=True,
            max_num_fields=MAX_QUERY_FIELDS,
        )
    except ValueError:
        raise bad_request(
            "too_many_parameters", f"at most {MAX_QUERY_FIELDS} query fields"
        ) from None
    query: dict[str, list[str]] = {}
    for name, value in fields:
        query.setdefault(name, []).append(value)

    topics = tuple(dict.fromkeys(query.get("topic", [])))
    if not topics:
        raise bad_request("missing_topic", "give at least one ?topic=")
    if len(topics) > max_topics:
        raise bad_request("too_many_topics", f"at most {max_topics} topics per stream")
    for topic in topics:
        if not is_valid_topic(topic):
            raise bad_request(
                "invalid_topic",
                f"topic {topic[:300]!r} must be 1-{MAX_TOPIC_LENGTH} characters "
                "from A-Z a-z 0-9 _ . : / @ -",
                topic=topic[:300],
            )

    header_id = None
    for name, value in scope["headers"]:
        if name == b"last-event-id":
            header_id = value.decode("latin-1")
    # ``lastEventId`` is how JavaScript spells it (``event.lastEventId``): both are accepted.
    # Other unknown parameters are ignored, so cache-busters such as ``_=123`` keep working.
    query_id = (query.get("lastEventID") or query.get("lastEventId") or [""])[-1]
    last_id = header_id or query_id
    position = None
    if last_id:
        try:
            position = Position.after(last_id.strip())
        except ValueError:
            raise bad_request(
                "invalid_last_event_id",
                f"Last-Event-ID {last_id[:100]!r} is not an event id (<ms>-<seq>)",
            ) from None
    elif since := (query.get("since") or [""])[-1]:
        # the length first: int() refuses more than 4300 digits with a ValueError
        if not (since.isascii() and since.isdigit() and len(since) <= 16) or (
            int(since) > MAX_SINCE_MS
        ):
            raise bad_request(
                "invalid_since", f"since {since[:100]!r} must be a time in epoch milliseconds"
            )
        position = Position.since(int(since))

    types = None
    if raw_types := ",".join(query.get("types", [])):
        names = [t for t in raw_types.split(",") if t]
        try:
            types = frozenset(check_field("type", t).encode() for t in names) or None
        except ValueError as exc:
            raise bad_request("invalid_types", str(exc)) from None
    token = (query.get("token") or [""])[-1]
    return StreamRequest(topics, position, types, token or None)


STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),
]
REFUSAL_HEADERS = [*STREAM_HEADERS, (b"connection", b"close")]
"""A refusal closes its connection, so the retry goes through the balancer's choice again."""
TEMPORARY = frozenset({429, 503})


def wants_event_stream(scope: Scope) -> bool:
    """Whether the client asked for ``text/event-stream`` (as ``EventSource`` always does)."""
    return any(
        name == b"accept" and b"text/event-stream" in value.lower()
        for name, value in scope["headers"]
    )


def reset_frame(replay: Replay, followed: bool) -> bytes:
    """``event: reset``; it carries the clock as its id when no replayed event follows it, so a
    client that reconnects afterwards is not told again about the same loss."""
    assert replay.reset is not None
    data = {"reason": replay.reset.reason.value, "topics": list(replay.reset.topics)}
    event_id = None if followed else key_to_id(replay.clock)
    return event(orjson.dumps(data).decode(), "reset", event_id)


class EventStream:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        hub: Hub,
        metrics: Metrics,
        authorizer: Authorizer,
        cors: CorsPolicy,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.hub = hub
        self.metrics = metrics
        self.authorizer = authorizer
        self.cors = cors
        self.admission = Admission(settings)
        self.preamble = retry(settings.retry_ms) + comment("ok")
        self.accepting = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cors_headers = self.cors.headers_for(scope)
        try:
            if scope["method"] not in ("GET", "HEAD"):
                raise HTTPError(
                    405, "method_not_allowed", "use GET", headers={"allow": "GET, HEAD"}
                )
            if not self.accepting:
                raise HTTPError(
                    503, "draining", "this node is shutting down", headers={"retry-after": "1"}
                )
            self.admission.check_node()
            client = scope.get("client")
            self.admission.check_address(client[0] if client else None)
            check_sizes(scope, self.settings)
            request = parse_stream_request(scope, self.settings.max_topics)
            identity = await self.authorizer.identify(self._token(scope, request))
            self.authorizer.check_subscribe(identity, request.topics)
            self.admission.check_subject(identity.subject)
            self.admission.check_node()  # again: verifying may have waited for the JWKS
        except HTTPError as exc:
            self.metrics.attempts.labels(exc.error).inc()
            await self._refuse(exc, scope, receive, send, cors_headers)
            return
        self.metrics.attempts.labels("accepted").inc()
        address = client[0] if client else None
        headers = STREAM_HEADERS + cors_headers if cors_headers else STREAM_HEADERS
        self.admission.opened(identity.subject, address)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                return
            await self._serve(request, identity, receive, send)
        finally:
            self.admission.closed(identity.subject, address)

    async def _refuse(
        self, exc: HTTPError, scope: Scope, receive: Receive, send: Send, cors: Headers
    ) -> None:
        """A temporary refusal (429, 503) reaches an ``EventSource`` as a finished 200 event
        stream, which it retries by itself after the ``retry:`` delay: any other answer would
        end it for good. Other clients, and permanent refusals, get the status and JSON."""
        if exc.status in TEMPORARY:
            if scope["method"] == "GET" and wants_event_stream(scope):
                rate_limited = exc.error == "rate_limited"
                wait = float(exc.headers.get("retry-after", 0)) if rate_limited else 0.0
                body = self.refusal(exc.error, exc.message, wait)
                length = (b"content-length", str(len(body)).encode())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.send_timeout):
                        await send(
                            {
                                "type": "http.response.start",
                                "status": 200,
                                "headers": [*REFUSAL_HEADERS, length, *cors],
                            }
                        )
                        await send({"type": "http.response.body", "body": body})
                return
            self.metrics.refused.labels(exc.error).inc()
        self.metrics.rejected.labels(str(exc.status)).inc()
        exc.headers.update((k.decode(), v.decode("latin-1")) for k, v in cors)
        await exc(scope, receive, send)

    def refusal(self, reason: str, message: str, wait: float = 0.0) -> bytes:
        """Count a refusal and frame it: a jittered ``retry:``, a comment and ``event: refused``
        naming the reason. It carries no ``id:``, so the client's position does not move."""
        self.metrics.refused.labels(reason).inc()
        base = max(self.settings.retry_ms, wait * 1000)
        delay = max(100, int(base * (0.5 + random.random())))
        data = {"reason": reason, "message": message, "retry_ms": delay}
        return retry(delay) + comment(f"refused: {reason}") + event(data, "refused")

    def _token(self, scope: Scope, request: StreamRequest) -> str | None:
        if not self.authorizer.enabled:
            return None
        return request_token(scope["headers"], request.token, self.settings.token_cookie)

    async def _serve(
        self, request: StreamRequest, identity: Identity, receive: Receive, send: Send
    ) -> None:
        sub = Subscriber(request.topics, request.types, self.settings.max_pending_bytes)
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.metrics.connections.inc()
        self.metrics.connections_total.inc()
        watcher = asyncio.create_task(_wait_disconnect(receive))
        work: asyncio.Task[None] | None = None
        timers = self._timers(sub, identity)
        if self.settings.tcp_keepalive:
            enable_keepalive(send, self.settings.tcp_keepalive)
        try:
            work = sub.writer = asyncio.create_task(self._run(sub, request, send))
            await asyncio.wait((watcher, work), return_when=asyncio.FIRST_COMPLETED)
            if watcher.done():
                sub.close("client_closed")
        except TimeoutError:
            sub.close("send_timeout")
        finally:
            for timer in timers:
                timer.cancel()
            for task in (watcher, work):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(watcher, *([work] if work else []), return_exceptions=True)
            if work is not None and not work.cancelled() and work.exception() is not None:
                log.error("stream failed", exc_info=work.exception())
            self.hub.detach(sub)
            reason = sub.reason or "closed"
            self.metrics.connections.dec()
            self.metrics.disconnects.labels(reason).inc()
            log.info(
                "stream closed",
                extra={
                    "subject": identity.subject,
                    "topics": len(request.topics),
                    "duration_s": round(loop.time() - started, 3),
                    "events": sub.events,
                    "reason": reason,
                },
            )
        if sub.reason in SHED_REASONS:
            await _abort(send)

    def _timers(self, sub: Subscriber, identity: Identity) -> list[asyncio.TimerHandle]:
        """Token expiry and maximum lifetime: each ends the stream with a farewell."""
        loop = asyncio.get_running_loop()
        timers = []
        seconds_left = self.authorizer.seconds_left(identity)
        if seconds_left is not None and identity.grant is not None:
            exp = identity.grant.expires
            farewell = event(orjson.dumps({"exp": exp}).decode(), "token_expired")
            timers.append(
                loop.call_later(max(0.0, seconds_left), sub.close, "token_expired", farewell)
            )
        if lifetime := self.settings.max_lifetime:
            lifetime *= 1 - 0.1 * random.random()
            timers.append(loop.call_later(lifetime, sub.close, "max_lifetime", self.retry_hint()))
        return timers

    def retry_hint(self) -> bytes:
        """A ``retry:`` line with jitter, so clients told to leave do not all return at once."""
        return retry(max(100, int(self.settings.retry_ms * (0.5 + random.random()))))

    async def _run(self, sub: Subscriber, request: StreamRequest, send: Send) -> None:
        try:
            await self.hub.attach(sub)
            # The preamble goes out once every topic is subscribed: a client (or a test) that
            # has read ``: ok`` knows that every event published from then on reaches it.
            await self._send(send, self.preamble)
            sub.last_write = asyncio.get_running_loop().time()
            replay = await self.engine.replay(request.topics, request.position)
            await self._send_replay(sub, request.position, replay, send)
        except EngineUnavailable as exc:
            message = INVALID_STORE if isinstance(exc, InvalidStore) else ENGINE_UNAVAILABLE
            await self._fail(sub, send, "engine_unavailable", message, exc)
            return
        except HistoryBroken as exc:
            message = f"the history of topic {exc.topic!r} cannot be read"
            await self._fail(sub, send, "history_unreadable", message, exc)
            return
        except TimeoutError:
            sub.close("send_timeout")
            return
        try:
            await self._write_live(sub, send)
        except TimeoutError:
            sub.close("send_timeout")

    async def _fail(
        self, sub: Subscriber, send: Send, reason: str, message: str, exc: Exception
    ) -> None:
        log.warning("stream refused: %s", exc)
        sub.close(reason)
        with contextlib.suppress(TimeoutError):
            await self._send(send, self.refusal(reason, message))
            await self._finish(send)

    async def _send_replay(
        self, sub: Subscriber, position: Position | None, replay: Replay, send: Send
    ) -> None:
        """Send the replay page by page, each at most ``max_pending_bytes``, waiting for the
        client to take each before the next is read: memory per stream stays bounded whatever
        the history. Live frames are held meanwhile; if more arrive than that budget, they are
        dropped and the replay reads on to the clock of now instead, until it ends with what
        was held meanwhile intact (then released through the per-client id rule)."""
        # A client that sent an id has everything up to it, unless a reset says otherwise
        # (``since`` only bounds the replay: live events flow whatever their time).
        after = replay.clock if position is None else 0
        if position is not None and position.kind is PositionKind.LAST_EVENT_ID:
            after = position.after_key
        page = await replay.next_page()
        chunks = []
        size = 0
        if replay.reset is not None:
            chunks.append(reset_frame(replay, bool(page)))
            self.metrics.resets.labels(replay.reset.reason.value).inc()
            after = 0 if page else replay.clock
        types = sub.types
        budget = self.settings.max_pending_bytes
        skipped = False
        while not sub.closed:
            sent = sent_bytes = 0
            for frame in page:
                after = frame.key
                if types is not None and frame.event not in types:
                    skipped = True
                    continue
                skipped = False
                chunks.append(frame.data)
                size += len(frame.data)
                sent_bytes += len(frame.data)
                sent += 1
                if size >= budget:
                    await self._send(send, b"".join(chunks))
                    chunks, size = [], 0
            if chunks:
                await self._send(send, b"".join(chunks))
                chunks, size = [], 0
            if sent:
                sub.events += sent
                self.metrics.sent(sent, sent_bytes, replayed=sent)
            if page:
                page = await replay.next_page()
                continue
            if skipped and not replay.gaps:
                sub.last_key = after
                await self._send(send, sub.position_line())
                skipped = False
            if sub.held is None or not sub.held.dropped:
                break  # nothing is awaited from here to go_live: the held frames are whole
            sub.held.again()
            await replay.extend()
            page = await replay.next_page()
        if replay.gaps and not sub.closed:
            # Retention removed events this replay had not read yet: end the stream at the
            # last event before the gap (nothing held is sent), so the client's reconnect from
            # there is told ``reset``.
            log.info("replay ended at a gap in the history of %s", ", ".join(replay.gaps))
            sub.close("history_lost", self.retry_hint())
            return
        events, size = sub.go_live(after)
        self.metrics.sent(events, size)

    async def _write_live(self, sub: Subscriber, send: Send) -> None:
        loop = asyncio.get_running_loop()
        direct = direct_transport(send)
        while True:
            await sub.wake.wait()
            sub.wake.clear()
            if sub.closed:
                break
            chunk = sub.take()
            if chunk:
                await self._send(send, chunk)
                sub.last_write = loop.time()
            if direct is not None and not sub.chunks and not sub.closed:
                sub.go_direct(direct, self.hub.dirty)
                direct = None
        if sub.reason not in SHED_REASONS:
            if chunk := sub.take():
                await self._send(send, chunk)
            await self._finish(send)

    async def _send(self, send: Send, chunk: bytes) -> None:
        async with asyncio.timeout(self.settings.send_timeout):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _finish(self, send: Send) -> None:
        try:
            async with asyncio.timeout(self.settings.send_timeout):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            pass


def direct_transport(send: Send) -> Transport | None:
    """The transport under uvicorn's httptools protocol when it frames this response in
    chunks: the hub may then write finished chunks to it itself. Anything else (h11, an
    HTTP/1.0 client, a wrapped ``send``) goes through ASGI ``send``."""
    cycle = getattr(send, "__self__", None)
    if type(cycle).__module__ != "uvicorn.protocols.http.httptools_impl":
        return None
    if getattr(cycle, "chunked_encoding", None) is not True:
        return None
    transport: Transport | None = getattr(cycle, "transport", None)
    return transport


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return


def enable_keepalive(send: Send, idle: float) -> None:
    """Probe an idle client after ``idle`` seconds and drop it when it stays silent, so a
    vanished peer (no FIN, no RST) frees its connection in bounded time."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    idle_s = max(1, int(idle))
    interval = max(1, idle_s // 3)
    options = [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", None), idle_s),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", None), interval),
        (socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", None), KEEPALIVE_PROBES),
        (
            socket.IPPROTO_TCP,
            getattr(socket, "TCP_USER_TIMEOUT", None),
            (idle_s + interval * KEEPALIVE_PROBES) * 1000,
        ),
    ]
    for level, name, value in options:
        if name is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, name, value)


async def _abort(send: Send) -> None:
    """Drop the connection without flushing: a stalled peer would hold the buffer forever.

    ASGI has no abort; uvicorn's ``send`` is a bound method of the cycle that owns the
    transport. Elsewhere, returning without completing the response closes the connection."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        transport.abort()
        await asyncio.sleep(0)
