"""``sse-gateway serve | publish | token | tail | pg-bridge``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import logging.config
import os
import signal
import socket
import sys
import time
import urllib.parse
import warnings
from collections.abc import Sequence
from types import FrameType
from typing import Any

import uvicorn

from gateway import pg_bridge
from gateway.app import Gateway
from gateway.config import (
    ENV_PREFIX,
    Settings,
    add_arguments,
    check_exposure,
    is_loopback_host,
    settings_from,
)
from gateway.logs import log_config
from gateway.protocol import head_bound, protocol_class
from gateway.sinks import listen_with_keepalive, server_sockets
from publisher.protocol import DEFAULT_PREFIX

DEFAULT_GATEWAY_URL = "http://127.0.0.1:8000"
TOKEN_VARIABLE = ENV_PREFIX + "TOKEN"
"""The token ``publish`` and ``tail`` send when ``--token`` is not given."""


SHUTDOWN_MARGIN = 2
INTERRUPT_DRAIN = 0.5
"""Seconds a Ctrl-C (SIGINT) on a loopback node drains; SIGTERM drains the whole window."""
FORCE_POLL = 0.1
"""How often a drain looks for a second Ctrl-C (uvicorn's own shutdown polls as often)."""
FORCE_GRACE = 0.5
"""Seconds a forced stop waits for the streams it ended, and then for the app's shutdown."""
FORCE_STEP = 0.02
INTERRUPTED = 130
"""The exit status after a forced stop (128 + SIGINT, as a shell reports an interrupt)."""

log = logging.getLogger("gateway")


class GatewayServer(uvicorn.Server):
    """uvicorn waits for open responses before it shuts down, and SSE responses never end by
    themselves: drain them first, still listening (a browser then gets a refusal that it
    retries, an API client a 503 ``draining``, rather than a refused connection), then let
    uvicorn close the listener and the rest."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway
        self.stop_signal: int | None = None
        """The signal that began the shutdown."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:  # the port is bound (uvicorn exits on a bind error)
            if idle := self.gateway.settings.tcp_keepalive:
                # Once on the listeners, which their connections inherit: not per stream.
                listen_with_keepalive(server_sockets(self), idle)
            settle_collector()
            self.gateway.listening()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The first signal shuts down gracefully; a Ctrl-C after any signal forces the exit
        (``force_exit``), which also ends a drain under way."""
        if self.stop_signal is None:
            self.stop_signal = sig
        super().handle_exit(sig, frame)

    def drain_seconds(self) -> float:
        """The drain window, but at most ``INTERRUPT_DRAIN`` for a Ctrl-C on a loopback node:
        nobody else reads from a development node, so nobody's reconnects need spreading."""
        seconds = self.gateway.settings.drain_seconds
        if self.stop_signal == signal.SIGINT and is_loopback_host(self.gateway.settings.host):
            return min(seconds, INTERRUPT_DRAIN)
        return seconds

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = asyncio.create_task(self.gateway.drain(self.drain_seconds()))
        while not drain.done():
            await asyncio.wait({drain}, timeout=FORCE_POLL)
            if self.force_exit and not drain.done():
                drain.cancel()
                await asyncio.gather(drain, return_exceptions=True)
                log.warning("stopping at once: the open streams are ended without a drain")
                await self._end_streams()
        await super().shutdown(sockets)
        if self.force_exit:
            # uvicorn skips the application's shutdown when forced; a lifespan left waiting
            # would be cancelled when the loop stops, and logged as an error.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.lifespan.shutdown(), FORCE_GRACE)

    async def _end_streams(self) -> None:
        """End every stream now, and give their responses a moment to finish (a response
        still running when the loop stops is cancelled and logged as an error)."""
        self.gateway.hub.close_all("shutdown")
        for _ in range(int(FORCE_GRACE / FORCE_STEP)):
            if not self.gateway.stream.admission.open:
                break
            await asyncio.sleep(FORCE_STEP)


GC_THRESHOLDS = (10_000, 10, 10)
"""The collector's generation thresholds (Python's default: 700, 10, 10). Each connection
allocates a few hundred objects, many of them long-lived; at the default the youngest
generation is collected every few connections and long-lived objects are traversed again and
again: a tenth of the CPU a connection costs, measured on a 2000/s connect ramp."""


def settle_collector() -> None:
    """Once started: the objects of the process's start (modules, the app) are never garbage,
    so the collector stops traversing them (``gc.freeze``), and collects less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def serve(settings: Settings) -> int:
    check_exposure(settings)
    if settings.workers > 1:
        from gateway.workers import metrics_directory, supervise

        logging.config.dictConfig(log_config(settings.log_level, settings.log_format))
        with metrics_directory():
            return supervise(settings, run_node)
    return run_node(settings)


def run_node(settings: Settings, sock: socket.socket | None = None) -> int:
    """One gateway process; ``sock``: a listening socket of its own (``--workers``)."""
    gateway = Gateway(settings)
    http = "httptools" if _has("httptools") else "h11"
    bound = head_bound(settings.max_header_bytes, settings.max_query_bytes)
    config = uvicorn.Config(
        gateway.app(),
        host=settings.host,
        port=settings.port,
        loop="uvloop" if _has("uvloop") else "asyncio",
        http=protocol_class(http, settings.header_timeout, bound),
        h11_max_incomplete_event_size=bound,
        log_config=log_config(settings.log_level, settings.log_format),
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=SHUTDOWN_MARGIN,
        server_header=False,
    )
    server = GatewayServer(config, gateway)
    # uvicorn raises a Ctrl-C again once it has shut down: that stop was asked for.
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock] if sock is not None else None)
    return INTERRUPTED if server.force_exit else 0


def publish(args: argparse.Namespace) -> int:
    from publisher import Publisher, PublishError

    url = args.url or os.environ.get(ENV_PREFIX + "REDIS_URL") or DEFAULT_GATEWAY_URL
    data: Any = args.data
    if args.json:
        try:
            data = json.loads(args.data)
        except json.JSONDecodeError as exc:
            print(f"publish: DATA is not JSON: {exc}", file=sys.stderr)
            return 2
    topics = [t for t in args.topic.split(",") if t]
    if url.startswith(("http://", "https://")) and (reason := _unreachable(url)) is not None:
        print(
            f"publish: no gateway at {url} ({reason}): start one with `sse-gateway serve`",
            file=sys.stderr,
        )
        return 1
    token = args.token or os.environ.get(TOKEN_VARIABLE) or None
    try:
        with Publisher.from_url(url, prefix=args.prefix, token=token) as pub:
            print(pub.publish(topics, data, event=args.event))
    except (ValueError, PublishError, OSError) as exc:
        print(f"publish: {exc}", file=sys.stderr)
        return 1
    return 0


def _unreachable(url: str) -> str | None:
    """Why nothing answers at ``url``'s host and port, or None when something listens (one
    connect, so a missing node is reported at once rather than after the publish retries)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=3).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


