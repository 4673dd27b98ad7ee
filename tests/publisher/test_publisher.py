"""Publishing straight to a real Redis: one atomic script issues a globally ordered id, writes
history and publishes the live frame (docs/architecture.md §3-4)."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import selectors
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from publisher import AsyncPublisher, Publisher, Retention
from publisher.protocol import Keys, encode_body, id_key
from tests.support.redis_server import stream_entries
from tests.support.waiting import WaitTimeout, let_time_pass, wait_until

ID = re.compile(r"(\d+)-(\d+)")


def keys_of(ids: list[str]) -> list[int]:
    return [id_key(i) for i in ids]


def strictly_increasing(values: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(values))


def entries(client: redis.Redis, stream: str) -> list[tuple[str, dict[bytes, bytes]]]:
    return stream_entries(client, stream)


@pytest.fixture
def pub(redis_url: str, prefix: str) -> Iterator[Publisher]:
    with Publisher.from_url(redis_url, prefix=prefix) as publisher:
        yield publisher


def subscribe(client: redis.Redis, *channels: str, pattern: bool = False) -> Any:
    """A pub/sub connection whose subscriptions are confirmed before it is returned."""
    pubsub = client.pubsub()
    if pattern:
        pubsub.psubscribe(*channels)
    else:
        pubsub.subscribe(*channels)
    confirmed = 0
    deadline = time.monotonic() + 5
    while confirmed < len(channels):
        if time.monotonic() > deadline:
            pubsub.close()
            raise AssertionError("subscription not confirmed")
        message = pubsub.get_message(timeout=1)
        if message and message["type"] in ("subscribe", "psubscribe"):
            confirmed += 1
    return pubsub


def receive(pubsub: Any, count: int, timeout: float = 10) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(messages) < count and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message and message["type"] in ("message", "pmessage"):
            messages.append(message)
    return messages


def eventually(predicate: Callable[[], bool], timeout: float = 5) -> bool:
    """Whether ``predicate`` came to hold within ``timeout``."""
    try:
        wait_until(predicate, "a condition", timeout, 0.02)
    except WaitTimeout:
        return False
    return True


def frame_id(frame: bytes) -> str:
    first, _, _ = frame.partition(b"\n")
    assert first.startswith(b"id: "), frame
    return first[4:].decode()


# -- ids ------------------------------------------------------------------------------------


def test_publish_returns_an_id_made_of_redis_time_and_a_sequence(pub: Publisher) -> None:
    before = int(time.time() * 1000)
    event_id = pub.publish("jobs:1", {"progress": 1})
    after = int(time.time() * 1000)
    match = ID.fullmatch(event_id)
    assert match, event_id
    assert before - 2000 <= int(match.group(1)) <= after + 2000


def test_ids_strictly_increase_across_different_topics(pub: Publisher) -> None:
    ids = [pub.publish(f"topic:{i % 3}", i) for i in range(60)]
    assert strictly_increasing(keys_of(ids))


def test_ids_in_one_millisecond_are_ordered_by_the_sequence(
    pub: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    """The script issues max(Redis time, last + 1): while the clock is ahead of Redis time
    (many publishes in one millisecond), the sequence counts up."""
    ahead = int(time.time() * 1000) + 60_000
    redis_client.set(Keys(prefix).clock, f"{ahead}-0")
    ids = [pub.publish(f"seq:{n % 2}", n) for n in range(3)]
    assert ids == [f"{ahead}-1", f"{ahead}-2", f"{ahead}-3"]


def test_ids_from_two_publishers_on_one_redis_share_one_order(redis_url: str, prefix: str) -> None:
    with (
        Publisher.from_url(redis_url, prefix=prefix) as one,
        Publisher.from_url(redis_url, prefix=prefix) as two,
    ):
        ids = []
        for i in range(40):
            ids.append((one if i % 2 else two).publish(f"t{i % 5}", i))
    assert strictly_increasing(keys_of(ids))


# -- history and live envelope --------------------------------------------------------------


def test_publish_to_several_topics_writes_one_id_to_each_stream(
    pub: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    event_id = pub.publish(["a", "b"], {"x": [1, 2]}, event="update")
    body = b'event: update\ndata: {"x":[1,2]}\n\n'
    for topic in ("a", "b"):
        stored = entries(redis_client, keys.stream(topic))
        assert [i for i, _ in stored] == [event_id]
        assert stored[0][1][b"f"] == body
        assert b"id:" not in stored[0][1][b"f"]


def test_history_field_is_the_body_without_the_id_line(
    pub: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    samples: list[tuple[Any, str | None]] = [
        ("plain", None),
        ("two\nlines", "e"),
        ({"k": None}, "json"),
        (7, None),
    ]
    ids = [pub.publish("hist", data, event) for data, event in samples]
    stored = entries(redis_client, Keys(prefix).stream("hist"))
    assert [i for i, _ in stored] == ids
    assert [f[b"f"] for _, f in stored] == [encode_body(d, e) for d, e in samples]


def test_duplicate_topics_in_one_publish_write_one_entry(
    pub: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    pub.publish(["dup", "dup", "other", "dup"], "x")
    assert redis_client.xlen(Keys(prefix).stream("dup")) == 1
    assert redis_client.xlen(Keys(prefix).stream("other")) == 1


def test_live_envelope_is_the_id_line_followed_by_the_stored_body(
    pub: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    pubsub = subscribe(redis_client, keys.channel("a"), keys.channel("b"))
    try:
        event_id = pub.publish(["a", "b"], "line 1\nline 2", event="log")
        messages = receive(pubsub, 2)
    finally:
        pubsub.close()
    body = b"event: log\ndata: line 1\ndata: line 2\n\n"
    assert sorted(m["channel"] for m in messages) == [
        keys.channel("a").encode(),
        keys.channel("b").encode(),
    ]
    for message in messages:
        assert message["data"] == b"id: " + event_id.encode() + b"\n" + body
    stored = entries(redis_client, keys.stream("a"))
    assert messages[0]["data"] == b"id: " + stored[0][0].encode() + b"\n" + stored[0][1][b"f"]


def test_no_envelope_goes_to_topics_that_were_not_published(
    pub: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    pubsub = subscribe(redis_client, f"{prefix}:c:*", pattern=True)
    try:
        pub.publish("only", 1)
        messages = receive(pubsub, 2, timeout=1)
    finally:
        pubsub.close()
    assert [m["channel"] for m in messages] == [Keys(prefix).channel("only").encode()]


# -- publish_many ---------------------------------------------------------------------------


def test_publish_many_returns_increasing_ids_in_order(
    pub: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    ids = pub.publish_many([("m:a", 1), ("m:b", {"two": 2}, "second"), (["m:a", "m:b"], "3")])
    assert len(ids) == 3
    assert strictly_increasing(keys_of(ids))
    assert [i for i, _ in entries(redis_client, keys.stream("m:a"))] == [ids[0], ids[2]]
    stored_b = entries(redis_client, keys.stream("m:b"))
    assert [i for i, _ in stored_b] == [ids[1], ids[2]]
    assert stored_b[0][1][b"f"] == b'event: second\ndata: {"two":2}\n\n'


def test_publish_many_of_nothing_returns_no_ids(pub: Publisher) -> None:
    assert pub.publish_many([]) == []


def test_publish_many_validates_every_event_before_sending_any(
    pub: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    with pytest.raises(ValueError, match="invalid topic"):
        pub.publish_many([("ok", 1), ("bad topic", 2)])
    assert redis_client.exists(Keys(prefix).stream("ok")) == 0


class TurnCounter:
    """A TCP relay to Redis counting request turns: bursts of client bytes between replies.

    One round trip is one turn; a client that waits for a reply before sending more makes
    one turn per wait."""

    def __init__(self, redis_url: str) -> None:
        parts = urlsplit(redis_url)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 6379)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.turns = 0
        self._client_spoke_last = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="turn-counter", daemon=True)
        self._thread.start()

    def url(self, redis_url: str) -> str:
        parts = urlsplit(redis_url)
        return parts._replace(netloc=f"127.0.0.1:{self.port}").geturl()

    def reset(self) -> None:
        self.turns = 0
        self._client_spoke_last = False

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self.listener, selectors.EVENT_READ, None)
        sockets: list[socket.socket] = [self.listener]
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.05):
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    if key.data is None:
                        client, _ = sock.accept()
                        server = socket.create_connection(self.upstream)
                        selector.register(client, selectors.EVENT_READ, (server, True))
                        selector.register(server, selectors.EVENT_READ, (client, False))
                        sockets += [client, server]
                        continue
                    peer, from_client = key.data
                    data = sock.recv(65536)
                    if not data:
                        selector.unregister(sock)
                        selector.unregister(peer)
                        continue
                    if from_client and not self._client_spoke_last:
                        self.turns += 1
                    self._client_spoke_last = from_client
                    peer.sendall(data)
        finally:
            selector.close()
            for sock in sockets:
                sock.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.fixture
def relay(redis_url: str) -> Iterator[TurnCounter]:
    counter = TurnCounter(redis_url)
    yield counter
    counter.close()


def test_publish_is_one_round_trip_once_the_script_is_loaded(
    relay: TurnCounter, redis_url: str, prefix: str
) -> None:
    with Publisher.from_url(relay.url(redis_url), prefix=prefix) as publisher:
        publisher.publish("warm", 0)
        relay.reset()
        publisher.publish("rt", 1)
        assert relay.turns == 1


def test_publish_many_is_one_round_trip(relay: TurnCounter, redis_url: str, prefix: str) -> None:
    with Publisher.from_url(relay.url(redis_url), prefix=prefix) as publisher:
        publisher.publish_many([("warm", 0), ("warm", 1)])
        relay.reset()
        ids = publisher.publish_many([(f"rt:{i}", i) for i in range(5)])
        assert len(ids) == 5
        assert relay.turns == 1


def test_async_publish_many_is_one_round_trip(
    relay: TurnCounter, redis_url: str, prefix: str
) -> None:
    async def scenario() -> int:
        async with AsyncPublisher.from_url(relay.url(redis_url), prefix=prefix) as publisher:
            await publisher.publish_many([("warm", 0), ("warm", 1)])
            relay.reset()
            await publisher.publish_many([(f"rt:{i}", i) for i in range(5)])
            return relay.turns

    assert asyncio.run(scenario()) == 1


# -- lifecycle and asyncio ------------------------------------------------------------------


def test_publisher_context_manager_closes_its_connection(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    name = f"pub-{prefix}"

    def connected() -> bool:
        return any(c["name"] == name for c in redis_client.client_list())

    with Publisher.from_url(f"{redis_url}?client_name={name}", prefix=prefix) as publisher:
        publisher.publish("cm", 1)
        assert connected()
    assert eventually(lambda: not connected()), "the connection is closed on exit"


def test_async_publisher_gives_the_same_results(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    keys = Keys(prefix)
    name = f"apub-{prefix}"

    async def scenario() -> tuple[str, str, list[str], bool]:
        url = f"{redis_url}?client_name={name}"
        async with AsyncPublisher.from_url(url, prefix=prefix) as publisher:
            one = await publisher.publish("as:a", {"n": 1}, event="e")
            both = await publisher.publish(["as:a", "as:b"], "two\nlines")
            many = await publisher.publish_many([("as:b", 3), (["as:a", "as:a"], 4)])
            was_connected = any(c["name"] == name for c in redis_client.client_list())
        return one, both, many, was_connected

    pubsub = subscribe(redis_client, keys.channel("as:b"))
    try:
        one, both, many, was_connected = asyncio.run(scenario())
        live = receive(pubsub, 2)
    finally:
        pubsub.close()
    assert was_connected
    assert eventually(lambda: all(c["name"] != name for c in redis_client.client_list()))
    ids = [one, both, *many]
    assert all(ID.fullmatch(i) for i in ids)
    assert strictly_increasing(keys_of(ids))
    stored_a = entries(redis_client, keys.stream("as:a"))
    assert [i for i, _ in stored_a] == [one, both, many[1]]
    assert [f[b"f"] for _, f in stored_a] == [
        b'event: e\ndata: {"n":1}\n\n',
        b"data: two\ndata: lines\n\n",
        b"data: 4\n\n",
    ]
    assert [i for i, _ in entries(redis_client, keys.stream("as:b"))] == [both, many[0]]
    assert [m["data"] for m in live] == [
        f"id: {both}\ndata: two\ndata: lines\n\n".encode(),
        f"id: {many[0]}\ndata: 3\n\n".encode(),
    ]


def test_sync_and_async_publishers_share_one_order(redis_url: str, prefix: str) -> None:
    async def scenario() -> list[str]:
        ids = []
        async with AsyncPublisher.from_url(redis_url, prefix=prefix) as apub:
            with Publisher.from_url(redis_url, prefix=prefix) as spub:
                for i in range(20):
                    ids.append(await apub.publish("x", i) if i % 2 else spub.publish("y", i))
        return ids

    assert strictly_increasing(keys_of(asyncio.run(scenario())))


# -- retention ------------------------------------------------------------------------------


def test_retention_options_are_validated() -> None:
    with pytest.raises(ValueError, match="max_events"):
        Retention(max_events=0)
    with pytest.raises(ValueError, match="max_age"):
        Retention(max_age=-1)


def test_max_events_keeps_at_least_that_many_and_trims_the_oldest(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    stream = Keys(prefix).stream("busy")
    with Publisher.from_url(redis_url, prefix=prefix, retention=Retention(max_events=10)) as p:
        ids = [p.publish("busy", i) for i in range(250)]
        length_midway = redis_client.xlen(stream)
        ids += [p.publish("busy", i) for i in range(250, 500)]
    kept = [i for i, _ in entries(redis_client, stream)]
    assert 10 <= len(kept) < 250, len(kept)
    assert 10 <= length_midway < 250, length_midway
    assert kept == ids[-len(kept) :], "only the newest events are kept"


def test_each_entry_names_the_previous_entry_of_its_stream_so_trimming_is_visible(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    """What a reader needs to tell that events after its position were trimmed (Redis does not
    move max-deleted-entry-id when it trims): each entry points back at the entry before it
    in the same stream, so the first retained entry points at an id the stream lost."""
    from publisher.protocol import PREV_FIELD

    prev = PREV_FIELD.encode()
    keys = Keys(prefix)
    with Publisher.from_url(redis_url, prefix=prefix, retention=Retention(max_events=10)) as p:
        ids = [p.publish("chain" if n % 3 else "other", n) for n in range(600)]
        untrimmed = [p.publish("short", n) for n in range(3)]
    published = {
        "chain": [i for n, i in enumerate(ids) if n % 3],
        "other": [i for n, i in enumerate(ids) if not n % 3],
    }
    for topic, topic_ids in published.items():
        kept = entries(redis_client, keys.stream(topic))
        assert len(kept) < len(topic_ids), "the stream was trimmed"
        first = topic_ids.index(kept[0][0])
        assert kept[0][1][prev].decode() == topic_ids[first - 1], "points at the newest trimmed id"
        for (before, _), (_, fields) in itertools.pairwise(kept):
            assert fields[prev].decode() == before, "each entry points at its predecessor"
    short = entries(redis_client, keys.stream("short"))
    assert [f[prev].decode() for _, f in short] == ["0-0", *untrimmed[:2]]


def test_max_age_trims_old_events_on_the_next_publish(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    """While a topic is published to, its stream lives on and old events go at the next
    publish; the stream itself expires once the topic is quiet for max_age."""
    stream = Keys(prefix).stream("aging")
    retention = Retention(max_events=1000, max_age=1.0)
    with Publisher.from_url(redis_url, prefix=prefix, retention=retention) as p:
        old = [p.publish("aging", i) for i in range(5)]
        let_time_pass(0.6, "the first events age")
        alive = p.publish("aging", "keeps the stream alive")
        let_time_pass(0.6, "the first events pass max_age")
        held = [i for i, _ in entries(redis_client, stream)]
        assert held == [*old, alive], "nothing trims by itself"
        fresh = [p.publish("aging", "a"), p.publish("aging", "b")]
    kept = [i for i, _ in entries(redis_client, stream)]
    assert kept == [alive, *fresh], f"events older than max_age are still there: {kept}"


def test_max_age_zero_keeps_old_events(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    stream = Keys(prefix).stream("ageless")
    with Publisher.from_url(redis_url, prefix=prefix, retention=Retention(max_age=0)) as p:
        old = p.publish("ageless", 1)
        let_time_pass(0.3, "the first event ages")
        new = p.publish("ageless", 2)
    assert [i for i, _ in entries(redis_client, stream)] == [old, new]


# -- clock and origin -----------------------------------------------------------------------


def test_a_lost_clock_never_issues_an_id_below_what_the_streams_hold(
    pub: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    # Put the clock an hour ahead of Redis time, as after a failover to a slower clock.
    ahead = f"{int(time.time() * 1000) + 3_600_000}-5"
    redis_client.set(keys.clock, ahead)
    last = pub.publish("kept", "before the loss")
    assert id_key(last) > id_key(ahead)

    redis_client.delete(keys.clock)
    after_loss = pub.publish("kept", "after the loss")
    assert id_key(after_loss) > id_key(last)

    redis_client.delete(keys.clock)
    multi = pub.publish(["brand-new", "kept"], "a new topic listed first")
    assert id_key(multi) > id_key(after_loss)
    assert [i for i, _ in entries(redis_client, keys.stream("kept"))] == [last, after_loss, multi]
    assert redis_client.get(keys.clock) == multi.encode()


def test_the_clock_holds_the_last_issued_id(
    pub: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    for i in range(3):
        event_id = pub.publish("clk", i)
        assert redis_client.get(Keys(prefix).clock) == event_id.encode()


def test_origin_is_set_at_the_first_publish_and_never_changed(
    pub: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    assert redis_client.get(keys.origin) is None
    first = pub.publish("o:a", 1)
    assert redis_client.get(keys.origin) == first.encode()
    pub.publish("o:b", 2)
    pub.publish_many([("o:a", 3), ("o:c", 4)])
    redis_client.delete(keys.clock)
    pub.publish("o:a", 5)
    assert redis_client.get(keys.origin) == first.encode()


# -- the acceptance item: one order across processes ----------------------------------------

PUBLISHER_PROCESS = textwrap.dedent(
    """
    import json, sys
    from publisher import Publisher

    url, prefix, topic, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    with Publisher.from_url(url, prefix=prefix) as pub:
        print("ready", flush=True)
        sys.stdin.readline()
        ids = [pub.publish(topic, {"n": n, "topic": topic}) for n in range(count)]
    print(json.dumps(ids), flush=True)
    """
)


def test_ids_strictly_increase_across_topics_and_processes_in_commit_order(
    redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    count = 500
    topics = ("proc:one", "proc:two")
    listener = subscribe(redis_client, f"{prefix}:c:*", pattern=True)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PUBLISHER_PROCESS, redis_url, prefix, topic, str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for topic in topics
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready", process.stderr
        for process in processes:  # release both at once
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        received = receive(listener, 2 * count, timeout=60)
        outputs = [process.communicate(timeout=60) for process in processes]
    finally:
        listener.close()
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err

    per_process = [json.loads(out) for out, _ in outputs]
    for ids in per_process:
        assert len(ids) == count
        assert strictly_increasing(keys_of(ids)), "each process sees its ids increase"
    all_ids = per_process[0] + per_process[1]
    assert len(set(all_ids)) == 2 * count, "no id is issued twice"

    live_ids = [frame_id(m["data"]) for m in received]
    assert len(live_ids) == 2 * count
    assert strictly_increasing(keys_of(live_ids)), "arrival order is id order"
    assert set(live_ids) == set(all_ids)
    for topic, ids in zip(topics, per_process, strict=True):
        channel = Keys(prefix).channel(topic).encode()
        assert [frame_id(m["data"]) for m in received if m["channel"] == channel] == ids

    first, second = keys_of(per_process[0]), keys_of(per_process[1])
    assert first[0] < second[-1], "the publishers ran concurrently"
    assert second[0] < first[-1], "the publishers ran concurrently"


def test_importing_the_publisher_does_not_import_the_gateway_stack() -> None:
    code = textwrap.dedent(
        """
        import sys
        import publisher
        publisher.Publisher.from_url("http://127.0.0.1:9")
        heavy = {"starlette", "gateway", "uvicorn", "prometheus_client", "jwt"}
        print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
