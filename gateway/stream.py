"""``GET /events``: the ASGI driver of one SSE connection's session (``gateway.session``).

Order matters for a gapless stream: subscribe (holding live frames), then read the replay,
then send it, then release the held frames through the per-client id rule. The session
decides; this module awaits, and ``gateway.sinks`` writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
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
    Frame,
    HistoryBroken,
    InvalidStore,
    Position,
    PositionKind,
    Replay,
)
from gateway.errors import HTTPError, bad_request
from gateway.hub import Hub
from gateway.limits import Admission, check_sizes
from gateway.metrics import Metrics
from gateway.origins import guards_host, host_not_allowed
from gateway.protocol import StreamFront
from gateway.session import CloseReason, Session
from gateway.sinks import (
    AsgiSink,
    DirectSink,
    abort,
    direct_sink,
    enable_keepalive,
    http_chunk,
    keep_alive_transport,
)
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


def query_fields(text: str) -> list[tuple[str, str]]:
    """``parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)``, without
    its decoding work for a query that has nothing to decode (no ``%``, no ``+``): the usual
    ``?topic=...`` of every connection."""
    if "%" in text or "+" in text:
        return parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    if text.count("&") >= MAX_QUERY_FIELDS:
        raise ValueError("Max number of fields exceeded")
    fields = []
    for part in text.split("&"):
        if part:
            name, _, value = part.partition("=")
            fields.append((name, value))
    return fields


def parse_stream_request(scope: Scope, max_topics: int = 64) -> StreamRequest:
    try:
        fields = query_fields(scope["query_string"].decode("latin-1"))
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
        self.preamble_chunk = http_chunk(self.preamble)
        self.accepting = True
        self.guard_host = guards_host(settings)

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
        self.metrics.accepted.inc()
        address = client[0] if client else None
        headers = STREAM_HEADERS + cors_headers if cors_headers else STREAM_HEADERS
        self.admission.opened(identity.subject, address)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if scope["method"] == "HEAD":
                await send({"type": "http.response.body", "body": b""})
                return
            await self._serve(scope, request, identity, receive, send)
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

    def open_direct(self, scope: Scope, connection: StreamFront) -> bool:
        """Open a fresh stream now, below the ASGI cycle (``gateway.protocol.StreamFront``): no
        task and no request objects are kept, only the session, its sink and this driver.

        Only for what can go live in this call: a ``GET`` with no position, on topics this
        node follows already, whose token needs no key fetched. Anything else, or any check
        that refuses, returns False having changed nothing: uvicorn then runs the request
        through :meth:`__call__`, which decides (and counts) as it always does."""
        settings = self.settings
        if not self.accepting or (self.guard_host and host_not_allowed(scope) is not None):
            return False
        client = scope.get("client")
        address = client[0] if client else None
        try:
            self.admission.check_node()
            check_sizes(scope, settings)
            request = parse_stream_request(scope, settings.max_topics)
            if request.position is not None or self.engine.delivered_through() is None:
                return False
            identity = self.authorizer.identify_now(self._token(scope, request))
            if identity is None or not self.hub.following(request.topics):
                return False
            self.authorizer.check_subscribe(identity, request.topics)
            self.admission.admit(identity.subject, address)
        except HTTPError:
            return False
        self.metrics.accepted.inc()
        self.admission.opened(identity.subject, address)
        self.metrics.connections.inc()
        self.metrics.connections_total.inc()
        session = Session(request.topics, request.types, settings.max_pending_bytes)
        session.framing = http_chunk
        session.sink = sink = DirectSink(connection.transport, connection)
        started = connection.loop.time()
        stream = DirectStream(self, session, connection, identity.subject, address, started)
        session.listener = stream.closing
        try:
            through, waits = self.hub.join(session)
            if waits or through is None:  # following() said otherwise, in this same call
                raise RuntimeError("a direct stream joined a topic not yet subscribed")
            session.live_from(through)
            cors_headers = self.cors.headers_for(scope)
            connection.start_response(
                scope, STREAM_HEADERS + cors_headers if cors_headers else STREAM_HEADERS,
                self.preamble_chunk,
            )  # fmt: skip
            session.last_write = started
            if settings.tcp_keepalive:
                keep_alive_transport(connection.transport, settings.tcp_keepalive)
            stream.timers = self._timers(session, identity, connection.loop)
            sink.watch(stream.lost)
        except Exception:
            # Never into the protocol's callback: drop the connection, and let the session's
            # close undo the rest (hub, admission, gauge) as any close does.
            log.exception("stream failed")
            connection.transport.abort()
            session.close(CloseReason.CLOSED)
        return True

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
        self,
        scope: Scope,
        request: StreamRequest,
        identity: Identity,
        receive: Receive,
        send: Send,
    ) -> None:
        """Drive one session: open it (subscribe, preamble, replay), then let it live until it
        closes. A live stream on a direct sink needs no task: the hub writes to it and the
        protocol tells it of the connection's loss. Elsewhere a task watches ``receive``."""
        settings = self.settings
        session = Session(request.topics, request.types, settings.max_pending_bytes)
        asgi = AsgiSink(send, settings.send_timeout)
        session.sink = asgi
        session.listener = asgi.closing
        loop = asyncio.get_running_loop()
        started = loop.time()
        timers: list[asyncio.TimerHandle] = []
        direct: DirectSink | None = None
        watcher: asyncio.Task[None] | None = None
        self.metrics.connections.inc()
        self.metrics.connections_total.inc()
        try:
            # Inside the try: whatever fails from here, the finally below undoes it all.
            timers = self._timers(session, identity, loop)
            if settings.tcp_keepalive:
                enable_keepalive(send, settings.tcp_keepalive)
            direct = direct_sink(scope, send)
            if direct is not None:
                direct.watch(functools.partial(session.close, CloseReason.CLIENT_CLOSED))
            else:
                watcher = loop.create_task(_watch_disconnect(receive, session))
            try:
                async with asgi.opening():
                    opened = await self._open(session, request, asgi, direct)
            finally:
                asgi.opened()
            if opened:
                # Live: write what the session queues until it closes. Once nothing is
                # pending, a session with a direct sink hands its writes to the hub (framed by
                # the node, written at the end of each turn) and this only waits for the close
                # (awaiting a future here, not a coroutine: an idle stream holds few frames).
                while not session.closed:
                    if session.framing is None:
                        if session.out:
                            await asgi.send(session.take())
                            session.last_write = loop.time()
                            continue
                        if direct is not None:
                            session.framing = http_chunk
                            session.sink = direct
                    await asgi.woken()
                await self._farewell(session, asgi, direct)
        except TimeoutError:
            session.close(CloseReason.SEND_TIMEOUT)
        except Exception:
            log.exception("stream failed")
        finally:
            for timer in timers:
                timer.cancel()
            if direct is not None:
                direct.watch(None)
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            reason = self.ended(session, identity.subject, started)
        if reason.shed:
            await abort(send)

    def ended(self, session: Session, subject: str | None, started: float) -> CloseReason:
        """A session's driver is done with it: leave the hub, count and log it."""
        self.hub.detach(session)
        reason = session.finished()
        self.metrics.connections.dec()
        self.metrics.disconnected(reason.value)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "stream closed",
                extra={
                    "subject": subject,
                    "topics": len(session.topics),
                    "duration_s": round(asyncio.get_running_loop().time() - started, 3),
                    "events": session.events,
                    "reason": reason.value,
                },
            )
        return reason

    def _timers(
        self, session: Session, identity: Identity, loop: asyncio.AbstractEventLoop
    ) -> list[asyncio.TimerHandle]:
        """Token expiry and maximum lifetime: each ends the stream with a farewell."""
        timers: list[asyncio.TimerHandle] = []
        if identity.grant is None and not self.settings.max_lifetime:
            return timers
        seconds_left = self.authorizer.seconds_left(identity)
        if seconds_left is not None and identity.grant is not None:
            exp = identity.grant.expires
            farewell = event(orjson.dumps({"exp": exp}).decode(), "token_expired")
            timers.append(
                loop.call_later(
                    max(0.0, seconds_left), session.close, CloseReason.TOKEN_EXPIRED, farewell
                )
            )
        if lifetime := self.settings.max_lifetime:
            lifetime *= 1 - 0.1 * random.random()
            timers.append(
                loop.call_later(
                    lifetime, session.close, CloseReason.MAX_LIFETIME, self.retry_hint()
                )
            )
        return timers

    def retry_hint(self) -> bytes:
        """A ``retry:`` line with jitter, so clients told to leave do not all return at once."""
        return retry(max(100, int(self.settings.retry_ms * (0.5 + random.random()))))

    async def _open(
        self, session: Session, request: StreamRequest, asgi: AsgiSink, direct: DirectSink | None
    ) -> bool:
        """Subscribe, send the preamble, then the replay, and go live. False when the stream
        was refused instead (the engine could not serve it)."""
        try:
            through = await self.hub.attach(session)
            # The preamble goes out once every topic is subscribed: a client (or a test) that
            # has read ``: ok`` knows that every event published from then on reaches it.
            if direct is not None:
                direct.write(self.preamble_chunk)  # a transport write: nothing to wait for
            else:
                await asgi.send(self.preamble)
            session.last_write = asyncio.get_running_loop().time()
            if not session.closed:
                await self._send_replay(session, request, asgi, through)
        except EngineUnavailable as exc:
            message = INVALID_STORE if isinstance(exc, InvalidStore) else ENGINE_UNAVAILABLE
            await self._fail(session, asgi, CloseReason.ENGINE_UNAVAILABLE, message, exc)
            return False
        except HistoryBroken as exc:
            message = f"the history of topic {exc.topic!r} cannot be read"
            await self._fail(session, asgi, CloseReason.HISTORY_UNREADABLE, message, exc)
            return False
        return True

    async def _fail(
        self, session: Session, asgi: AsgiSink, reason: CloseReason, message: str, exc: Exception
    ) -> None:
        log.warning("stream refused: %s", exc)
        session.close(reason)
        with contextlib.suppress(TimeoutError):
            await asgi.send(self.refusal(reason.value, message))
            await asgi.finish()

    async def _send_replay(
        self, session: Session, request: StreamRequest, asgi: AsgiSink, through: int | None
    ) -> None:
        """Send the replay page by page, each at most ``max_pending_bytes``, waiting for the
        client to take each before the next is read: memory per stream stays bounded whatever
        the history. Live frames are held meanwhile; if more arrive than that budget, they are
        dropped and the replay reads on to the clock of now instead, until it ends with what
        was held meanwhile intact (then released through the per-client id rule).

        A client with no position gets every live frame that reached this node after it
        joined (``through``: the node's position then). It reads no history at all when the
        node knows that position: nothing to replay, no clock to read."""
        position = request.position
        replay: Replay | None = None
        page: list[Frame] = []
        if position is None and through is not None:
            after = known = through
        else:
            replay = await self.engine.replay(request.topics, position)
            page = await replay.next_page()
            # A client that sent an id has everything up to it, unless a reset says otherwise
            # (``since`` only bounds the replay: live events flow whatever their time).
            if position is None:
                after = known = replay.clock
            elif position.kind is PositionKind.LAST_EVENT_ID:
                after = known = position.after_key
            else:
                after = known = 0
        first = b""
        if replay is not None and replay.reset is not None:
            first = reset_frame(replay, bool(page))
            self.metrics.resets.labels(replay.reset.reason.value).inc()
            after = known = 0 if page else replay.clock
        session.start_replay(after, known)
        budget = self.settings.max_pending_bytes
        while not session.closed:
            writes, sent, size = session.replay_page(page, budget)
            if first:
                writes[:1] = [first + writes[0]] if writes else [first]
                first = b""
            for data in writes:
                await asgi.send(data)
            if sent:
                self.metrics.sent(sent, size, replayed=sent)
            if page:
                assert replay is not None
                page = await replay.next_page()
                continue
            complete = replay is None or not replay.gaps
            if (line := session.replay_ended(complete)) is not None:
                await asgi.send(line)
            if not session.read_on():
                break  # nothing is awaited from here to go_live: the held frames are whole
            if replay is None:  # read on from the node's position, which stands for the clock
                replay = await self.engine.replay(request.topics, None, clock=known)
            await replay.extend()
            page = await replay.next_page()
        if replay is not None and replay.gaps and not session.closed:
            # Retention removed events this replay had not read yet: end the stream at the
            # last event before the gap (nothing held is sent), so the client's reconnect from
            # there is told ``reset``.
            log.info("replay ended at a gap in the history of %s", ", ".join(replay.gaps))
            session.close(CloseReason.HISTORY_LOST, self.retry_hint())
            return
        events, size = session.go_live()
        self.metrics.sent(events, size)

    async def _farewell(self, session: Session, asgi: AsgiSink, direct: DirectSink | None) -> None:
        """A closed session: end the response after what it still owes (unless it was shed)."""
        if session.reason is not None and session.reason.shed:
            return
        if session.out:
            if session.framing is not None and direct is not None:
                direct.write(session.take())
            else:
                await asgi.send(session.take())
        await asgi.finish()


