"""What a refused ``GET /events`` looks like to an ``EventSource``: a finished 200 event stream
with a jittered ``retry:``, a comment and ``event: refused`` naming the reason, and no ``id:``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from gateway.client import EventParser

EVENT_STREAM = {"accept": "text/event-stream"}


@dataclass(frozen=True)
class Refusal:
    reason: str
    retry_ms: int
    data: dict[str, Any]
    comments: tuple[str, ...]


def parse_refusal(status: int, headers: httpx.Headers, body: bytes) -> Refusal:
    """The refusal in a finished response, checked: 200, an event stream, exactly one
    ``refused`` event, the ``retry:`` it announces, and no ``id:`` line anywhere."""
    shown = f"{status} {body[:500]!r}"
    assert status == 200, shown
    assert headers["content-type"].startswith("text/event-stream"), shown
    assert b"\nid:" not in b"\n" + body, f"a refusal must not move the client's id: {shown}"
    parser = EventParser()
    events = parser.feed(body)
    refused = [e for e in events if e.event == "refused"]
    assert len(refused) == 1, shown
    assert parser.last_id == "", shown
    data = orjson.loads(refused[0].data)
    assert isinstance(data.get("message"), str), data
    assert data["message"], data
    assert parser.retry == data["retry_ms"], shown
    assert any(c == f"refused: {data['reason']}" for c in parser.comments), shown
    return Refusal(data["reason"], data["retry_ms"], data, tuple(parser.comments))


def refusal_of(response: httpx.Response) -> Refusal:
    return parse_refusal(response.status_code, response.headers, response.read())
