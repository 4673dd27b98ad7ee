"""Scenario 9: retention is exceeded on purpose. Some clients go away while far more events are
published than the topics keep; when they come back with their old Last-Event-ID they get
``event: reset`` (reason ``trimmed``, naming their topics), then what is still retained, then
live events: a gap only where a reset says so, never a silent one."""

from __future__ import annotations

import contextlib
import json

import pytest

from publisher import Retention
from publisher.protocol import id_key
from tests.chaos.harness import Chaos
from tests.support.clients import spread_topics, wait_connected
from tests.support.invariants import Ledger, check_delivery, summary, wait_caught_up
from tests.support.waiting import let_time_pass

TOPICS = ["keep0", "keep1", "keep2"]


@pytest.mark.chaos
def test_clients_back_after_retention_get_reset_then_retained_then_live(chaos: Chaos) -> None:
    server = chaos.redis()
    nodes = [chaos.node(server.url, "--max-events", "20") for _ in range(2)]
    lb = chaos.load_balancer(nodes)
    clients = chaos.clients(lb.port, spread_topics(TOPICS, 60))
    wait_connected(clients)
    away = clients[::3]
    publisher = chaos.publisher(
        server.url, TOPICS, rate=150, retention=Retention(max_events=20)
    ).start()

    let_time_pass(2, "events flow before some clients leave")
    chaos.pool.pause(away)
    left_at = {c.name: c.last_key for c in away}
    assert all(left_at.values()), "a client left before it received anything"
    # 'MAXLEN ~ 20' trims whole stream nodes (100 entries): publish several nodes' worth.
    let_time_pass(6, "several stream nodes of events while they are away")
    with contextlib.closing(server.client()) as admin:
        lengths = {t: admin.xlen(f"{chaos.prefix}:s:{t}") for t in TOPICS}
        clock = admin.get(f"{chaos.prefix}:clock")
        assert isinstance(clock, bytes)
        back_at = id_key(clock)
    chaos.pool.resume(away)
    let_time_pass(3, "events flow after they come back")
    publisher.stop()

    ledger = Ledger([publisher])
    wait_caught_up(clients, ledger)
    print(summary(clients, ledger), f"stream lengths {lengths}")
    published = {t: len(ledger.topic_keys[t]) for t in TOPICS}
    assert all(lengths[t] < published[t] - 200 for t in TOPICS), (lengths, published)
    check_delivery(clients, ledger, reset_allowed=lambda c: c in away)

    for client in away:
        resets = client.resets
        assert len(resets) == 1, client.describe()
        body = json.loads(resets[0].data)
        assert body["reason"] == "trimmed", body
        assert set(body["topics"]) == set(client.topics), (body, client.topics)
        at = client.received.index(resets[0])
        after = client.received[at + 1 :]
        before = client.received[:at]
        assert before
        assert before[-1].key == left_at[client.name]
        # Retained history first (published while it was away), then live events.
        assert after, client.describe()
        assert after[0].key <= back_at, "nothing retained was replayed after the reset"
        assert after[-1].key > back_at, "no live event after the replay"
        # The gap is real: events after its position were trimmed away before it came back.
        assert any(
            left_at[client.name] < k < after[0].key
            for t in client.topics
            for k in ledger.topic_keys[t]
        )
    for client in clients:
        if client not in away:
            assert not client.reconnects, client.describe()
