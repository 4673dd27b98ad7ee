"""The Starlette application: routes, engine and hub lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import random
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.assets import asset_routes
from gateway.auth import (
    ANONYMOUS,
    Authorizer,
    Identity,
    bearer_token,
    request_token,
    token_required,
)
from gateway.config import Settings
from gateway.cors import CorsMiddleware, CorsPolicy
from gateway.demo import DemoPage, DemoPublisher, page_url
from gateway.engines.base import Engine, EngineUnavailable
from gateway.errors import HTTPError, bad_request
from gateway.home import Home
from gateway.hub import Hub
from gateway.limits import RequestSizeLimits
from gateway.metrics import CONTENT_TYPE_LATEST, Metrics
from gateway.origins import (
    check_publish_request,
    guards_host,
    host_not_allowed,
    is_loopback_client,
)
from gateway.protocol import STREAMS_STATE
from gateway.publishing import (
    PublishFailed,
    PublishRate,
    failed_answer,
    idempotency_scope,
    not_replicated_answer,
)
from gateway.stream import EventStream
from publisher.protocol import (
    Message,
    Retention,
    check_field,
    check_idempotency_key,
    check_topic,
    key_to_id,
    make_message,
)
from publisher.redis_transport import NotReplicated

log = logging.getLogger("gateway")

DRAIN_TICK = 0.05
READY_CHECK_INTERVAL = 0.5
READY_CHECK_TIMEOUT = 5.0
SHUTDOWN_STEP_TIMEOUT = 5.0
"""Seconds each step of the application's shutdown (hub, engine, key server) may take."""


def make_engine(settings: Settings) -> Engine:
    retention = Retention(settings.max_events, settings.max_age)
    if settings.redis_url:
        from gateway.engines.redis import RedisEngine

        return RedisEngine(
            settings.redis_url,
            prefix=settings.prefix,
            retention=retention,
            subscribe_timeout=settings.subscribe_timeout,
            probe_interval=settings.probe_interval,
            idempotency_ttl=settings.idempotency_ttl,
            publish_replicas=settings.publish_replicas,
        )
    from gateway.engines.memory import MemoryEngine

    return MemoryEngine(retention, settings.idempotency_ttl)


def multiprocess_dir(settings: Settings) -> str | None:
    """Where this node's workers share their metrics (``--workers`` above 1, set up by the
    CLI); None: this process's own registry answers ``/metrics``."""
    if settings.workers > 1:
        return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
    return None


def describe_engine(settings: Settings) -> str:
    if settings.redis_url:
        return f"redis engine at {settings.redacted_redis_url()} (key prefix {settings.prefix!r})"
    return (
        "in-memory engine (embedded, single process: history is lost on restart and nodes "
        "do not share events; set --redis-url for production)"
    )


MAX_BATCH = 1000
"""Events per ``POST /publish`` at most."""


