"""``since=<epoch ms>`` replays from a point in time; ``types=`` filters replay and live;
``lastEventID`` in the query means the same as the header, and the header wins."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.conftest import Node, NodeFactory
from tests.support.sse import collect, open_stream
from tests.support.waiting import let_time_pass_async


def publish_spaced(node: Node, count: int) -> list[str]:
    ids = []
    for seq in range(count):
        ids.append(node.publish("t", f"e{seq}"))
        time.sleep(0.005)  # each event in a millisecond of its own, for ``since``
    return ids


def test_since_replays_the_events_at_or_after_that_time(node: Node) -> None:
    ids = publish_spaced(node, 10)
    since_ms = int(ids[4].split("-")[0])
    assert int(ids[3].split("-")[0]) < since_ms

    stream = asyncio.run(
        collect(node.url, ["t"], lambda s: len(s.events) >= 6, since=since_ms, timeout=5)
    )
    assert stream.data() == [f"e{n}" for n in range(4, 10)]
    assert all(e.event == "message" for e in stream.events)


def test_since_in_the_future_replays_nothing_and_streams_live(node: Node) -> None:
    publish_spaced(node, 2)

    async def scenario() -> list[str]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
            future = int(time.time() * 1000) + 60_000
            stream, task = open_stream(http, node.url, ["t"], since=future)
            await stream.until_subscribed()
            await asyncio.to_thread(node.publish, "t", "live")
            try:
                await stream.wait_for(lambda s: len(s.events) >= 1)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return stream.data()

    assert asyncio.run(scenario()) == ["live"]


def test_an_invalid_since_is_a_400(node: Node) -> None:
    for since in ("yesterday", "-5", "1.5", "9" * 30):
        response = httpx.get(node.url + "/events", params={"topic": "t", "since": since})
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_since"


def test_types_filters_both_replay_and_live(node: Node) -> None:
    first = node.publish("t", "start", event="other")
    node.publish("t", "a1", event="alpha")
    node.publish("t", "skip-replay", event="other")
    node.publish("t", "m1")
    node.publish("t", "b1", event="beta")

    async def scenario() -> list[tuple[str, str]]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
            stream, task = open_stream(
                http, node.url, ["t"], last_event_id=first, types="alpha,message"
            )
            await stream.wait_for(lambda s: len(s.events) >= 2)
            for data, event in (("x", "other"), ("a2", "alpha"), ("y", "beta"), ("m2", None)):
                await asyncio.to_thread(node.publish, "t", data, event)
            try:
                await stream.wait_for(lambda s: len(s.events) >= 4)
                await let_time_pass_async(0.2, "a filtered-out event would arrive meanwhile")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return [(e.event, e.data) for e in stream.events]

    assert asyncio.run(scenario()) == [
        ("alpha", "a1"),
        ("message", "m1"),
        ("alpha", "a2"),
        ("message", "m2"),
    ]


def test_last_event_id_query_parameter_resumes_and_the_header_wins(node: Node) -> None:
    ids = [node.publish("t", f"e{n}") for n in range(5)]

    by_query = asyncio.run(
        collect(node.url, ["t"], lambda s: len(s.events) >= 2, query=f"&lastEventID={ids[2]}")
    )
    assert by_query.data() == ["e3", "e4"]

    both = asyncio.run(
        collect(
            node.url,
            ["t"],
            lambda s: len(s.events) >= 1,
            last_event_id=ids[3],
            query=f"&lastEventID={ids[0]}",
        )
    )
    assert both.data() == ["e4"]


def test_last_event_id_wins_over_since(node: Node) -> None:
    ids = publish_spaced(node, 4)
    stream = asyncio.run(
        collect(node.url, ["t"], lambda s: len(s.events) >= 1, last_event_id=ids[2], since=0)
    )
    assert stream.data() == ["e3"]


def test_a_filtered_stream_keeps_the_browsers_last_event_id_current(
    node_factory: NodeFactory,
) -> None:
    """Skipped events still move the client's position (an id line with no data), so a
    reconnect does not replay what the filter already skipped."""
    node = node_factory("--heartbeat", "0.3")
    first = node.publish("t", "a0", event="alpha")
    skipped_in_replay = node.publish("t", "b0", event="beta")

    async def scenario() -> tuple[str, str, str]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
            stream, task = open_stream(http, node.url, ["t"], last_event_id=first, types="alpha")
            try:
                await stream.wait_for(lambda s: s.parser.last_id == skipped_in_replay)
                after_replay = stream.parser.last_id
                skipped_live = await asyncio.to_thread(node.publish, "t", "b1", "beta")
                await stream.wait_for(lambda s: s.parser.last_id == skipped_live, timeout=5)
                return after_replay, stream.parser.last_id, skipped_live
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    after_replay, after_live, skipped_live = asyncio.run(scenario())
    assert after_replay == skipped_in_replay
    assert after_live == skipped_live
