"""Sans-IO Server-Sent Events encoding.

An event is serialized once, at publish time, into a *body* (``event:`` and ``data:`` lines
and the blank line that ends the frame). The id line is prepended where the id is known, so
history and live delivery produce identical bytes.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_FORBIDDEN = ("\r", "\n", "\0")


def check_field(name: str, value: str) -> str:
    """Reject values that would break out of one SSE field line."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if not value:
        raise ValueError(f"{name} must not be empty")
    for char in _FORBIDDEN:
        if char in value:
            raise ValueError(f"{name} {value!r} contains a CR, LF or NUL character")
    return value


def serialize_data(data: Any) -> str:
    """Strings are sent as they are; anything else is JSON (orjson)."""
    if isinstance(data, str):
        return data
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data).decode("utf-8")
    try:
        return orjson.dumps(data).decode("utf-8")
    except TypeError as exc:
        raise ValueError(f"data is not JSON-serializable: {exc}") from None


def encode_body(data: Any, event: str | None = None) -> bytes:
    """``event:`` + one ``data:`` line per line of ``data`` + the blank line ending the frame."""
    text = serialize_data(data)
    if "\0" in text:
        raise ValueError("data contains a NUL character")
    parts = []
    if event is not None:
        parts.append(f"event: {check_field('event name', event)}\n")
    parts.extend(f"data: {line}\n" for line in _LINE_BREAK.split(text))
    parts.append("\n")
    return "".join(parts).encode("utf-8")


def encode_frame(event_id: str | bytes, body: bytes) -> bytes:
    if isinstance(event_id, str):
        event_id = event_id.encode("ascii")
    return b"id: " + event_id + b"\n" + body


def event_name(body: bytes) -> bytes:
    """The event type of a body (``message`` when it has no ``event:`` line)."""
    if body.startswith(b"event: "):
        return body[7 : body.index(b"\n")]
    return b"message"


def comment(text: str = "") -> bytes:
    check_field("comment", text or " ")
    return f": {text}\n\n".encode()


def retry(milliseconds: int) -> bytes:
    if milliseconds < 0:
        raise ValueError("retry must be >= 0")
    return f"retry: {milliseconds}\n\n".encode()


def event(data: Any, event: str | None = None, event_id: str | None = None) -> bytes:
    """A complete frame, for events the gateway makes itself (e.g. ``reset``)."""
    body = encode_body(data, event)
    if event_id is None:
        return body
    return encode_frame(check_field("event id", event_id), body)
