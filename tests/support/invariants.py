"""The delivery invariant every scenario ends with: each client got every event published to
its topics exactly once, in id order (a ``reset`` only where history was lost)."""

from __future__ import annotations

import bisect
import collections
import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import redis

from publisher.protocol import key_to_id
from tests.support.clients import Received, SSEClient
from tests.support.publishing import Published, PublisherThread, Publishes
from tests.support.waiting import wait_until

_AFTER_ALL = 1 << 130


# -- the invariant ----------------------------------------------------------------------------


class Ledger:
    """What the publishers know: every acknowledged publish by tag, by id and per topic.

    ``maybe`` names publishes whose delivery is allowed but not required: those that raised
    (they may have been stored), and any the scenario knows Redis itself lost."""

    def __init__(
        self, publishers: Iterable[PublisherThread | Publishes], exclude: Iterable[str] = ()
    ) -> None:
        excluded = set(exclude)
        sources = list(publishers)
        self.by_tag: dict[str, Published] = {}
        self.maybe: set[str] = set(excluded)
        topic_keys: dict[str, list[int]] = collections.defaultdict(list)
        for publisher in sources:
            self.maybe.update(tag for tag, _, _ in publisher.failed)
            for p in publisher.acked:
                if p.tag in excluded:
                    continue
                self.by_tag[p.tag] = p
                for topic in p.topics:
                    topic_keys[topic].append(p.key)
        self.by_key = {p.key: p for p in self.by_tag.values()}
        self.topic_keys = {t: sorted(keys) for t, keys in topic_keys.items()}
        self.failed = sum(len(p.failed) for p in sources)

    def newest(self, topics: Iterable[str]) -> int:
        return max((self.topic_keys[t][-1] for t in topics if self.topic_keys.get(t)), default=0)


def wait_caught_up(clients: Sequence[SSEClient], ledger: Ledger, timeout: float = 45.0) -> float:
    """Wait until every client has received the newest acknowledged event of its topics (or
    the timeout: the invariant then says what is missing). Returns the seconds waited."""
    began = time.monotonic()
    targets = [(client, ledger.newest(client.topics)) for client in clients]
    with contextlib.suppress(TimeoutError):
        wait_until(lambda: all(c.last_key >= t for c, t in targets), "catch-up", timeout, 0.2)
    return time.monotonic() - began


def tag_of(data: str) -> str | None:
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value.get("tag") if isinstance(value, dict) else None


def _reset_topics(reset: Received) -> set[str] | None:
    try:
        return set(json.loads(reset.data)["topics"])
    except (ValueError, KeyError, TypeError):
        return None


