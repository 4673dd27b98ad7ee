"""Gateway nodes are stateless: a client that moves to another node resumes from Redis."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import orjson

from publisher import Publisher
from tests.conftest import GatewayFactory
from tests.support.sse import SSEStream
from tests.support.waiting import wait_until_async

EVENTS = 1200


def test_moving_between_nodes_with_last_event_id_loses_and_repeats_nothing(
    redis_url: str, prefix: str, gateway_factory: GatewayFactory
) -> None:
    nodes = [
        gateway_factory("--prefix", prefix, redis_url=redis_url),
        gateway_factory("--prefix", prefix, redis_url=redis_url),
    ]
    ids: list[str] = []

    def publish_steadily() -> None:
        with Publisher.from_url(redis_url, prefix=prefix) as pub:
            for seq in range(EVENTS):
                ids.append(pub.publish("orders", {"seq": seq}))
                time.sleep(0.002)  # the publisher's pace, so clients hop while it publishes

    async def read(http: httpx.AsyncClient, stream: SSEStream, done: object) -> None:
        task = asyncio.create_task(stream.read(http))
        try:
            await stream.wait_for(done, 30)  # type: ignore[arg-type]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert stream.status == 200

    async def client(http: httpx.AsyncClient, hops: list[int]) -> list[int]:
        """Read ``hops[i]`` events from alternating nodes, then the rest of the sequence,
        each time resuming with the last id received."""
        received: list[int] = []
        last_id = ids[0]
        for hop, count in enumerate([*hops, 0]):
            stream = SSEStream(nodes[hop % 2].url, ["orders"], last_event_id=last_id)
            if count:
                await read(http, stream, lambda s, n=count: len(s.events) >= n)
            else:
                await wait_until_async(lambda: len(ids) >= EVENTS, "every event published", 30)
                await read(http, stream, lambda s: bool(s.events) and s.events[-1].id == ids[-1])
            received.extend(orjson.loads(e.data)["seq"] for e in stream.events)
            if stream.events:
                last_id = stream.events[-1].id
        return received

    async def scenario() -> list[list[int]]:
        publisher = threading.Thread(target=publish_steadily)
        publisher.start()
        await wait_until_async(lambda: bool(ids), "the first event published")
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None)) as http:
            plans = [[150], [40, 300], [400, 20, 200]]
            results = await asyncio.gather(*(client(http, plan) for plan in plans))
        await asyncio.to_thread(publisher.join)
        return list(results)

    for received in asyncio.run(scenario()):
        assert received == list(range(1, EVENTS)), (
            f"{len(received)} events, {len(received) - len(set(received))} repeated"
        )
