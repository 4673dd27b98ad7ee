"""The rules of ``publisher.protocol``, shared by publishers and gateways: ids, topics and
topic patterns, what one publish turns into on the wire, and the Redis key names. Pure: no I/O,
no Redis, no event loop."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.client import EventParser, ServerEvent
from publisher.protocol import (
    BEGINNING,
    DEFAULT_MAX_AGE_SECONDS,
    DEFAULT_MAX_EVENTS,
    DEFAULT_PREFIX,
    PREV_FIELD,
    STREAM_FIELD,
    Keys,
    Retention,
    TopicPatterns,
    check_topic,
    comment,
    compile_patterns,
    encode_body,
    encode_frame,
    event,
    event_name,
    id_key,
    id_ms,
    idempotency_digest,
    is_valid_pattern,
    is_valid_topic,
    key_to_id,
    make_message,
    parse_id,
    retry,
    serialize_data,
    since_to_id,
)

U64 = (1 << 64) - 1

# -- ids ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event_id", "parts"),
    [("0-0", (0, 0)), ("1712345678901-7", (1712345678901, 7)), (f"{U64}-{U64}", (U64, U64))],
)
def test_an_id_is_two_unsigned_64_bit_numbers(event_id: str, parts: tuple[int, int]) -> None:
    assert parse_id(event_id) == parts
    assert id_ms(event_id) == parts[0]


@pytest.mark.parametrize(
    "bad",
    ["", "1", "1-", "-1", "a-b", "1-2-3", " 1-0", "1-0\n", "+1-0", "1.5-0", f"{U64 + 1}-0",
     f"0-{U64 + 1}", "1" * 21 + "-0"],
)  # fmt: skip
def test_anything_else_is_not_an_id(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid event id"):
        parse_id(bad)
    with pytest.raises(ValueError, match="invalid event id"):
        id_key(bad)


@pytest.mark.parametrize("event_id", ["0-0", "0-1", "1-0", "1712345678901-7", f"{U64}-{U64}"])
def test_an_id_round_trips_through_its_key(event_id: str) -> None:
    assert key_to_id(id_key(event_id)) == event_id
    assert id_key(event_id.encode()) == id_key(event_id)


def test_keys_order_ids_by_time_then_sequence_not_as_text() -> None:
    ids = ["10-0", "9-0", "1-10", "1-9", f"1-{U64}", "2-0", "0-0", "0-1"]
    by_key = sorted(ids, key=id_key)
    assert by_key == sorted(ids, key=parse_id)
    assert by_key == ["0-0", "0-1", "1-9", "1-10", f"1-{U64}", "2-0", "9-0", "10-0"]


def test_the_beginning_is_before_every_id() -> None:
    assert id_key(BEGINNING) == 0
    assert id_key(BEGINNING) < id_key("0-1")


def test_since_is_the_first_id_of_its_millisecond() -> None:
    assert since_to_id(1700) == "1700-0"
    assert id_key(f"1699-{U64}") < id_key(since_to_id(1700)) <= id_key("1700-0")


# -- data lines -----------------------------------------------------------------------------


def test_string_data_is_sent_as_is_in_one_data_line() -> None:
    assert encode_body("hello world") == b"data: hello world\n\n"


@pytest.mark.parametrize(
    ("text", "body"),
    [
        ("a\nb", b"data: a\ndata: b\n\n"),
        ("a\r\nb", b"data: a\ndata: b\n\n"),
        ("a\rb", b"data: a\ndata: b\n\n"),
        ("a\r\n\r\nb", b"data: a\ndata: \ndata: b\n\n"),
        ("a\n\rb", b"data: a\ndata: \ndata: b\n\n"),
        ("a\rb\r\nc\nd", b"data: a\ndata: b\ndata: c\ndata: d\n\n"),
    ],
    ids=["LF", "CRLF", "CR", "CRLF-CRLF", "LF-CR", "mixed"],
)
def test_string_data_is_split_into_data_lines_on_crlf_cr_and_lf(text: str, body: bytes) -> None:
    assert encode_body(text) == body


def test_leading_and_trailing_line_breaks_become_empty_data_lines() -> None:
    assert encode_body("\nx\n") == b"data: \ndata: x\ndata: \n\n"


def test_empty_string_data_is_one_empty_data_line() -> None:
    assert encode_body("") == b"data: \n\n"


def test_data_lines_keep_leading_spaces_and_colons() -> None:
    assert encode_body("  indented: yes") == b"data:   indented: yes\n\n"


def test_non_ascii_text_is_encoded_as_utf8() -> None:
    assert encode_body("héllo ☃") == "data: héllo ☃\n\n".encode()


# -- JSON data ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "line"),
    [
        ({"progress": 50}, b'{"progress":50}'),
        ([1, "two", 3.5], b'[1,"two",3.5]'),
        (42, b"42"),
        (-7, b"-7"),
        (None, b"null"),
        (True, b"true"),
        ({"a": {"b": [1, {"c": None}]}, "d": []}, b'{"a":{"b":[1,{"c":null}]},"d":[]}'),
        ({"name": "café"}, '{"name":"café"}'.encode()),
    ],
    ids=["dict", "list", "int", "negative", "None", "bool", "nested", "unicode"],
)
def test_non_string_data_is_encoded_as_compact_json(data: Any, line: bytes) -> None:
    assert encode_body(data) == b"data: " + line + b"\n\n"


def test_json_strings_with_line_breaks_stay_on_one_data_line() -> None:
    assert encode_body({"text": "a\nb\r\nc"}) == b'data: {"text":"a\\nb\\r\\nc"}\n\n'


def test_json_strings_with_nul_are_escaped_not_rejected() -> None:
    assert encode_body({"text": "a\0b"}) == b'data: {"text":"a\\u0000b"}\n\n'


def test_bytes_data_is_utf8_text_not_json() -> None:
    assert encode_body(b"plain") == b"data: plain\n\n"
    assert encode_body(bytearray(b"x\ny")) == b"data: x\ndata: y\n\n"
    assert encode_body(memoryview("☃".encode())) == "data: ☃\n\n".encode()


def test_bytes_data_that_is_not_utf8_is_rejected() -> None:
    with pytest.raises(ValueError, match="utf-8"):
        encode_body(b"\xff\xfe")


@pytest.mark.parametrize(
    "data",
    [object(), {1, 2}, {"when": 1j}, {("tuple", "key"): 1}, 1 << 70],
    ids=["object", "set", "complex", "tuple-key", "huge-int"],
)
def test_data_that_is_not_json_serializable_is_a_value_error(data: Any) -> None:
    with pytest.raises(ValueError, match="not JSON-serializable"):
        encode_body(data)


def test_serialize_data_returns_the_text_that_the_data_lines_carry() -> None:
    assert serialize_data("x") == "x"
    assert serialize_data({"a": 1}) == '{"a":1}'
    assert serialize_data(b"b") == "b"


# -- forbidden characters -------------------------------------------------------------------


def test_nul_in_string_data_is_rejected() -> None:
    with pytest.raises(ValueError, match="NUL"):
        encode_body("before\0after")
    with pytest.raises(ValueError, match="NUL"):
        make_message("t", "before\0after")


def test_nul_in_bytes_data_is_rejected() -> None:
    with pytest.raises(ValueError, match="NUL"):
        encode_body(b"a\0b")


@pytest.mark.parametrize("bad", ["a\rb", "a\nb", "a\r\nb", "a\0b", "\n", "trailing\n"])
def test_event_names_with_cr_lf_or_nul_are_rejected_with_a_clear_message(bad: str) -> None:
    with pytest.raises(ValueError, match=r"event name .* contains a CR, LF or NUL character"):
        encode_body("x", bad)
    with pytest.raises(ValueError, match=r"event name .* contains a CR, LF or NUL character"):
        make_message("t", "x", bad)


@pytest.mark.parametrize("bad", ["1-0\n", "1\r-0", "1-\x000"])
def test_event_ids_with_cr_lf_or_nul_are_rejected_with_a_clear_message(bad: str) -> None:
    with pytest.raises(ValueError, match=r"event id .* contains a CR, LF or NUL character"):
        event("x", "e", event_id=bad)


def test_empty_event_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="event name must not be empty"):
        encode_body("x", "")
    with pytest.raises(ValueError, match="event name must not be empty"):
        make_message("t", "x", "")


def test_non_string_event_name_is_rejected() -> None:
    with pytest.raises(ValueError, match="event name must be a string"):
        encode_body("x", 5)  # type: ignore[arg-type]


def test_comments_cannot_carry_line_breaks() -> None:
    assert comment("ping") == b": ping\n\n"
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        comment("a\nb")


def test_retry_zero_is_legal_and_negative_is_not() -> None:
    assert retry(0) == b"retry: 0\n\n"
    assert retry(1500) == b"retry: 1500\n\n"
    with pytest.raises(ValueError, match="retry"):
        retry(-1)


# -- event names ----------------------------------------------------------------------------


def test_event_line_comes_before_the_data_lines() -> None:
    assert encode_body({"p": 1}, "progress") == b'event: progress\ndata: {"p":1}\n\n'


def test_event_name_reads_the_event_line_of_a_body() -> None:
    assert event_name(encode_body("x", "progress")) == b"progress"
    assert event_name(encode_body("x", "a:b c")) == b"a:b c"


def test_event_name_is_message_when_there_is_no_event_line() -> None:
    assert event_name(encode_body("x")) == b"message"
    assert event_name(encode_body("event: not a name")) == b"message"


# -- topics ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        "crawler:42",
        "user:alice",
        "project/7/status",
        "a",
        "user@example.com",
        "A-Z_a.z:0/9@-",
        "x" * 256,
    ],
)
def test_valid_topics_are_accepted(topic: str) -> None:
    assert is_valid_topic(topic)
    assert check_topic(topic) == topic
    assert make_message(topic, "x").topics == (topic,)


@pytest.mark.parametrize(
    "topic",
    ["", "has space", "star*", "*", "x" * 257, "tab\tx", "new\nline", "trailing\n", "é", "a#b"],
    ids=[
        "empty",
        "space",
        "star",
        "only-star",
        "257",
        "tab",
        "LF",
        "trailing-LF",
        "accent",
        "hash",
    ],
)
def test_invalid_topics_are_rejected_naming_the_topic(topic: str) -> None:
    assert not is_valid_topic(topic)
    with pytest.raises(ValueError, match="invalid topic") as info:
        check_topic(topic)
    assert repr(topic)[:50] in str(info.value)
    with pytest.raises(ValueError, match="invalid topic"):
        make_message(topic, "x")
    with pytest.raises(ValueError, match="invalid topic"):
        make_message(["ok", topic], "x")


@pytest.mark.parametrize("topic", [None, 42, b"bytes", ["nested"]], ids=repr)
def test_non_string_topics_are_rejected(topic: object) -> None:
    with pytest.raises(ValueError, match="invalid topic"):
        check_topic(topic)
    with pytest.raises(ValueError, match="invalid topic"):
        make_message(["ok", topic], "x")  # type: ignore[list-item]


def test_a_publish_needs_at_least_one_topic() -> None:
    with pytest.raises(ValueError, match="at least one topic"):
        make_message([], "x")


def test_duplicate_topics_in_one_publish_are_collapsed_keeping_first_order() -> None:
    message = make_message(["b", "a", "b", "c", "a"], "x")
    assert message.topics == ("b", "a", "c")


def test_a_single_topic_string_is_one_topic_not_its_characters() -> None:
    assert make_message("abc", "x").topics == ("abc",)


def test_a_message_is_serialized_once_into_its_body() -> None:
    message = make_message(("t1", "t2"), {"n": 1}, "tick")
    assert message.body == b'event: tick\ndata: {"n":1}\n\n'
    assert message.event == "tick"
    assert message.data == {"n": 1}


# -- topic patterns -------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["room:*", "*", "a", "*:status", "x" * 256, "A-Z_a.z:0/9@-*"])
def test_topic_patterns_are_topic_characters_and_stars(pattern: str) -> None:
    assert is_valid_pattern(pattern)


@pytest.mark.parametrize("pattern", ["", "a b", "x" * 257, "é", "a#b", "a\nb", None, 5, ["a"]])
def test_anything_else_is_not_a_topic_pattern(pattern: object) -> None:
    assert not is_valid_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "topic", "allowed"),
    [
        ("user:alice", "user:alice", True),
        ("user:alice", "user:alice2", False),
        ("user:alice", "user:alic", False),
        ("room:*", "room:1", True),
        ("room:*", "room:a/b", True),
        ("room:*", "room:", True),
        ("room:*", "rooms:1", False),
        ("room:*", "room", False),
        ("*:status", "job/7:status", True),
        ("*", "anything.at/all", True),
        ("a.b", "aXb", False),
    ],
)
def test_a_star_matches_any_run_of_characters_and_nothing_else_is_special(
    pattern: str, topic: str, allowed: bool
) -> None:
    assert TopicPatterns([pattern]).allows(topic) is allowed


def test_no_patterns_grant_nothing() -> None:
    assert not TopicPatterns([]).allows("a")
    assert TopicPatterns(["a", "b:*"]).first_denied(["a", "b:1", "c", "d"]) == "c"


def test_the_same_patterns_are_compiled_once() -> None:
    assert compile_patterns(("a", "b:*")) is compile_patterns(("a", "b:*"))


BACKTRACKING_PATTERNS = ["*:*:*:*:archive", "***:x"]
MATCH_BOUND = 1.0
"""A liveness bound, not a speed measurement: the backtracking regex took seconds."""


def reference(patterns: list[str], topic: str) -> bool:
    """The old meaning of a pattern, as a regex: ``*`` is any run of characters."""
    return any(re.fullmatch(re.escape(p).replace(r"\*", ".*"), topic) for p in patterns)


small_text = st.text(alphabet="ab:*", max_size=8)


@settings(max_examples=2000, deadline=None, database=None)
@given(patterns=st.lists(small_text.filter(bool), max_size=3), topic=st.text("ab:", max_size=10))
def test_matching_means_what_it_meant(patterns: list[str], topic: str) -> None:
    """Issue 10 E: the linear matcher agrees with the old regex on every small case."""
    assert TopicPatterns(patterns).allows(topic) is reference(patterns, topic)


def test_a_backtracking_pattern_against_a_long_topic_is_answered_at_once() -> None:
    """Issue 10 E, catastrophic backtracking: the worst shapes match or fail without
    exploring every split of the topic (the old regex took seconds per topic)."""
    patterns = TopicPatterns(BACKTRACKING_PATTERNS)
    topics = [":" * 256, "a:" * 128]
    started = time.monotonic()
    for topic in topics:
        assert not patterns.allows(topic)
    assert patterns.allows(":" * 248 + "archive")
    assert time.monotonic() - started < MATCH_BOUND


# -- the Redis schema -----------------------------------------------------------------------


def test_key_and_channel_names_under_the_default_prefix() -> None:
    """The names publish.lua, every node and data already in Redis agree on."""
    keys = Keys()
    assert keys.prefix == DEFAULT_PREFIX == "sse"
    assert keys.clock == "sse:clock"
    assert keys.origin == "sse:origin"
    assert keys.stream("jobs:42") == "sse:s:jobs:42"
    assert keys.channel("jobs:42") == "sse:c:jobs:42"
    assert keys.channel("x").startswith(keys.channel_prefix)
    assert keys.channel_prefix == "sse:c:"
    assert keys.idempotency("d1") == "sse:idem:d1"
    assert keys.probe("node-1") == "sse:probe:node-1"
    assert (STREAM_FIELD, PREV_FIELD) == ("f", "p")


def test_a_prefix_separates_tenants_of_one_redis() -> None:
    a, b = Keys("a"), Keys("b")
    assert a.stream("t") == "a:s:t"
    assert b.stream("t") == "b:s:t"
    assert a.clock != b.clock


def test_an_idempotency_digest_names_scope_topic_set_and_key() -> None:
    digest = idempotency_digest("alice", ["b", "a", "b"], "k1")
    assert digest == idempotency_digest("alice", ["a", "b"], "k1")
    assert digest != idempotency_digest("bob", ["a", "b"], "k1")
    assert digest != idempotency_digest("alice", ["a"], "k1")
    assert digest != idempotency_digest("alice", ["a", "b"], "k2")
    # a joined string would confuse these two; the JSON encoding does not
    assert idempotency_digest("s", ["t"], "k:x") != idempotency_digest("s", ["t:k"], "x")
    message = make_message(["b", "a"], "x", idempotency_key="k1")
    assert message.idempotency_digest == idempotency_digest("", ["a", "b"], "k1")


def test_retention_defaults_and_bounds() -> None:
    assert Retention() == Retention(DEFAULT_MAX_EVENTS, DEFAULT_MAX_AGE_SECONDS)
    assert Retention(1, 0).max_age == 0
    with pytest.raises(ValueError, match="max_events"):
        Retention(0)
    for bad_age in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="max_age"):
            Retention(10, bad_age)


# -- frames round-trip through a real SSE parser --------------------------------------------


def test_encode_frame_puts_the_id_line_first() -> None:
    body = encode_body("x", "e")
    assert encode_frame("17-3", body) == b"id: 17-3\nevent: e\ndata: x\n\n"
    assert encode_frame(b"17-3", body) == encode_frame("17-3", body)


@pytest.mark.parametrize(
    ("data", "name", "text"),
    [
        ("hello", None, "hello"),
        ("multi\nline\r\ntext\rhere", "lines", "multi\nline\ntext\nhere"),
        ({"progress": 50, "nested": [1, None]}, "progress", '{"progress":50,"nested":[1,null]}'),
        ("", "empty", ""),
        ("\n", None, "\n"),
        ("  spaced", None, "  spaced"),
        ("ünïcödé ☃", "u", "ünïcödé ☃"),
        (None, None, "null"),
    ],
)
def test_a_frame_round_trips_through_the_sse_parser(data: Any, name: str | None, text: str) -> None:
    frame = encode_frame("1712345678901-7", encode_body(data, name))
    parser = EventParser()
    events = parser.feed(frame)
    assert events == [ServerEvent(name or "message", text, "1712345678901-7")]
    assert parser.last_id == "1712345678901-7"


def test_gateway_made_events_round_trip_with_and_without_an_id() -> None:
    parser = EventParser()
    events = parser.feed(event('{"reason":"trimmed"}', "reset", "5-0") + event("x", "note"))
    assert events == [
        ServerEvent("reset", '{"reason":"trimmed"}', "5-0"),
        ServerEvent("note", "x", "5-0"),
    ]
