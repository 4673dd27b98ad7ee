"""The compose stack's demo traffic: a few readers and a publisher, through the balancer.

Publishes a message to ``demo:chat`` every 2 s with ``POST /publish`` (the demo page shows
them) and keeps a few streams open on ``demo:jobs`` and ``demo:chat``, so the dashboard's
connection, delivery and publish panels move without a browser. Uses only the ``publisher``
package that the image installs.
"""

from __future__ import annotations

import asyncio
import logging
import os

from publisher import AsyncPublisher, PublishError, asubscribe

URL = os.environ.get("DEMO_URL", "http://nginx:8080")
READERS = int(os.environ.get("DEMO_READERS", "3"))
EVERY = float(os.environ.get("DEMO_EVERY", "2"))
TOPICS = ["demo:jobs", "demo:chat"]

log = logging.getLogger("demo-publisher")


async def read(number: int, counts: list[int]) -> None:
    """One stream, resumed by the subscriber itself whenever a node drains or restarts."""
    async with asubscribe(URL, TOPICS) as stream:
        async for _event in stream:
            counts[number] += 1


async def publish() -> None:
    async with AsyncPublisher.from_url(URL) as pub:
        sent = 0
        while True:
            sent += 1
            try:
                await pub.publish("demo:chat", f"message {sent} from the demo publisher")
            except (PublishError, OSError) as exc:
                log.warning("publish failed: %s", exc)
            await asyncio.sleep(EVERY)


async def report(counts: list[int]) -> None:
    while True:
        await asyncio.sleep(60)
        log.info("events read by %d streams in total: %d", len(counts), sum(counts))


async def main() -> None:
    counts = [0] * READERS
    async with asyncio.TaskGroup() as tasks:
        for number in range(READERS):
            tasks.create_task(read(number, counts))
        tasks.create_task(publish())
        tasks.create_task(report(counts))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    asyncio.run(main())
