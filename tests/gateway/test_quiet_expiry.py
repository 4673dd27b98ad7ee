"""Issue 10 C: streams of topics that go quiet expire after the retention age, and that loss
is never silent.

A topic nobody publishes to for ``--max-age`` loses its whole history (its stream key expires;
the embedded engine forgets it), so no entry is left whose back-link could reveal the loss. A
reconnect whose position is older than the retention age is therefore told ``reset: trimmed``
for a topic with no history after that position; a position newer than it cannot have missed
anything, and a live client on a quiet topic is kept newer than it by the ``id:`` line sent
with the heartbeat.
"""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from gateway.client import stream_url
from gateway.engines.base import (
    EXPIRY_MARGIN,
    Head,
    Position,
    Reset,
    ResetReason,
    check_history,
    expiry_horizon,
)
from publisher.protocol import id_key, id_ms
from tests.conftest import Node, NodeFactory
from tests.support.sse import SSEStream, collect, first_event, open_stream
from tests.support.waiting import let_time_pass_async, wait_until

MAX_AGE = 2.0


def wait_until_expired(node: Node, topic: str, last_id: str, max_age: float = MAX_AGE) -> None:
    """Until ``topic``'s whole history is gone: its stream key for Redis; for the embedded
    engine, which forgets a quiet topic at a publish, one publish to another topic made more
    than the retention age after ``last_id``."""
    timeout = max_age + 10
    if node.redis is not None:
        client, key = node.redis, f"{node.prefix}:s:{topic}"
        wait_until(lambda: not client.exists(key), "the quiet stream to expire", timeout)
        return
    wait_until(
        lambda: id_ms(node.publish("elsewhere", "tick")) > id_ms(last_id) + max_age * 1000,
        "the retention age to pass",
        timeout,
    )


def first_events(node: Node, topics: list[str], count: int, last_event_id: str) -> SSEStream:
    return asyncio.run(
        collect(
            node.url, topics, lambda s: len(s.events) >= count, last_event_id=last_event_id,
            timeout=5,
        )
    )  # fmt: skip


def test_a_position_from_before_a_topic_expired_is_told_reset(node_factory: NodeFactory) -> None:
    """Issue 10 C: a client away for longer than the retention age, whose topic had events
    after its position and then went quiet until its history expired whole, was told nothing
    (no entry was left to reveal the loss)."""
    node = node_factory(max_age=MAX_AGE)
    position = node.publish("t", "seen")
    missed = node.publish("t", "missed")
    wait_until_expired(node, "t", missed)
    node.publish("elsewhere", "the clock moves on")

    stream = first_events(node, ["t"], 1, position)
    reset = stream.events[0]
    assert reset.event == "reset"
    assert orjson.loads(reset.data) == {"reason": "trimmed", "topics": ["t"]}


def test_a_topic_that_expired_and_was_published_again_is_told_reset(
    node_factory: NodeFactory,
) -> None:
    """Issue 10 C: once a quiet topic's history expired, its next event begins a new history
    (its back-link points at nothing), which hid the events lost before it."""
    node = node_factory(max_age=MAX_AGE)
    position = node.publish("t", "seen")
    missed = node.publish("t", "missed")
    wait_until_expired(node, "t", missed)
    again = node.publish("t", "after the expiry")

    stream = first_events(node, ["t"], 2, position)
    reset, event = stream.events[:2]
    assert reset.event == "reset"
    assert orjson.loads(reset.data) == {"reason": "trimmed", "topics": ["t"]}
    assert (event.id, event.data) == (again, "after the expiry")


async def probed(node: Node, stream: SSEStream, topics: str | list[str]) -> str:
    """Once ``stream`` is subscribed, publish one ``probe`` event to ``topics`` and wait for
    it (the stream is then past its replay); its id."""
    return await first_event(stream, lambda: node.publish(topics, "probe", "probe"))


