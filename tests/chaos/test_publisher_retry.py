"""Scenario 6: publish replies are lost. A proxy between the publisher and Redis forwards some
publish commands, lets Redis run them, then cuts the connection instead of forwarding the
reply. The publisher (``retry_for``) retries with the same idempotency key and gets the
original id back: Redis holds the event once, under that id, and subscribers see it once. An
explicit ``idempotency_key`` published twice is also one event."""

from __future__ import annotations

import contextlib

import pytest

from publisher import Publisher
from publisher.protocol import id_key
from tests.chaos.harness import Chaos
from tests.support.clients import spread_topics, wait_connected
from tests.support.invariants import Ledger, check_delivery, stored_tags, summary, wait_caught_up
from tests.support.publishing import Published, Publishes
from tests.support.waiting import WaitTimeout, let_time_pass, wait_until

TOPICS = [f"retry{i}" for i in range(5)]
CUT_AT = (10, 30, 31, 60, 120)
"""Publish commands whose reply is lost; 31 is the retry of 30, lost as well."""


@pytest.mark.chaos
def test_lost_publish_replies_are_retried_without_duplicates(chaos: Chaos) -> None:
    server = chaos.redis()
    cutter = chaos.reply_cutter(server.port, CUT_AT)
    nodes = [chaos.node(server.url) for _ in range(2)]
    lb = chaos.load_balancer(nodes)
    clients = chaos.clients(lb.port, spread_topics(TOPICS, 60))
    wait_connected(clients)
    publisher = chaos.publisher(cutter.url, TOPICS, rate=50, retry_for=30).start()

    manual = Publishes()
    let_time_pass(1, "events flow before the direct publishes")
    with Publisher.from_url(server.url, prefix=chaos.prefix, retry_for=30) as direct:
        data = {"tag": "explicit-1", "pad": ""}
        first = direct.publish(TOPICS[0], data, idempotency_key="chaos-explicit-1")
        again = direct.publish(TOPICS[0], data, idempotency_key="chaos-explicit-1")
    assert first == again, "the same idempotency key published twice gave two ids"
    manual.acked.append(Published("explicit-1", first, id_key(first), (TOPICS[0],)))

    with contextlib.suppress(WaitTimeout):  # the ledger below says what was lost
        wait_until(lambda: cutter.evals >= max(CUT_AT) + 20, "the cuts and 20 more", 30, 0.2)
    publisher.stop()

    ledger = Ledger([publisher, manual])
    wait_caught_up(clients, ledger)
    print(summary(clients, ledger), f"replies cut for {cutter.cut}, evals {cutter.evals}")
    assert len(cutter.cut) == len(CUT_AT), f"cut {cutter.cut}, evals {cutter.evals}"
    assert not publisher.failed, f"publishes failed despite retry_for: {publisher.failed[:3]}"

    with contextlib.closing(server.client()) as admin:
        stored = stored_tags(admin, chaos.prefix, TOPICS)
    for tag in {*cutter.cut, "explicit-1"}:
        published = ledger.by_tag.get(tag)
        assert published is not None, f"{tag}: reply lost and never acknowledged"
        assert stored.get(tag) == [published.id] * len(published.topics), (
            f"{tag}: acknowledged as {published.id}, stored as {stored.get(tag)}"
        )
    wrong = {
        p.tag: stored.get(p.tag)
        for p in ledger.by_tag.values()
        if stored.get(p.tag) != [p.id] * len(p.topics)
    }
    assert not wrong, f"{len(wrong)} publishes not stored once under their id: {wrong}"
    assert set(stored) <= set(ledger.by_tag), "Redis holds events nobody acknowledged"
    check_delivery(clients, ledger)