def check_client(client: SSEClient, ledger: Ledger, reset_allowed: bool = False) -> list[str]:
    """What is wrong with what ``client`` received (empty when nothing is).

    From its first received event on, each of its topics must have delivered exactly the
    acknowledged publishes of that topic, in id order, none twice, nothing else; a gap is
    allowed only where a ``reset`` naming the topic came in between (and only when resets
    are allowed at all)."""
    label = f"client {client.name} {list(client.topics)}"
    sequence = list(client.received)
    resets = [(i, r) for i, r in enumerate(sequence) if r.event == "reset"]
    events = [(i, r) for i, r in enumerate(sequence) if r.event != "reset"]
    problems: list[str] = []
    if resets and not reset_allowed:
        problems.append(f"{label}: unexpected reset: {[r.data for _, r in resets][:3]}")
    if not events:
        return [*problems, f"{label}: received no events ({client.describe()})"]

    previous: Received | None = None
    for index, r in events:
        if previous is not None and r.key <= previous.key:
            what = "duplicate" if r.key == previous.key else "out-of-order"
            problems.append(f"{label}: {what} id {r.id} after {previous.id} (#{index})")
        previous = r

    mine: dict[str, list[tuple[int, int]]] = {t: [] for t in client.topics}
    for index, r in events:
        tag = tag_of(r.data)
        published = ledger.by_tag.get(tag) if tag else None
        if published is None:
            if tag not in ledger.maybe:
                problems.append(f"{label}: extra event {r.id} {r.data[:60]!r}: never acknowledged")
            continue
        if published.key != r.key:
            problems.append(f"{label}: {tag} arrived as id {r.id}, acknowledged as {published.id}")
        topics = [t for t in published.topics if t in mine]
        if not topics:
            problems.append(f"{label}: extra event {r.id}: published to {list(published.topics)}")
        for topic in topics:
            mine[topic].append((index, published.key))

    first_index, first = events[0]
    for topic in client.topics:
        keys = ledger.topic_keys.get(topic, [])
        last_index, last_key = first_index, first.key - 1
        for index, key in [*mine[topic], (len(sequence), _AFTER_ALL)]:
            lo, hi = bisect.bisect_right(keys, last_key), bisect.bisect_left(keys, key)
            if hi > lo:
                covered = reset_allowed and any(
                    last_index < at < index and topic in (_reset_topics(r) or {topic})
                    for at, r in resets
                )
                if not covered:
                    missing = [ledger.by_key[k].id for k in keys[lo : min(hi, lo + 3)]]
                    where = (
                        "at the end" if key == _AFTER_ALL else f"before {key_to_id(key)}"
                    ) + f" (after {key_to_id(last_key) if index != first_index else 'start'})"
                    problems.append(
                        f"{label}: topic {topic}: {hi - lo} acknowledged events missing {where}; "
                        f"first missing {missing}"
                    )
            last_index, last_key = index, key
    if problems:
        problems.append(f"{label}: state: {client.describe()}")
    return problems


def check_delivery(
    clients: Sequence[SSEClient],
    ledger: Ledger,
    reset_allowed: Callable[[SSEClient], bool] = lambda client: False,
) -> None:
    """Assert the invariant for every client, with a readable account of what went wrong."""
    problems: list[str] = []
    bad = 0
    for client in clients:
        found = check_client(client, ledger, reset_allowed(client))
        if found:
            bad += 1
            problems.extend(found)
    if problems:
        head = (
            f"{bad} of {len(clients)} clients broke the delivery invariant "
            f"({len(ledger.by_tag)} acknowledged publishes, {ledger.failed} failed, "
            f"{len(ledger.maybe)} allowed either way):"
        )
        shown = problems[:40]
        more = f"\n... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise AssertionError(head + "\n" + "\n".join(shown) + more)


def summary(clients: Sequence[SSEClient], ledger: Ledger) -> str:
    """One line on what happened, printed by each scenario (shown with ``-s`` or on failure)."""
    counts = [sum(r.event != "reset" for r in c.received) for c in clients]
    return (
        f"{len(ledger.by_tag)} acked, {ledger.failed} failed publishes; {len(clients)} clients "
        f"received {sum(counts)} events (min {min(counts, default=0)}), "
        f"{sum(c.reconnects for c in clients)} reconnects, "
        f"{sum(len(c.resets) for c in clients)} resets, "
        f"statuses {dict(sum((c.statuses for c in clients), collections.Counter()))}, "
        f"errors {dict(collections.Counter(e[:40] for c in clients for e in c.errors))}"
    )


def stored_tags(client: redis.Redis, prefix: str, topics: Iterable[str]) -> dict[str, list[str]]:
    """Every tag stored in the topics' streams, with the stream ids it is stored under (one
    per topic it was published to)."""
    found: dict[str, list[str]] = collections.defaultdict(list)
    for topic in topics:
        entries: Any = client.xrange(f"{prefix}:s:{topic}", "-", "+")
        for entry_id, fields in entries:
            body = fields[b"f"].decode("utf-8", "replace")
            data = "\n".join(
                line[5:].removeprefix(" ") for line in body.split("\n") if line.startswith("data:")
            )
            tag = tag_of(data)
            if tag:
                found[tag].append(entry_id.decode())
    return found


def socket_peers(pid: int) -> collections.Counter[int]:
    """The TCP sockets a process holds, counted by remote port (0: listening)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    peers: collections.Counter[int] = collections.Counter()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[9] in inodes:
                    peers[int(fields[2].rsplit(":", 1)[1], 16)] += 1
    return peers