TTL_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_ttl(text: str) -> int:
    """``90``, ``30s``, ``15m``, ``1h`` or ``2d`` as seconds."""
    text = text.strip().lower()
    unit = TTL_UNITS.get(text[-1:], 0)
    number = text[:-1] if unit else text
    if not number.isdigit() or int(number) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 90, 30s, 15m, 1h, 2d)")
    return int(number) * (unit or 1)


def mint_token(args: argparse.Namespace) -> int:
    import jwt
    import jwt.warnings

    secrets = args.jwt_secret or [
        s for s in os.environ.get(ENV_PREFIX + "JWT_SECRET", "").split(",") if s.strip()
    ]
    if not secrets:
        print(f"token: no secret: give --jwt-secret or set {ENV_PREFIX}JWT_SECRET", file=sys.stderr)
        return 2
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": args.sub,
        "iat": now,
        "exp": now + args.ttl,
        "sse": {
            "subscribe": [p for text in args.subscribe for p in text.split(",") if p],
            "publish": [p for text in args.publish for p in text.split(",") if p],
        },
    }
    audience = args.jwt_audience or os.environ.get(ENV_PREFIX + "JWT_AUDIENCE")
    issuer = args.jwt_issuer or os.environ.get(ENV_PREFIX + "JWT_ISSUER")
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.warnings.InsecureKeyLengthWarning)
        print(jwt.encode(claims, secrets[0].strip(), algorithm=args.algorithm))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sse-gateway", description="Server-Sent Events gateway on Redis."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve_parser = commands.add_parser("serve", help="run a gateway node")
    add_arguments(serve_parser)

    pub = commands.add_parser("publish", help="publish one event")
    pub.add_argument("topic", help="topic, or several separated by commas")
    pub.add_argument("data", help="event data (a string; with --json, a JSON value)")
    pub.add_argument("--event", help="event name (the browser's addEventListener type)")
    pub.add_argument("--json", action="store_true", help="parse DATA as JSON")
    pub.add_argument(
        "--url",
        help=f"redis:// to publish directly, or a gateway's http:// URL "
        f"(default: ${ENV_PREFIX}REDIS_URL, else {DEFAULT_GATEWAY_URL})",
    )
    pub.add_argument("--prefix", default=os.environ.get(ENV_PREFIX + "PREFIX", DEFAULT_PREFIX))
    pub.add_argument(
        "--token", help=f"a token with the right to publish (default ${TOKEN_VARIABLE})"
    )

    token = commands.add_parser("token", help="mint a development token from the secret")
    token.add_argument("--sub", required=True, help="the subject (user) the token is for")
    token.add_argument(
        "--subscribe", action="append", default=[], metavar="PATTERNS",
        help="topic patterns it may read (comma list; repeatable)",
    )  # fmt: skip
    token.add_argument(
        "--publish", action="append", default=[], metavar="PATTERNS",
        help="topic patterns it may publish to (comma list; repeatable)",
    )  # fmt: skip
    token.add_argument(
        "--ttl", type=parse_ttl, default=3600, help="lifetime: 90, 30s, 15m, 1h, 2d (default 1h)"
    )
    token.add_argument(
        "--jwt-secret", action="append", help=f"the secret (default ${ENV_PREFIX}JWT_SECRET)"
    )
    token.add_argument("--jwt-audience", help="the 'aud' claim")
    token.add_argument("--jwt-issuer", help="the 'iss' claim")
    token.add_argument("--algorithm", choices=["HS256", "HS384", "HS512"], default="HS256")

    tail_parser = commands.add_parser("tail", help="print a stream's events as they arrive")
    tail_parser.add_argument("topics", nargs="+", metavar="TOPIC")
    tail_parser.add_argument("--url", default=DEFAULT_GATEWAY_URL, help="a gateway's URL")
    tail_parser.add_argument("--last-event-id", help="resume after this id")
    tail_parser.add_argument("--since", type=int, help="replay from this epoch-ms time")
    tail_parser.add_argument("--types", help="only these event types (comma list)")
    tail_parser.add_argument("--count", type=int, help="exit after this many events")
    tail_parser.add_argument(
        "--token", help=f"a token with the right to read the topics (default ${TOKEN_VARIABLE})"
    )
    tail_parser.add_argument(
        "--json", action="store_true", help="one JSON object per event: id, event, data"
    )
    pg = commands.add_parser("pg-bridge", help="publish a PostgreSQL outbox (needs psycopg)")
    pg_bridge.add_arguments(pg)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(settings_from(args))
    if args.command == "publish":
        return publish(args)
    if args.command == "token":
        return mint_token(args)
    if args.command == "pg-bridge":
        return pg_bridge.main(args)
    from gateway.client import tail

    logging.basicConfig(level=logging.WARNING, format="tail: %(message)s")
    logging.getLogger("publisher.subscriber").setLevel(logging.INFO)
    try:
        return tail(
            args.url,
            args.topics,
            last_event_id=args.last_event_id,
            since=args.since,
            types=args.types,
            count=args.count,
            token=args.token or os.environ.get(TOKEN_VARIABLE) or None,
            json_lines=args.json,
            out=lambda line: print(line, flush=True),
        )
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
