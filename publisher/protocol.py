"""The contract between publishers and gateways: defaults, ids, topics, topic patterns, SSE
frames, the message model and the Redis key names.

Both packages import this one module, so a rule is written once. It does no I/O and imports
nothing beyond the standard library and orjson: a publisher, a gateway node and a test can
all use it without a Redis, a socket or an event loop.

Event ids are Redis stream ids ``<ms>-<seq>`` issued from one clock per Redis, so they are
totally ordered across every topic. Comparisons use :func:`id_key`, which maps an id to one
integer that orders exactly like the id.

An event is serialized once, at publish time, into a *body* (``event:`` and ``data:`` lines and
the blank line that ends the frame). The id line is prepended where the id is known, so history
and live delivery produce identical bytes.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

# -- defaults -------------------------------------------------------------------------------

DEFAULT_PREFIX = "sse"
"""The prefix of every Redis key and channel."""
DEFAULT_MAX_EVENTS = 2000
"""History kept per topic, in events."""
DEFAULT_MAX_AGE_SECONDS = 3600.0
"""History kept per topic, in seconds (0: no age limit)."""
DEFAULT_IDEMPOTENCY_TTL = 300.0
"""Seconds a publish's idempotency key is remembered: a retry within it returns the first id."""

# -- ids ------------------------------------------------------------------------------------

BEGINNING = "0-0"
"""The position before every event: resuming from it replays all retained history."""

_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_U64 = (1 << 64) - 1


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


# -- topics and topic patterns --------------------------------------------------------------

MAX_TOPIC_LENGTH = 256
_TOPIC_RE = re.compile(rf"[A-Za-z0-9_.:/@-]{{1,{MAX_TOPIC_LENGTH}}}")
_PATTERN_RE = re.compile(rf"[A-Za-z0-9_.:/@*-]{{1,{MAX_TOPIC_LENGTH}}}")


def is_valid_topic(topic: str) -> bool:
    return _TOPIC_RE.fullmatch(topic) is not None


def check_topic(topic: object) -> str:
    if not isinstance(topic, str) or not is_valid_topic(topic):
        raise ValueError(
            f"invalid topic {topic!r}: use 1-{MAX_TOPIC_LENGTH} characters from "
            "A-Z a-z 0-9 _ . : / @ -"
        )
    return topic


def is_valid_pattern(pattern: object) -> bool:
    """A topic pattern (a token's ``sse.subscribe``/``sse.publish`` claim, ``--public-topics``):
    topic characters and ``*``, which matches any run of characters."""
    return isinstance(pattern, str) and _PATTERN_RE.fullmatch(pattern) is not None


class TopicPatterns:
    """A set of ``*`` glob patterns, matched in time linear in the topic for each pattern.

    A pattern is split at its stars: the first piece must start the topic, the last must end
    it, and the pieces between are found left to right, each at its first place after the
    previous one. Greedy leftmost search is exact for globs whose only wildcard is ``*``, and
    unlike a regex with ``.*`` it never backtracks (``*:*:*:*:archive`` against 256 colons
    froze the event loop for seconds)."""

    __slots__ = ("_any", "_exact", "_globs")

    def __init__(self, patterns: Iterable[str]) -> None:
        exact: set[str] = set()
        globs: list[tuple[str, tuple[str, ...], str]] = []
        for pattern in patterns:
            if "*" not in pattern:
                exact.add(pattern)
                continue
            first, *middle, last = pattern.split("*")
            globs.append((first, tuple(piece for piece in middle if piece), last))
        self._exact = frozenset(exact)
        self._any = any(not first and not middle and not last for first, middle, last in globs)
        self._globs = tuple(dict.fromkeys(globs))

    def allows(self, topic: str) -> bool:
        if self._any or topic in self._exact:
            return True
        return any(_glob_matches(glob, topic) for glob in self._globs)

    def first_denied(self, topics: Iterable[str]) -> str | None:
        for topic in topics:
            if not self.allows(topic):
                return topic
        return None


def _glob_matches(glob: tuple[str, tuple[str, ...], str], topic: str) -> bool:
    first, middle, last = glob
    end = len(topic) - len(last)
    if end < len(first) or not topic.startswith(first) or not topic.endswith(last):
        return False
    position = len(first)
    for piece in middle:
        found = topic.find(piece, position, end)
        if found < 0:
            return False
        position = found + len(piece)
    return True


@functools.lru_cache(maxsize=4096)
def compile_patterns(patterns: tuple[str, ...]) -> TopicPatterns:
    """Shared across tokens: the same claims are compiled once."""
    return TopicPatterns(patterns)


# -- SSE frames -----------------------------------------------------------------------------

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


# -- the message model ----------------------------------------------------------------------

TopicArg = str | Sequence[str]


def idempotency_digest(scope: str, topics: Iterable[str], key: str) -> str:
    """What an idempotency key is remembered under: the key alone would let one publisher's
    key answer for (and reveal) another's. ``scope`` names the publisher (a token subject over
    HTTP, empty for direct Redis access); the topics are a set, so their order does not
    matter. Encoded as a JSON array, so no two triples share a digest."""
    material = orjson.dumps([scope, sorted(set(topics)), key])
    return hashlib.sha256(material).hexdigest()


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


@dataclass(frozen=True)
class Retention:
    """How much history each topic keeps for replay.

    ``max_events`` is approximate (Redis trims whole stream nodes, so at least that many are
    kept); ``max_age`` (seconds, 0 for none) is applied when the topic is next published to.
    """

    max_events: int = DEFAULT_MAX_EVENTS
    max_age: float = DEFAULT_MAX_AGE_SECONDS

    def __post_init__(self) -> None:
        if self.max_events < 1:
            raise ValueError("max_events must be at least 1")
        if not math.isfinite(self.max_age) or self.max_age < 0:
            raise ValueError("max_age must be a finite number >= 0")


# -- Redis schema ---------------------------------------------------------------------------


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