async def events_until_subscribed(node: Node, topics: list[str], position: str) -> list[str]:
    """Connect with ``position``, then publish a ``probe`` event to ``topics`` once subscribed:
    the names of the events before it and of it (a ``reset`` comes first)."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
        stream, task = open_stream(client, node.url, topics, last_event_id=position)
        try:
            await probed(node, stream, topics)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return [e.event for e in stream.events]


def test_a_recent_position_on_a_topic_without_history_is_no_reset(
    node_factory: NodeFactory,
) -> None:
    """Issue 10 C: a position newer than the retention age cannot have missed an event of a
    topic that has no history (that event would have kept the history from expiring)."""
    node = node_factory(max_age=3.0)
    position = node.publish("elsewhere", "recent")
    node.publish("elsewhere", "the clock moves on")

    events = asyncio.run(events_until_subscribed(node, ["never-published"], position))
    assert events[0] == "probe", events


def test_a_live_client_on_a_quiet_topic_keeps_a_position_that_is_not_reset(
    node_factory: NodeFactory,
) -> None:
    """Issue 10 C: a client connected to a quiet topic for longer than the retention age is
    sent its position (an ``id:`` line) with the heartbeat, so its reconnect after the topic's
    history expired is not told ``reset``; reconnecting from its last event instead would be."""
    max_age = 3.0
    node = node_factory("--heartbeat", "0.5", max_age=max_age)

    async def scenario() -> tuple[str, str]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
            busy, busy_task = open_stream(client, node.url, ["busy"])
            quiet, quiet_task = open_stream(client, node.url, ["t"])
            await probed(node, busy, "busy")
            await probed(node, quiet, "t")
            last_event = quiet.events[-1].id
            stop = asyncio.Event()

            async def keep_busy() -> None:
                while not stop.is_set():
                    await asyncio.to_thread(node.publish, "busy", "tick")
                    await let_time_pass_async(0.2, "the busy topic's pace: 5 events a second")

            publishing = asyncio.create_task(keep_busy())
            try:
                await asyncio.to_thread(wait_until_expired, node, "t", last_event, max_age)
                fresh = id_ms(last_event) + max_age * 1000
                await quiet.wait_for(lambda s: id_ms(s.parser.last_id) > fresh, timeout=10)
                position = quiet.parser.last_id
                quiet_task.cancel()
                assert [e.event for e in quiet.events] == ["probe"]
                assert await events_until_subscribed(node, ["t"], position) == ["probe"]
                return last_event, position
            finally:
                stop.set()
                await publishing
                busy_task.cancel()
                quiet_task.cancel()
                await asyncio.gather(busy_task, quiet_task, return_exceptions=True)

    last_event, position = asyncio.run(scenario())
    assert id_key(position) > id_key(last_event)
    stale = asyncio.run(events_until_subscribed(node, ["t"], last_event))
    assert stale[0] == "reset", stale


@pytest.mark.parametrize("engine", ["redis"])
def test_a_quiet_node_keeps_its_clients_positions_up_with_the_clock(
    node_factory: NodeFactory,
) -> None:
    """Issue 10 C: with no subscriber of the busy topics on this node, the self-probe still
    moves the position sent with the heartbeat up to the clock."""
    max_age = 3.0
    node = node_factory("--heartbeat", "0.5", "--probe-interval", "0.3", max_age=max_age)

    async def scenario() -> str:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
            quiet, quiet_task = open_stream(client, node.url, ["t"])
            try:
                await probed(node, quiet, "t")
                last_event = quiet.events[-1].id
                elsewhere = await asyncio.to_thread(node.publish, "elsewhere", "x")
                await quiet.wait_for(lambda s: id_key(s.parser.last_id) >= id_key(elsewhere))
                assert id_key(quiet.parser.last_id) > id_key(last_event)
                return quiet.parser.last_id
            finally:
                quiet_task.cancel()
                await asyncio.gather(quiet_task, return_exceptions=True)

    assert asyncio.run(scenario())


async def body_until_live(node: Node, topics: list[str], position: str) -> bytes:
    """The stream's bytes up to its first heartbeat, which comes once the replay is sent."""
    url = stream_url(node.url, topics, None, None)
    headers = {"accept": "text/event-stream", "last-event-id": position}
    body = b""
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(10, read=5)) as client,
        client.stream("GET", url, headers=headers) as response,
    ):
        async for chunk in response.aiter_raw():
            body += chunk
            if b": ping" in body:
                return body
    raise AssertionError(f"the stream ended before its first heartbeat: {body!r}")


@pytest.mark.parametrize("engine", ["redis"])
def test_a_position_at_the_clock_is_no_reset_however_old(node_factory: NodeFactory) -> None:
    """Issue 10 C: nothing was published after a position at the clock, so nothing can be
    lost after it, however long the whole store was quiet."""
    node = node_factory("--heartbeat", "0.3", max_age=MAX_AGE)
    position = node.publish("t", "the last event anywhere")
    wait_until_expired(node, "t", position)

    body = asyncio.run(body_until_live(node, ["t"], position))
    assert b"event: reset" not in body, body


# -- the rule itself ---------------------------------------------------------------------------

NOW_MS = 10_000_000
CLOCK = id_key(f"{NOW_MS - 5}-0")
ORIGIN = id_key("1-0")


def rule(position: Position, max_age: float, *, unproven: tuple[str, ...] = ("t",)) -> Reset | None:
    horizon = expiry_horizon(Head(CLOCK, ORIGIN, NOW_MS), max_age, 0.0)
    return check_history(
        position, ("t", "u"), CLOCK, ORIGIN, [("t", 0), ("u", 0)], unproven=unproven,
        horizon=horizon,
    )  # fmt: skip


def test_the_rule_resets_positions_older_than_the_retention_age_with_a_margin() -> None:
    """Issue 10 C: the boundary, in the engine's time, errs toward reset by the margin."""
    edge = NOW_MS - 60_000 + int(EXPIRY_MARGIN * 1000)
    assert rule(Position.after(f"{edge - 1}-9"), 60) == Reset(ResetReason.TRIMMED, ("t",))
    assert rule(Position.since(edge - 1), 60) == Reset(ResetReason.TRIMMED, ("t",))
    assert rule(Position.after(f"{edge}-0"), 60) is None
    assert rule(Position.after(f"{edge - 1}-9"), 60, unproven=()) is None
    assert rule(Position.after(f"{edge - 1}-9"), 0) is None, "no age limit: never expires"
    assert rule(Position.after("0-0"), 60) is None, "the beginning asks for what is retained"
    clock = f"{CLOCK >> 64}-0"
    assert rule(Position.after(clock), 1) is None, "nothing was published after the clock"


def test_ids_ahead_of_the_time_move_the_horizon_with_them() -> None:
    """Issue 10 C: a clock set forward issues ids ahead of the engine's time."""
    ahead = Head(id_key(f"{NOW_MS + 50_000}-0"), ORIGIN, NOW_MS)
    horizon = expiry_horizon(ahead, 60, 0.0)
    assert horizon == (NOW_MS + 50_000 - 60_000 + int(EXPIRY_MARGIN * 1000)) << 64
    assert (
        expiry_horizon(Head(CLOCK, ORIGIN, NOW_MS), 60, 2.5)
        == (NOW_MS + 2500 - 60_000 + int(EXPIRY_MARGIN * 1000)) << 64
    )