def _json_body(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request("invalid_json", f"body is not valid JSON: {exc}") from None


def parse_publish_body(raw: bytes, max_topics: int = 64) -> Message:
    body = _json_body(raw)
    if not isinstance(body, dict):
        raise bad_request("invalid_body", "body must be a JSON object")
    return parse_publish_item(body, max_topics)


def parse_publish_batch(raw: bytes, max_topics: int = 64) -> tuple[list[Message], bool]:
    """The events of a body: one JSON object, or a JSON list of them (a batch, ``True``).

    A batch is checked whole before anything is published: the first bad event is a 400
    whose ``index`` names it, and nothing of the batch is stored."""
    body = _json_body(raw)
    if isinstance(body, dict):
        return [parse_publish_item(body, max_topics)], False
    if not isinstance(body, list):
        raise bad_request("invalid_body", "body must be a JSON object or a list of them")
    if not body:
        raise bad_request("invalid_body", "a batch needs at least one event")
    if len(body) > MAX_BATCH:
        raise bad_request("batch_too_large", f"at most {MAX_BATCH} events per request")
    messages = []
    for index, item in enumerate(body):
        try:
            if not isinstance(item, dict):
                raise bad_request("invalid_body", "each event of a batch must be a JSON object")
            messages.append(parse_publish_item(item, max_topics))
        except HTTPError as exc:
            exc.extra["index"] = index
            exc.message = f"event {index}: {exc.message}"
            raise
    return messages, True


def parse_publish_item(body: dict[str, Any], max_topics: int = 64) -> Message:
    unknown = sorted(set(body) - {"topic", "topics", "event", "data", "idempotency_key"})
    if unknown:
        raise bad_request("unknown_field", f"unknown field {unknown[0]!r}", field=unknown[0])
    if ("topic" in body) == ("topics" in body):
        raise bad_request("invalid_topics", "give exactly one of 'topic' or 'topics'")
    topics = [body["topic"]] if "topic" in body else body["topics"]
    field = "topic" if "topic" in body else "topics"
    if not isinstance(topics, list) or not topics or not all(isinstance(t, str) for t in topics):
        raise bad_request("invalid_topics", f"{field!r} must be a topic string or a non-empty list")
    if len(topics) > max_topics:
        raise bad_request("too_many_topics", f"at most {max_topics} topics per event", field=field)
    if "data" not in body:
        raise bad_request("missing_data", "field 'data' is required", field="data")
    for topic in topics:
        try:
            check_topic(topic)
        except ValueError as exc:
            raise bad_request("invalid_topic", str(exc), field=field, topic=topic[:300]) from None
    event = body.get("event")
    if event is not None:
        try:
            check_field("event name", event)
        except ValueError as exc:
            raise bad_request("invalid_event", str(exc), field="event") from None
    key = body.get("idempotency_key")
    if key is not None:
        try:
            check_idempotency_key(key)
        except ValueError as exc:
            field = "idempotency_key"
            raise bad_request("invalid_idempotency_key", str(exc), field=field) from None
    try:
        message = make_message(topics, body["data"], event, key)
    except ValueError as exc:
        raise bad_request("invalid_data", str(exc), field="data") from None
    # Without a key no retry can name this publish: nothing to remember.
    return message if key is not None else dataclasses.replace(message, remember=False)


def _batch_note(answer: HTTPError, batch: bool) -> HTTPError:
    """A batch's events are stored one by one: when one fails, others may be stored."""
    if batch:
        answer.extra["batch"] = (
            "other events of this batch may have been stored; sending the batch again with "
            "the same idempotency keys returns their ids and stores none of them twice"
        )
    return answer


def parse_position_query(
    scope: Scope, max_topics: int, cookie: str
) -> tuple[tuple[str, ...], str | None]:
    """The topics and the token of a ``GET /position`` (token: header, query, then cookie)."""
    try:
        fields = parse_qsl(
            scope["query_string"].decode("latin-1"), keep_blank_values=True, max_num_fields=100
        )
    except ValueError:
        raise bad_request("too_many_parameters", "at most 100 query fields") from None
    topics = tuple(dict.fromkeys(value for name, value in fields if name == "topic"))
    if len(topics) > max_topics:
        raise bad_request("too_many_topics", f"at most {max_topics} topics")
    for topic in topics:
        try:
            check_topic(topic)
        except ValueError as exc:
            raise bad_request("invalid_topic", str(exc), topic=topic[:300]) from None
    query_token = next((value for name, value in reversed(fields) if name == "token"), "")
    return topics, request_token(scope["headers"], query_token, cookie)


class Gateway:
    """Holds one node's parts; the route handlers are its methods."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics(multiprocess_dir(settings))
        self.engine = make_engine(settings)
        self.engine.set_observer(self.metrics)
        self.hub = Hub(
            self.engine,
            self.metrics,
            linger=settings.linger,
            heartbeat=settings.heartbeat,
            send_timeout=settings.send_timeout,
            coalesce=settings.coalesce_ms / 1000,
        )
        self.authorizer = Authorizer(settings)
        self.cors = CorsPolicy(settings.cors_origin)
        self.stream = EventStream(
            settings, self.engine, self.hub, self.metrics, self.authorizer, self.cors
        )
        self.publish_rate = PublishRate(settings.publish_rate)
        self.announcing: asyncio.Task[None] | None = None
        self.demo = DemoPublisher(self.engine) if settings.demo else None

    @property
    def draining(self) -> bool:
        return not self.stream.accepting

    def begin_shutdown(self) -> None:
        """Refuse new streams (with a refusal browsers retry) and end the open ones."""
        self.stream.accepting = False
        self.metrics.draining()
        if self.demo is not None:
            self.demo.halt()
        self.hub.close_all("shutdown")

    async def drain(self, seconds: float) -> None:
        """Refuse new streams at once (``/readyz`` turns 503), then end the open ones spread
        over ``seconds``, each told a jittered ``retry:``, so their reconnects do not land on
        the other nodes all at once.

        The node keeps listening meanwhile: a balancer that has not yet seen the readiness
        change still sends it browsers, and each gets ``event: refused`` (``draining``) in a
        200 stream with a jittered ``retry:``, which ``EventSource`` retries through the
        balancer. A closed port would instead be an error page from many balancers, which
        ends an ``EventSource`` for good."""
        self.stream.accepting = False
        self.metrics.draining()
        if self.demo is not None:
            self.demo.halt()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        subscribers = list(self.hub.subscribers)
        random.shuffle(subscribers)
        log.info("draining %d streams over %.1fs", len(subscribers), seconds)
        window = seconds * 0.9
        per_batch = max(1, math.ceil(len(subscribers) * DRAIN_TICK / window)) if window else 0
        batches = math.ceil(len(subscribers) / per_batch) if per_batch else 0
        pause = window / batches if batches else 0.0
        for start in range(0, len(subscribers) if per_batch else 0, per_batch or 1):
            for sub in subscribers[start : start + per_batch]:
                sub.close("shutdown", self.stream.retry_hint())
            await asyncio.sleep(pause)
        while self.stream.admission.open and loop.time() < deadline:
            self.hub.close_all("shutdown")
            await asyncio.sleep(DRAIN_TICK)
        self.hub.close_all("shutdown")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.engine.start()
        await self.hub.start()
        await self.authorizer.start()
        log.info("sse-gateway starting: %s", describe_engine(self.settings))
        if not self.settings.auth_enabled:
            log.warning(
                "no token key configured: anyone who reaches this node may read every topic"
            )
        if self.settings.allow_remote_publish and not self.settings.auth_enabled:
            log.warning(
                "--allow-remote-publish: POST /publish accepts events from any address "
                "without authentication"
            )
        if self.demo is not None:
            self.demo.start(page_url(self.settings.host, self.settings.port))
        try:
            yield
        finally:
            if self.announcing is not None:
                self.announcing.cancel()
            self.begin_shutdown()
            if self.demo is not None:
                await self.demo.stop()
            # Bounded: a stuck Redis write must not hold the process past its stop signal.
            for step in (self.hub.close, self.engine.close, self.authorizer.close):
                try:
                    async with asyncio.timeout(SHUTDOWN_STEP_TIMEOUT):
                        await step()
                except TimeoutError:
                    log.warning(
                        "shutdown: %s did not finish in %ss",
                        step.__qualname__,
                        SHUTDOWN_STEP_TIMEOUT,
                    )

    def listening(self) -> None:
        """Called once the port is bound: say "ready" when the engine is too."""
        self.announcing = asyncio.create_task(self._announce_ready(), name="sse-gateway ready")

    async def _announce_ready(self) -> None:
        """Log "ready" only when the node can serve: listening, and its engine reachable
        (before, "ready" came before the port was bound, and while Redis was down)."""
        waiting = False
        while True:
            try:
                ready = await asyncio.wait_for(self.engine.ready(), READY_CHECK_TIMEOUT)
            except Exception as exc:
                ready, reason = False, f"{type(exc).__name__}: {exc}"
            else:
                reason = "not reachable"
            if ready:
                log.info("sse-gateway ready: %s", describe_engine(self.settings))
                return
            if not waiting:
                log.warning("waiting for the engine (%s): %s", self.engine.name, reason[:300])
                waiting = True
            await asyncio.sleep(READY_CHECK_INTERVAL)

    async def publish(self, request: Request) -> Response:
        """One event (a JSON object, answered ``{"id"}``) or a batch (a JSON list, answered
        ``{"results": [{"id"}, ...]}`` in order). A batch is validated, paced (each event
        counts) and authorized whole before anything is stored. Idempotency keys are scoped
        to the caller (see ``idempotency_scope``); failures are answered without internals
        and logged with them."""
        outcome, answer = await self._publish(request)
        self.metrics.publish_requests.labels(outcome).inc()
        return answer

    async def _publish(self, request: Request) -> tuple[str, Response]:
        """The outcome (``accepted`` or the error code) and the answer."""
        batch = False
        try:
            identity = await self._publisher_identity(request)
            raw = await self._read_body(request)
            messages, batch = parse_publish_batch(raw, self.settings.max_topics)
            address = request.client.host if request.client else None
            self.publish_rate.check(identity, address, len(messages))
            scope = idempotency_scope(identity)
            for index, message in enumerate(messages):
                if self.authorizer.enabled:
                    try:
                        self.authorizer.check_publish(identity, message.topics)
                    except HTTPError as exc:
                        if batch:
                            exc.extra["index"] = index
                        raise
                messages[index] = dataclasses.replace(message, scope=scope)
            if batch:
                ids = await self.engine.publish_many(messages)
            else:
                ids = [await self.engine.publish(messages[0])]
        except ClientDisconnect:
            return "client_disconnected", Response(status_code=400)
        except HTTPError as exc:
            self.metrics.rejected.labels(str(exc.status)).inc()
            return exc.error, exc.response()
        except EngineUnavailable as exc:
            log.warning("publish failed: %s", exc)
            return "engine_unavailable", _batch_note(HTTPError(
                503, "engine_unavailable", "the event store is unavailable; retry later",
                {"retry-after": "1"},
            ), batch).response()  # fmt: skip
        except PublishFailed as exc:
            answer = _batch_note(failed_answer(exc), batch)
            return answer.error, answer.response()
        except NotReplicated as exc:
            answer = not_replicated_answer(exc)
            if batch:
                answer.extra["ids"] = exc.ids
            return answer.error, answer.response()
        self.metrics.published.inc(len(ids))
        if batch:
            return "accepted", JSONResponse({"results": [{"id": i} for i in ids]})
        return "accepted", JSONResponse({"id": ids[0]})

    async def position(self, request: Request) -> Response:
        """``GET /position``: the newest id issued, ``{"id": "<ms>-<seq>"}`` (``0-0`` before
        the first). A page that reads it before the app's state, then streams with
        ``lastEventId`` set to it, is replayed everything published in between.

        The same access as reading: in token mode ``?topic=`` is required and the token
        (header, ``?token=`` or cookie, as for ``GET /events``) must grant every topic (or
        they are public); an anonymous node answers anyone."""
        try:
            topics, token = parse_position_query(
                request.scope, self.settings.max_topics, self.settings.token_cookie
            )
            if self.authorizer.enabled:
                if not topics:
                    raise bad_request("missing_topic", "give at least one ?topic= to read")
                identity = await self.authorizer.identify(token)
                self.authorizer.check_subscribe(identity, topics)
            clock = (await self.engine.replay(topics, None)).clock
        except HTTPError as exc:
            self.metrics.rejected.labels(str(exc.status)).inc()
            return exc.response()
        except EngineUnavailable as exc:
            log.warning("position failed: %s", exc)
            return HTTPError(
                503, "engine_unavailable", "the event store is unavailable; retry later",
                {"retry-after": "1"},
            ).response()  # fmt: skip
        return JSONResponse({"id": key_to_id(clock)}, headers={"cache-control": "no-store"})

    async def _publisher_identity(self, request: Request) -> Identity:
        """Token mode: a Bearer token (never a query or cookie token, which a cross-site form
        could send). Without keys: loopback clients only, by the TCP peer and the forwarded
        address both, unless --allow-remote-publish. In either mode, never a cross-site
        browser request (see ``gateway.origins``)."""
        check_publish_request(request.scope, self.cors)
        if self.authorizer.enabled:
            token = bearer_token(request.scope["headers"])
            if token is None:
                raise token_required()
            return await self.authorizer.identify(token)
        if not self.settings.allow_remote_publish and not is_loopback_client(request.scope):
            raise HTTPError(
                403,
                "forbidden",
                "POST /publish accepts only loopback clients unless the gateway runs "
                "with --allow-remote-publish",
            )
        return ANONYMOUS

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_publish_bytes
        too_large = HTTPError(413, "body_too_large", f"the body must be at most {limit} bytes")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise too_large
        chunks = []
        size = 0
        timeout = self.settings.header_timeout
        try:
            # A body trickled for ever would hold its connection as a slow head did.
            async with asyncio.timeout(timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except TimeoutError:
            raise HTTPError(
                408, "body_timeout", f"the request body must arrive within {timeout:g}s",
                {"connection": "close"},
            ) from None  # fmt: skip
        return b"".join(chunks)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """503 while draining or while the engine cannot serve streams; either way the body
        names the engine's state (Redis: ``link``, ``redis``, ``publish``)."""
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        health = await self.engine.health()
        body = {"engine": self.engine.name, **health.detail}
        if not health.ready:
            return JSONResponse({"status": "engine unavailable", **body}, status_code=503)
        return JSONResponse({"status": "ready", **body})

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def app(self) -> ASGIApp:
        routes = [
            Route("/publish", self.publish, methods=["POST"]),
            Route("/position", self.position, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            *asset_routes(),
            Route("/", Home(self.settings).serve, methods=["GET"]),
            Route("/demo", DemoPage(self.settings.demo).serve, methods=["GET"]),
        ]
        app = Starlette(
            routes=routes,
            lifespan=self.lifespan,
            exception_handlers={HTTPException: _http_exception},
        )
        app.state.gateway = self
        routes_app = CorsMiddleware(RequestSizeLimits(app, self.settings), self.cors)
        return StreamRouter(self.stream, routes_app, self.cors, guards_host(self.settings))


NOT_FOUND = HTTPError(404, "not_found", "no such route (paths are matched as sent, undecoded)")


class StreamRouter:
    """Sends ``/events`` straight to the stream handler, everything else to Starlette.

    The stream must see the server's own ``send``: Starlette's middleware wraps it, which
    costs a call per write and hides the transport that a slow consumer's abort needs."""

    def __init__(
        self, stream: ASGIApp, app: ASGIApp, cors: CorsPolicy, guard_host: bool = False
    ) -> None:
        self.stream = stream
        self.app = app
        self.cors = cors
        self.guard_host = guard_host
        """Anonymous on loopback: refuse non-loopback ``Host`` names (DNS rebinding)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "lifespan"
            and isinstance(scope.get("state"), dict)
            and isinstance(self.stream, EventStream)
        ):
            # The listener's protocol (``gateway.protocol.StreamFront``) finds the stream
            # handler in the server's lifespan state; a server without one just never asks.
            scope["state"].setdefault(STREAMS_STATE, self.stream)
        if scope["type"] == "http":
            if self.guard_host and (refusal := host_not_allowed(scope)) is not None:
                await refusal(scope, receive, send)
                return
            if b"%" in (scope.get("raw_path") or b""):
                # Routes are matched on the path as sent, as a proxy in front matches them:
                # ``/%70ublish`` is not ``/publish`` (no route has an escaped character).
                await NOT_FOUND(scope, receive, send)
                return
            if self.cors.enabled and self.cors.is_preflight(scope):
                await self.cors.preflight(scope, receive, send)
                return
            if scope["path"] == "/events":
                await self.stream(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return HTTPError(exc.status_code, code, exc.detail, dict(exc.headers or {})).response()


def create_app(settings: Settings | None = None) -> ASGIApp:
    """The ASGI app; with no settings, they come from ``SSE_GATEWAY_*`` variables."""
    if settings is None:
        from gateway.config import settings_from

        settings = settings_from()
    return Gateway(settings).app()
