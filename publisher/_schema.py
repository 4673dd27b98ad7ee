"""The shared contract between publishers and gateways: key names, ids, topics.

Event ids are Redis stream ids ``<ms>-<seq>`` issued from one clock per Redis, so they are
totally ordered across every topic. Comparisons use :func:`id_key`, which maps an id to one
integer that orders exactly like the id.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

DEFAULT_PREFIX = "sse"
DEFAULT_MAX_EVENTS = 2000
DEFAULT_MAX_AGE_SECONDS = 3600.0
MAX_TOPIC_LENGTH = 256

_TOPIC_RE = re.compile(r"[A-Za-z0-9_.:/@-]{1,256}")
_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_U64 = (1 << 64) - 1

BEGINNING = "0-0"
"""The position before every event: resuming from it replays all retained history."""


def is_valid_topic(topic: str) -> bool:
    return _TOPIC_RE.fullmatch(topic) is not None


def check_topic(topic: object) -> str:
    if not isinstance(topic, str) or not is_valid_topic(topic):
        raise ValueError(
            f"invalid topic {topic!r}: use 1-{MAX_TOPIC_LENGTH} characters from "
            "A-Z a-z 0-9 _ . : / @ -"
        )
    return topic


def parse_id(event_id: str) -> tuple[int, int]:
    """Split ``<ms>-<seq>`` into its two parts; ``ValueError`` if it is not a valid id."""
    match = _ID_RE.fullmatch(event_id)
    if match is None:
        raise ValueError(f"invalid event id {event_id!r}: expected <ms>-<seq>")
    ms, seq = int(match.group(1)), int(match.group(2))
    if ms > _U64 or seq > _U64:
        raise ValueError(f"invalid event id {event_id!r}: part out of range")
    return ms, seq


def id_key(event_id: str | bytes) -> int:
    """One integer that orders like the id (both halves are 64-bit in Redis)."""
    if isinstance(event_id, bytes):
        event_id = event_id.decode("ascii")
    ms, seq = parse_id(event_id)
    return (ms << 64) | seq


def key_to_id(key: int) -> str:
    return f"{key >> 64}-{key & _U64}"


def since_to_id(epoch_ms: int) -> str:
    """The first id at or after ``epoch_ms`` (``since`` is inclusive)."""
    return f"{epoch_ms}-0"


def id_ms(event_id: str) -> int:
    return parse_id(event_id)[0]


def idempotency_digest(scope: str, topics: Iterable[str], key: str) -> str:
    """What an idempotency key is remembered under: the key alone would let one publisher's
    key answer for (and reveal) another's. ``scope`` names the publisher (a token subject over
    HTTP, empty for direct Redis access); the topics are a set, so their order does not
    matter. Encoded as a JSON array, so no two triples share a digest."""
    material = orjson.dumps([scope, sorted(set(topics)), key])
    return hashlib.sha256(material).hexdigest()


@dataclass(frozen=True)
class Keys:
    """Redis key and channel names under one prefix."""

    prefix: str = DEFAULT_PREFIX

    @property
    def clock(self) -> str:
        return f"{self.prefix}:clock"

    @property
    def origin(self) -> str:
        return f"{self.prefix}:origin"

    def stream(self, topic: str) -> str:
        return f"{self.prefix}:s:{topic}"

    def channel(self, topic: str) -> str:
        return f"{self.prefix}:c:{topic}"

    @property
    def channel_prefix(self) -> str:
        return f"{self.prefix}:c:"

    def idempotency(self, digest: str) -> str:
        """Where a publish's id is remembered; ``digest`` is :func:`idempotency_digest`."""
        return f"{self.prefix}:idem:{digest}"

    def probe(self, node: str) -> str:
        """A channel only one gateway node listens on, to test its own pub/sub link."""
        return f"{self.prefix}:probe:{node}"


STREAM_FIELD = "f"
"""The frame body of a stream entry, without its ``id:`` line."""

PREV_FIELD = "p"
"""The id of the entry before this one in the same stream (``0-0`` for the first)."""
