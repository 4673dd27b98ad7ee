"""The SSE endpoint teams hand-roll: Starlette ``StreamingResponse`` over an async generator that
opens its own Redis pub/sub connection per client.

Two settings differ from a literal copy-paste, because without them it does not run the
benchmark at all: redis-py 8's async pool stops at 100 connections (``MaxConnectionsError``
for the 101st client) and its 5 s default ``socket_timeout`` breaks a quiet subscription.
Everything else is left as hand-rolled code usually is, including that a client which goes
away is only noticed at the next failing write (the bench starts a fresh process per run).

``python -m bench.baselines.naive --port P --redis-url URL``"""

import argparse
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

PING_S = 15.0


def build_app(redis_url: str) -> Starlette:
    client = aioredis.Redis.from_url(
        redis_url, decode_responses=True, protocol=2, socket_timeout=None,
        max_connections=1_000_000,
    )  # fmt: skip

    async def stream(channel: str) -> AsyncIterator[str]:
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(channel)
        try:
            last = time.monotonic()
            while True:
                message = await pubsub.get_message(timeout=PING_S)
                if message is not None:
                    last = time.monotonic()
                    yield f"data: {message['data']}\n\n"
                elif time.monotonic() - last >= PING_S:
                    last = time.monotonic()
                    yield ": ping\n\n"
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def events(request: Request) -> Response:
        channel = request.query_params.get("topic")
        if not channel:
            return PlainTextResponse("topic is required", status_code=400)
        return StreamingResponse(
            stream(channel), media_type="text/event-stream", headers={"cache-control": "no-cache"}
        )

    return Starlette(routes=[Route("/events", events)])


def main() -> None:
    parser = argparse.ArgumentParser(description="naive SSE-over-Redis baseline")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    uvicorn.run(
        build_app(args.redis_url), host=args.host, port=args.port, loop="uvloop",
        http="httptools", log_level="warning", access_log=False,
    )  # fmt: skip


if __name__ == "__main__":
    main()
