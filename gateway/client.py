"""``tail``, and the WHATWG parser (:mod:`publisher.sse`) that tests and tools share.

``tail`` reconnects like a browser's EventSource: after the announced ``retry`` delay, with the
last id it saw as ``Last-Event-ID``.
"""

from __future__ import annotations

import http.client
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence

from publisher.sse import EventParser, ServerEvent

__all__ = ["EventParser", "ServerEvent", "stream_url", "tail"]


def stream_url(base: str, topics: Sequence[str], since: int | None, types: str | None) -> str:
    query: list[tuple[str, str]] = [("topic", t) for t in topics]
    if since is not None:
        query.append(("since", str(since)))
    if types:
        query.append(("types", types))
    return base.rstrip("/") + "/events?" + urllib.parse.urlencode(query)


def tail(
    base_url: str,
    topics: Sequence[str],
    *,
    last_event_id: str | None = None,
    since: int | None = None,
    types: str | None = None,
    count: int | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """Print events as ``id<TAB>event<TAB>data`` until interrupted (or ``count`` events)."""
    parts = urllib.parse.urlsplit(stream_url(base_url, topics, since, types))
    path = parts.path + "?" + parts.query
    parser = EventParser(last_id=last_event_id or "")
    seen = 0
    while True:
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname or "127.0.0.1", parts.port, timeout=120)
        headers = {"accept": "text/event-stream"}
        if parser.last_id:
            headers["last-event-id"] = parser.last_id
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            if response.status != 200:
                print(f"tail: {response.status} {response.read()[:500]!r}", file=sys.stderr)
                return 1
            while chunk := response.read1(65536):
                for event in parser.feed(chunk):
                    out(f"{event.id}\t{event.event}\t{event.data}")
                    seen += 1
                    if count is not None and seen >= count:
                        return 0
        except (OSError, http.client.HTTPException) as exc:
            print(f"tail: connection lost ({exc}); reconnecting", file=sys.stderr)
        finally:
            conn.close()
        time.sleep((parser.retry if parser.retry is not None else 3000) / 1000)
