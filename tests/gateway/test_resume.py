"""Gapless resume under load: every client receives exactly the events after its
Last-Event-ID, in order, none missing, none twice, across the replay -> live boundary."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable

import httpx
import orjson

from tests.conftest import NodeFactory
from tests.support.sse import SSEStream
from tests.support.waiting import wait_until_async

EVENTS = 2000
CLIENTS = 24


def test_clients_joining_mid_burst_with_random_ids_get_exactly_what_follows(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(max_events=10 * EVENTS)
    rng = random.Random(20261121)
    joins = sorted(rng.sample(range(20, EVENTS - 20), CLIENTS))
    ids: list[str] = []

    def publish_burst() -> None:
        with node.new_publisher() as pub:
            for seq in range(EVENTS):
                ids.append(pub.publish("burst", {"seq": seq}))

    def published(count: int) -> Callable[[], bool]:
        return lambda: len(ids) >= count

    async def scenario() -> list[tuple[int, SSEStream]]:
        publisher = threading.Thread(target=publish_burst)
        clients: list[tuple[int, SSEStream]] = []
        tasks = []
        limits = httpx.Limits(max_connections=CLIENTS + 5)
        async with httpx.AsyncClient(timeout=httpx.Timeout(30, read=None), limits=limits) as http:
            publisher.start()
            for join in joins:
                await wait_until_async(published(join), f"{join} published", 30, 0.001)
                resume_from = rng.randrange(0, len(ids))
                stream = SSEStream(node.url, ["burst"], last_event_id=ids[resume_from])
                clients.append((resume_from, stream))
                tasks.append(asyncio.create_task(stream.read(http)))
            await asyncio.to_thread(publisher.join)
            last = ids[-1]
            try:
                for _, stream in clients:
                    await stream.wait_for(
                        lambda s: s.closed_by_server or bool(s.events and s.events[-1].id == last),
                        timeout=60,
                    )
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        return clients

    clients = asyncio.run(scenario())
    assert len(ids) == EVENTS
    for resume_from, stream in clients:
        assert stream.status == 200
        received = [orjson.loads(e.data)["seq"] for e in stream.events]
        assert received == list(range(resume_from + 1, EVENTS)), (
            f"client resuming after seq {resume_from}: first {received[:5]}, "
            f"{len(received)} events, duplicates {len(received) - len(set(received))}"
        )
        assert [e.id for e in stream.events] == ids[resume_from + 1 :]
