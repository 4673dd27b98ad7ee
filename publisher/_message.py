"""Validation of one event to publish, shared by every transport."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from publisher._frames import check_field, encode_body, serialize_data
from publisher._schema import check_topic, idempotency_digest

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
    idempotency_key: str
    """Names this publish, so that a retry of it is recognised and not stored twice."""
    scope: str = ""
    """Whose key it is: a key names one publish of one publisher to one set of topics (the
    gateway sets the token subject; direct Redis publishers share the empty scope)."""
    remember: bool = True
    """Whether the id is remembered under the key. The gateway does not remember the random
    keys it makes for publishes sent without one: no client could retry with them, and a
    flood of publishes would leave one key per event for the idempotency TTL."""

    @property
    def idempotency_digest(self) -> str:
        return idempotency_digest(self.scope, self.topics, self.idempotency_key)


_IDEMPOTENCY_KEY = re.compile(r"[A-Za-z0-9_.:/@+=-]{1,128}")


def check_idempotency_key(key: object) -> str:
    if not isinstance(key, str) or not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ValueError(
            f"invalid idempotency key {str(key)[:140]!r}: use 1-128 characters from "
            "A-Z a-z 0-9 _ . : / @ + = -"
        )
    return key


def make_message(
    topics: TopicArg, data: Any, event: str | None = None, idempotency_key: str | None = None
) -> Message:
    names = (topics,) if isinstance(topics, str) else tuple(topics)
    if not names:
        raise ValueError("publish needs at least one topic")
    for name in names:
        check_topic(name)
    unique = tuple(dict.fromkeys(names))
    if event is not None:
        check_field("event name", event)
    key = uuid.uuid4().hex if idempotency_key is None else check_idempotency_key(idempotency_key)
    text = serialize_data(data)
    return Message(unique, data, event, text, encode_body(text, event), key)


class PublishError(Exception):
    """A publish was refused (HTTP transport: the gateway's status, its JSON ``error`` code
    and its ``Retry-After`` in seconds, if any)."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        error: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.retry_after = retry_after
