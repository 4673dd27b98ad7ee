"""When history cannot be replayed in full, the page is told: ``event: reset`` first, then
what is retained (docs/architecture.md §4). A malformed id is a 400."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest
import redis

from publisher import Publisher
from tests.conftest import GatewayFactory, Node, NodeFactory
from tests.support.redis_server import stream_entries
from tests.support.sse import SSEStream, collect


def read_after(node: Node, last_event_id: str, until_id: str) -> SSEStream:
    return asyncio.run(
        collect(
            node.url,
            ["t"],
            lambda s: bool(s.events) and s.events[-1].id == until_id,
            last_event_id=last_event_id,
        )
    )


def test_trimmed_history_sends_reset_then_everything_still_retained(
    node_factory: NodeFactory,
) -> None:
    node = node_factory(max_events=5)
    ids = [node.publish("t", {"seq": seq}) for seq in range(400)]
    if node.redis is not None:
        retained = [entry_id for entry_id, _ in stream_entries(node.redis, f"{node.prefix}:s:t")]
    else:
        retained = ids[-5:]
    assert 5 <= len(retained) < 400

    stream = read_after(node, ids[0], ids[-1])
    reset, *rest = stream.events
    assert reset.event == "reset"
    assert orjson.loads(reset.data) == {"reason": "trimmed", "topics": ["t"]}
    assert [e.id for e in rest] == retained
    assert [orjson.loads(e.data)["seq"] for e in rest] == list(range(400 - len(retained), 400))


def test_position_inside_retained_history_is_no_reset(node_factory: NodeFactory) -> None:
    node = node_factory(max_events=5)
    ids = [node.publish("t", {"seq": seq}) for seq in range(400)]
    stream = read_after(node, ids[-3], ids[-1])
    assert [e.event for e in stream.events] == ["message", "message"]


def test_lost_history_sends_reset_then_the_new_events(node: Node) -> None:
    """Redis flushed (or the embedded engine restarted): ids from before are unknown."""
    old = [node.publish("t", {"seq": seq}) for seq in range(3)]
    forget_history(node)
    new = [node.publish("t", {"seq": seq}) for seq in range(3, 6)]

    stream = read_after(node, old[1], new[-1])
    reset, *rest = stream.events
    assert reset.event == "reset"
    assert orjson.loads(reset.data) == {"reason": "history_lost", "topics": ["t"]}
    assert [e.id for e in rest] == new


def test_reset_with_nothing_to_replay_carries_an_id_so_it_is_not_repeated(node: Node) -> None:
    old = node.publish("t", "before")
    forget_history(node)

    stream = asyncio.run(collect(node.url, ["t"], lambda s: len(s.events) >= 1, last_event_id=old))
    (reset,) = stream.events
    assert reset.event == "reset"
    assert reset.id == "0-0"

    new = node.publish("t", "after")
    resumed = read_after(node, reset.id, new)
    assert [(e.event, e.data) for e in resumed.events] == [("message", "after")]


def test_an_id_newer_than_the_clock_is_a_reset_to_the_current_position(node: Node) -> None:
    current = node.publish("t", "x")
    ms = int(current.split("-")[0])
    future = f"{ms + 3_600_000}-0"

    stream = asyncio.run(
        collect(node.url, ["t"], lambda s: len(s.events) >= 1, last_event_id=future)
    )
    (reset,) = stream.events
    assert reset.event == "reset"
    assert orjson.loads(reset.data)["reason"] == "future_id"
    assert reset.id == current


@pytest.mark.parametrize(
    "bad_id", ["abc", "1-2-3", "-1-0", "1_0", "1-", "99999999999999999999999-0", "\uff11-0"]
)
def test_a_malformed_id_is_a_400_with_a_json_error(node: Node, bad_id: str) -> None:
    for request in (
        {"params": {"topic": "t"}, "headers": {"last-event-id": bad_id.encode()}},
        {"params": {"topic": "t", "lastEventID": bad_id}},
    ):
        response = httpx.get(node.url + "/events", timeout=5, **request)
        assert response.status_code == 400
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"] == "invalid_last_event_id"


def forget_history(node: Node) -> None:
    if node.redis is not None:
        node.redis.flushall()
    else:
        node.gateway.stop()
        node.gateway.start()


def test_a_reset_names_only_the_topics_that_lost_history(node_factory: NodeFactory) -> None:
    node = node_factory(max_events=5)
    start = node.publish(["busy", "calm"], {"seq": "both"})
    calm = [node.publish("calm", {"calm": n}) for n in range(3)]
    for n in range(400):
        node.publish("busy", {"busy": n})
    last = node.publish("calm", {"calm": 3})

    stream = asyncio.run(
        collect(
            node.url,
            ["busy", "calm"],
            lambda s: bool(s.events) and s.events[-1].id == last,
            last_event_id=start,
        )
    )
    reset, *rest = stream.events
    assert reset.event == "reset"
    assert orjson.loads(reset.data) == {"reason": "trimmed", "topics": ["busy"]}
    ids = [e.id for e in rest]
    assert ids == sorted(ids)
    assert set(calm) <= set(ids)
    assert ids[-1] == last


def test_an_entry_deleted_from_the_middle_of_history_is_a_reset(
    redis_url: str, gateway_factory: GatewayFactory, prefix: str
) -> None:
    gateway = gateway_factory("--prefix", prefix, redis_url=redis_url)
    with Publisher.from_url(redis_url, prefix=prefix) as pub:
        ids = [pub.publish("t", {"seq": seq}) for seq in range(6)]
    with redis.Redis.from_url(redis_url) as client:
        client.xdel(f"{prefix}:s:t", ids[3])

    node = Node("redis", gateway, None)  # type: ignore[arg-type]
    stream = read_after(node, ids[1], ids[-1])
    assert stream.events[0].event == "reset"
    assert orjson.loads(stream.events[0].data)["reason"] == "trimmed"
    assert [e.id for e in stream.events[1:]] == [ids[2], ids[4], ids[5]]


def test_the_largest_possible_id_is_a_future_reset_not_an_error(node: Node) -> None:
    current = node.publish("t", "x")
    top = "18446744073709551615-18446744073709551615"
    stream = asyncio.run(collect(node.url, ["t"], lambda s: len(s.events) >= 1, last_event_id=top))
    (reset,) = stream.events
    assert reset.event == "reset"
    assert orjson.loads(reset.data)["reason"] == "future_id"
    assert reset.id == current
