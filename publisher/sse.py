"""A sans-IO parser of ``text/event-stream`` that follows the WHATWG rules.

https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation

Feed it the bytes of one response; call :meth:`EventParser.reset` before the bytes of the next
one. An ``id:`` line counts only when its event is dispatched (at the blank line that ends
it), so a connection cut inside a frame resumes from the last event that was delivered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class ServerEvent:
    event: str
    data: str
    id: str
    """The stream's last event id when this event was dispatched."""
    has_id: bool = field(default=False, compare=False)
    """Whether the event's own frame had an ``id:`` line (else ``id`` is an earlier one's)."""


@dataclass
class EventParser:
    """Feed bytes, get events. Handles CRLF/CR/LF line ends split across reads and a BOM."""

    last_id: str = ""
    """The last event id, as a reconnect sends it in ``Last-Event-ID``."""
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    _buffer: bytes = b""
    _data: list[str] = field(default_factory=list)
    _event: str = ""
    _id: str | None = None
    """The ``id:`` of the frame being read; it becomes ``last_id`` at the frame's end."""
    _started: bool = False
    _after_cr: bool = False

    def reset(self) -> None:
        """Forget the unfinished frame and line of a connection that ended: the next bytes
        are a new response (which may start with a BOM). ``last_id`` and ``retry`` stay."""
        self._buffer = b""
        self._data = []
        self._event = ""
        self._id = None
        self._started = False
        self._after_cr = False

    def feed(self, chunk: bytes) -> list[ServerEvent]:
        buffer = self._buffer + chunk
        if not self._started and buffer:
            if len(buffer) < 3 and BOM.startswith(buffer):
                self._buffer = buffer
                return []
            self._started = True
            buffer = buffer.removeprefix(BOM)
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
            has_id = self._id is not None
            if self._id is not None:
                self.last_id = self._id
                self._id = None
            if self._data:
                data = "\n".join(self._data)
                events.append(ServerEvent(self._event or "message", data, self.last_id, has_id))
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
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)
