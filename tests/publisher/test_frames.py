"""Sans-IO encoding of events: what one publish turns into on the wire (no I/O, no Redis)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.client import EventParser, ServerEvent
from publisher._frames import (
    comment,
    encode_body,
    encode_frame,
    event,
    event_name,
    retry,
    serialize_data,
)
from publisher._message import make_message
from publisher._schema import check_topic, is_valid_topic

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
