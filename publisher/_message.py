"""Validation of one event to publish, shared by every transport."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from publisher._frames import check_field, encode_body, serialize_data
from publisher._schema import check_topic

TopicArg = str | Sequence[str]


@dataclass(frozen=True, slots=True)
class Message:
    topics: tuple[str, ...]
    data: Any
    event: str | None
    text: str
    """``data`` as the text its ``data:`` lines carry."""
    body: bytes
    """The frame body, serialized once here and never again."""


def make_message(topics: TopicArg, data: Any, event: str | None = None) -> Message:
    names = (topics,) if isinstance(topics, str) else tuple(topics)
    if not names:
        raise ValueError("publish needs at least one topic")
    for name in names:
        check_topic(name)
    unique = tuple(dict.fromkeys(names))
    if event is not None:
        check_field("event name", event)
    text = serialize_data(data)
    return Message(unique, data, event, text, encode_body(text, event))


class PublishError(Exception):
    """A publish was refused (HTTP transport: the gateway's status and JSON error)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
