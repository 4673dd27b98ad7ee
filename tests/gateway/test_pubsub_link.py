"""The pub/sub link survives what Redis may carry, and a lost link never leaves a stream
silently dead."""

from __future__ import annotations

import asyncio

import httpx
import redis

from publisher import Publisher
from tests.conftest import GatewayFactory
from tests.support.sse import open_stream


def test_a_message_that_is_not_a_frame_is_ignored_and_delivery_goes_on(
    redis_url: str, prefix: str, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory("--prefix", prefix, redis_url=redis_url)

    async def scenario() -> list[str]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
            stream, task = open_stream(http, gateway.url, ["t"])
            try:
                await stream.until_subscribed()
                with redis.Redis.from_url(redis_url) as client:
                    for junk in (b"hello", b"id: nope\n\n", b"\xff\xfe", b""):
                        client.publish(f"{prefix}:c:t", junk)
                with Publisher.from_url(redis_url, prefix=prefix) as pub:
                    pub.publish("t", "real")
                await stream.wait_for(lambda s: len(s.events) >= 1)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return stream.data()

    assert asyncio.run(scenario()) == ["real"]
    assert httpx.get(gateway.url + "/readyz").status_code == 200
    assert "Traceback" not in gateway.output()
