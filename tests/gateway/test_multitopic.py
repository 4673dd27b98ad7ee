"""One connection, several topics: one id order across all of them (docs/architecture.md §3)."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import Node
from tests.support.sse import collect, open_stream
from tests.support.waiting import let_time_pass_async


def test_an_event_published_to_two_subscribed_topics_arrives_once(node: Node) -> None:
    async def scenario() -> list[str]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
            stream, task = open_stream(http, node.url, ["a", "b", "c"])
            await stream.until_subscribed()
            await asyncio.to_thread(node.publish, ["a", "b"], "to a and b")
            await asyncio.to_thread(node.publish, "elsewhere", "not subscribed")
            await asyncio.to_thread(node.publish, ["b", "c", "elsewhere"], "to b, c and more")
            await asyncio.to_thread(node.publish, "c", "last")
            try:
                await stream.wait_for(lambda s: "last" in s.data())
                await let_time_pass_async(0.2, "a second copy would arrive meanwhile")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return stream.data()

    assert asyncio.run(scenario()) == ["to a and b", "to b, c and more", "last"]


def test_one_id_resumes_every_topic_in_id_order(node: Node) -> None:
    plan: list[tuple[str | list[str], int]]
    plan = [("a", 0), (["a", "b"], 1), ("c", 2), ("b", 3), (["a", "c"], 4), ("d", 5)]
    plan += [("c", 6), ("a", 7), (["b", "c"], 8), ("b", 9)]
    ids = [node.publish(topics, {"n": n}) for topics, n in plan]

    live = node.publish("a", {"n": "live"})

    stream = asyncio.run(
        collect(
            node.url,
            ["a", "b", "c"],
            lambda s: bool(s.events) and s.events[-1].id == live,
            last_event_id=ids[2],
        )
    )
    expected = (3, 4, 6, 7, 8, 9)
    assert [e.data for e in stream.events] == [*(f'{{"n":{n}}}' for n in expected), '{"n":"live"}']
    assert [e.id for e in stream.events] == [*(ids[n] for n in expected), live]
