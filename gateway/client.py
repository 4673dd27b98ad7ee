"""``tail``, and the WHATWG parser (:mod:`publisher.sse`) that tests and tools share.

``tail`` reads with :class:`publisher.subscriber.Subscription`: it reconnects like
``/client.js``, resuming with ``Last-Event-ID``, and never prints an event twice.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
from collections.abc import Callable, Sequence

from publisher.sse import EventParser, ServerEvent
from publisher.subscriber import Event, Subscription, SubscriptionError

__all__ = ["EventParser", "ServerEvent", "format_event", "stream_url", "tail"]


def stream_url(base: str, topics: Sequence[str], since: int | None, types: str | None) -> str:
    query: list[tuple[str, str]] = [("topic", t) for t in topics]
    if since is not None:
        query.append(("since", str(since)))
    if types:
        query.append(("types", types))
    return base.rstrip("/") + "/events?" + urllib.parse.urlencode(query)


def format_event(event: Event, json_lines: bool = False) -> str:
    """``id<TAB>event<TAB>data``, each further line of the data indented by two tabs (so it
    reads as part of its event); or, with ``json_lines``, one JSON object."""
    if json_lines:
        return json.dumps({"id": event.id, "event": event.type, "data": event.data})
    first, *rest = event.data.split("\n")
    return "\n".join([f"{event.id}\t{event.type}\t{first}", *(f"\t\t{line}" for line in rest)])


def tail(
    base_url: str,
    topics: Sequence[str],
    *,
    last_event_id: str | None = None,
    since: int | None = None,
    types: str | None = None,
    count: int | None = None,
    token: str | None = None,
    json_lines: bool = False,
    out: Callable[[str], None] = print,
) -> int:
    """Print events until interrupted (or ``count`` events); 1 when the gateway refuses the
    stream for good (a 400, 401 or 403). Reconnects, resumes and backs off like
    :mod:`publisher.subscriber`, which it uses."""
    seen = 0
    try:
        sub = Subscription(
            base_url, topics, token=token, last_event_id=last_event_id, since=since,
            types=[t for t in (types or "").split(",") if t],
        )  # fmt: skip
    except ValueError as exc:
        print(f"tail: {exc}", file=sys.stderr)
        return 2
    try:
        for event in sub:
            out(format_event(event, json_lines))
            seen += 1
            if count is not None and seen >= count:
                return 0
    except SubscriptionError as exc:
        print(f"tail: {exc}", file=sys.stderr)
        return 1
    finally:
        sub.close()
    return 0
