"""Issue 11, acceptance 3 in the browser: a snapshot, then ``/client.js`` from its position.

The app reads ``position()``, then its state; events are published meanwhile; the page then
subscribes with ``lastEventId`` set to the position. On both engines, through both publisher
transports and with both client transports (``eventsource`` sends the position as
``lastEventID`` in the URL, ``fetch`` as a ``Last-Event-ID`` header), the page gets exactly
the events published after the read, first and once each, then the live ones."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from publisher import Publisher
from publisher.protocol import id_key
from tests.browser.test_client_js import follow, rec, wait_seqs, wait_status
from tests.conftest import Node


@pytest.fixture(params=["redis", "http"])
def publisher(request: pytest.FixtureRequest, node: Node) -> Iterator[Publisher]:
    if request.param == "redis" and node.engine != "redis":
        pytest.skip("a Redis publisher reaches only the Redis engine")
    pub = node.new_publisher() if request.param == "redis" else Publisher.from_url(node.url)
    yield pub
    pub.close()


@pytest.fixture
def context(browser: Any, node: Node) -> Iterator[Any]:
    """Closed before the node stops, so it has no stream left to drain."""
    ctx = browser.new_context()
    yield ctx
    ctx.close()


@pytest.mark.parametrize("client_transport", ["eventsource", "fetch"])
def test_a_page_opened_at_a_snapshot_s_position_gets_what_came_after_first_and_once(
    context: Any, node: Node, publisher: Publisher, client_transport: str
) -> None:
    """Issue 11 acceptance 3: events published between ``position()`` and the page's
    ``subscribe({lastEventId: position})`` arrive first, exactly once, then the live ones;
    none from before the position."""
    topic = f"snap:{uuid.uuid4().hex[:8]}"
    publisher.publish_many([(topic, {"seq": -2}, "n"), (topic, {"seq": -1}, "n")])
    position = publisher.position(topic)
    between = [publisher.publish(topic, {"seq": seq}, "n") for seq in range(3)]
    between += publisher.publish_many([(topic, {"seq": seq}, "n") for seq in range(3, 6)])
    assert all(id_key(event_id) > id_key(position) for event_id in between)

    page = follow(
        context, node.gateway, topics=[topic], lastEventId=position, transport=client_transport
    )
    wait_seqs(page, 6)
    wait_status(page, "open")
    live = [publisher.publish(topic, {"seq": seq}, "n") for seq in range(6, 9)]
    wait_seqs(page, 9)

    record = rec(page)
    assert record["seqs"] == list(range(9)), record
    assert record["ids"] == between + live, record
    assert record["errors"] == [], record
    assert [status for status, _ in record["statuses"]] == ["connecting", "open"], record
    assert page.evaluate("() => window.sub.lastEventId") == live[-1]