class DirectStream:
    """The driver of a stream opened by :meth:`EventStream.open_direct`: it holds no task.
    The hub writes the live session's bytes; the protocol reports the connection's loss;
    once the session closes (client gone, shed, timer, drain), the next loop turn ends it."""

    __slots__ = ("address", "connection", "session", "started", "stream", "subject", "timers")

    def __init__(
        self,
        stream: EventStream,
        session: Session,
        connection: StreamFront,
        subject: str | None,
        address: str | None,
        started: float,
    ) -> None:
        self.stream = stream
        self.session = session
        self.connection = connection
        self.subject = subject
        self.address = address
        self.started = started
        self.timers: list[asyncio.TimerHandle] = []

    def lost(self) -> None:
        self.session.close(CloseReason.CLIENT_CLOSED)

    def closing(self, session: Session) -> None:
        # Not now: the close may come from inside the hub's fan-out over this topic.
        self.connection.loop.call_soon(self.end)

    def end(self) -> None:
        """Write what the session still owes and end the response (or drop the connection
        of a shed client), then leave the hub."""
        session = self.session
        for timer in self.timers:
            timer.cancel()
        self.connection.lost_listener = None
        shed = session.reason is not None and session.reason.shed
        try:
            self.connection.end_response(session.take() if session.out else b"", abort=shed)
        finally:
            stream = self.stream
            stream.ended(session, self.subject, self.started)
            stream.admission.closed(self.subject, self.address)


async def _watch_disconnect(receive: Receive, session: Session) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            session.close(CloseReason.CLIENT_CLOSED)
            return
