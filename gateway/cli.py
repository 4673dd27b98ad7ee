"""``sse-gateway serve | publish | tail``."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from gateway.app import Gateway
from gateway.config import ENV_PREFIX, Settings, add_arguments, settings_from

DEFAULT_GATEWAY_URL = "http://127.0.0.1:8000"


class GatewayServer(uvicorn.Server):
    """uvicorn waits for open responses before it shuts down, and SSE responses never end by
    themselves: end them first, so the process exits instead of waiting forever."""

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.gateway.begin_shutdown()
        await super().shutdown(sockets)


def log_config(settings: Settings) -> dict[str, Any]:
    config = copy.deepcopy(LOGGING_CONFIG)
    level = settings.log_level.upper()
    config["loggers"]["gateway"] = {"handlers": ["default"], "level": level, "propagate": False}
    return config


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def serve(settings: Settings) -> int:
    gateway = Gateway(settings)
    config = uvicorn.Config(
        gateway.app(),
        host=settings.host,
        port=settings.port,
        loop="uvloop" if _has("uvloop") else "asyncio",
        http="httptools" if _has("httptools") else "h11",
        log_config=log_config(settings),
        log_level=settings.log_level.lower(),
        access_log=settings.access_log,
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    GatewayServer(config, gateway).run()
    return 0


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
    try:
        with Publisher.from_url(url, prefix=args.prefix) as pub:
            print(pub.publish(topics, data, event=args.event))
    except (ValueError, PublishError, OSError) as exc:
        print(f"publish: {exc}", file=sys.stderr)
        return 1
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
    pub.add_argument("--prefix", default=os.environ.get(ENV_PREFIX + "PREFIX", "sse"))

    tail_parser = commands.add_parser("tail", help="print a stream's events as they arrive")
    tail_parser.add_argument("topics", nargs="+", metavar="TOPIC")
    tail_parser.add_argument("--url", default=DEFAULT_GATEWAY_URL, help="a gateway's URL")
    tail_parser.add_argument("--last-event-id", help="resume after this id")
    tail_parser.add_argument("--since", type=int, help="replay from this epoch-ms time")
    tail_parser.add_argument("--types", help="only these event types (comma list)")
    tail_parser.add_argument("--count", type=int, help="exit after this many events")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(settings_from(args))
    if args.command == "publish":
        return publish(args)
    from gateway.client import tail

    logging.basicConfig(level=logging.WARNING)
    try:
        return tail(
            args.url,
            args.topics,
            last_event_id=args.last_event_id,
            since=args.since,
            types=args.types,
            count=args.count,
            out=lambda line: print(line, flush=True),
        )
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
