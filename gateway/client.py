"""A small SSE client: a sans-IO parser that follows the WHATWG rules, and ``tail``.

``tail`` reconnects like a browser's EventSource: after the announced ``retry`` delay, with the
last id it saw as ``Last-Event-ID``.
"""

from __future__ import annotations

import http.client
import sys
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ServerEvent:
    event: str
    data: str
    id: str
    """The stream's last event id when this event was dispatched."""


@dataclass
class EventParser:
    """Feed bytes, get events. Handles CRLF/CR/LF line ends split across reads and a BOM."""

    last_id: str = ""
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    _buffer: bytes = b""
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _started: bool = False
    _after_cr: bool = False

    def feed(self, chunk: bytes) -> list[ServerEvent]:
        buffer = self._buffer + chunk
        if not self._started and buffer:
            if len(buffer) < 3 and b"\xef\xbb\xbf".startswith(buffer):
                self._buffer = buffer
                return []
            self._started = True
            buffer = buffer.removeprefix(b"\xef\xbb\xbf")
        events: list[ServerEvent] = []
        start = 0
        if self._after_cr and buffer[:1] == b"\n":
            start = 1
        self._after_cr = False
        size = len(buffer)
        while start < size:
            cr = buffer.find(b"\r", start)
            lf = buffer.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            if cr != -1 and (lf == -1 or cr < lf):
                end = cr
                if cr + 1 == size:
                    after = size
                    self._after_cr = True  # the LF of a CRLF may come in the next chunk
                else:
                    after = cr + 2 if buffer[cr + 1] == 0x0A else cr + 1
            else:
                end, after = lf, lf + 1
            self._line(buffer[start:end].decode("utf-8", "replace"), events)
            start = after
        self._buffer = buffer[start:]
        return events

    def _line(self, line: str, events: list[ServerEvent]) -> None:
        if not line:
            if self._data:
                events.append(
                    ServerEvent(self._event or "message", "\n".join(self._data), self.last_id)
                )
            self._data = []
            self._event = ""
            return
        if line.startswith(":"):
            self.comments.append(line[1:].removeprefix(" "))
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)


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
