"""publisher.sse.EventParser follows the WHATWG event-stream parsing rules.

https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
"""

from __future__ import annotations

import pytest

from publisher.sse import EventParser, ServerEvent

BOM = b"\xef\xbb\xbf"


def parse(*chunks: bytes) -> tuple[EventParser, list[ServerEvent]]:
    parser = EventParser()
    events: list[ServerEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    return parser, events


def byte_by_byte(stream: bytes) -> tuple[EventParser, list[ServerEvent]]:
    return parse(*(stream[i : i + 1] for i in range(len(stream))))


def test_a_simple_event_is_dispatched_as_message() -> None:
    _, events = parse(b"data: hello\n\n")
    assert events == [ServerEvent("message", "hello", "")]


def test_multi_line_data_is_joined_with_lf() -> None:
    _, events = parse(b"data: one\ndata: two\ndata:\ndata: four\n\n")
    assert events == [ServerEvent("message", "one\ntwo\n\nfour", "")]


def test_an_event_is_dispatched_only_at_the_blank_line() -> None:
    parser = EventParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"data: b\n") == []
    assert parser.feed(b"\n") == [ServerEvent("message", "a\nb", "")]


def test_event_field_sets_the_type_for_one_event_only() -> None:
    _, events = parse(b"event: progress\ndata: 1\n\ndata: 2\n\n")
    assert events == [ServerEvent("progress", "1", ""), ServerEvent("message", "2", "")]


def test_an_empty_event_field_means_message() -> None:
    _, events = parse(b"event:\ndata: x\n\n")
    assert events == [ServerEvent("message", "x", "")]


def test_only_one_leading_space_is_removed_from_a_value() -> None:
    _, events = parse(b"data:  two spaces\ndata:none\ndata: a: b\n\n")
    assert events == [ServerEvent("message", " two spaces\nnone\na: b", "")]


# -- line endings ---------------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\r\n", b"\n", b"\r"], ids=["CRLF", "LF", "CR"])
def test_each_line_ending_separates_fields_and_ends_events(eol: bytes) -> None:
    stream = eol.join([b"id: 1-0", b"event: e", b"data: a", b"data: b", b"", b"data: c", b"", b""])
    _, events = parse(stream)
    assert events == [ServerEvent("e", "a\nb", "1-0"), ServerEvent("message", "c", "1-0")]


def test_mixed_line_endings_in_one_stream() -> None:
    _, events = parse(b"data: a\r\ndata: b\rdata: c\n\r\ndata: d\n\n")
    assert events == [ServerEvent("message", "a\nb\nc", ""), ServerEvent("message", "d", "")]


def test_crlf_split_across_two_feeds_is_one_line_ending() -> None:
    parser = EventParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\ndata: b\r") == []
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r\n") == [ServerEvent("message", "a\nb", "")]
    assert parser.feed(b"data: c\r") == []
    assert parser.feed(b"\n\r\n") == [ServerEvent("message", "c", "")]


def test_cr_at_the_end_of_a_feed_followed_by_a_field_is_a_line_ending() -> None:
    parser = EventParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"data: b\r\n\r\n") == [ServerEvent("message", "a\nb", "")]


def test_cr_cr_at_the_end_of_a_feed_dispatches_the_event_without_waiting_for_more() -> None:
    """Two CRs are two complete line endings whatever follows: the event is complete."""
    parser = EventParser()
    assert parser.feed(b"data: a\r\r") == [ServerEvent("message", "a", "")]
    # An LF that follows completes the second CR's CRLF: it must not add a blank line.
    assert parser.feed(b"\ndata: b\r\r") == [ServerEvent("message", "b", "")]


def test_cr_blank_line_split_across_feeds_dispatches_as_soon_as_it_arrives() -> None:
    parser = EventParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\r") == [ServerEvent("message", "a", "")]


# -- byte order mark ------------------------------------------------------------------------


def test_a_leading_bom_is_stripped() -> None:
    _, events = parse(BOM + b"data: x\n\n")
    assert events == [ServerEvent("message", "x", "")]


@pytest.mark.parametrize("split", [1, 2, 3])
def test_a_leading_bom_split_across_feeds_is_stripped(split: int) -> None:
    _, events = parse(BOM[:split], BOM[split:] + b"data: x\n\n")
    assert events == [ServerEvent("message", "x", "")]


def test_only_the_first_bom_is_stripped() -> None:
    # The second BOM is part of the field name, so the line is an unknown field.
    _, events = parse(BOM + BOM + b"data: x\n\ndata: y\n\n")
    assert events == [ServerEvent("message", "y", "")]


def test_a_bom_later_in_the_stream_is_data() -> None:
    _, events = parse(b"data: x\n\n", BOM + b"data: y\n\n")
    assert events == [ServerEvent("message", "x", "")]


def test_a_stream_starting_with_bytes_like_a_bom_prefix_is_not_swallowed() -> None:
    _, events = parse(b"\xef", b"data: x\n\n")
    assert events == []  # the line is the field "\ufffddata", not data
    _, events = parse(b":", b"\n", b"data: ok\n\n")
    assert events == [ServerEvent("message", "ok", "")]


# -- comments, retry, ids, unknown and colon-less fields ------------------------------------


def test_comments_are_recorded_and_do_not_dispatch() -> None:
    parser, events = parse(b": ok\n\n:no space\n\n: ping\n\n")
    assert events == []
    assert parser.comments == ["ok", "no space", "ping"]


def test_comments_inside_an_event_do_not_break_it() -> None:
    parser, events = parse(b"data: a\n: note\ndata: b\n\n")
    assert events == [ServerEvent("message", "a\nb", "")]
    assert parser.comments == ["note"]


def test_retry_with_digits_is_parsed() -> None:
    parser, _ = parse(b"retry: 1500\n\n")
    assert parser.retry == 1500
    parser, _ = parse(b"retry: 0\n\n")
    assert parser.retry == 0


@pytest.mark.parametrize("value", [b"1.5", b"-1", b"abc", b"15 00", b"", b"\xd9\xa3"])
def test_retry_that_is_not_only_ascii_digits_is_ignored(value: bytes) -> None:
    parser, _ = parse(b"retry: 700\n\nretry: " + value + b"\n\n")
    assert parser.retry == 700


def test_events_with_no_data_are_not_dispatched_and_reset_the_event_type() -> None:
    parser, events = parse(b"event: lonely\nid: 3-0\n\ndata: x\n\n")
    assert events == [ServerEvent("message", "x", "3-0")]
    assert parser.last_id == "3-0"


def test_id_persists_to_later_events_until_changed() -> None:
    _, events = parse(b"id: 1-0\ndata: a\n\ndata: b\n\nid: 2-0\ndata: c\n\n")
    assert [e.id for e in events] == ["1-0", "1-0", "2-0"]


def test_an_empty_id_resets_the_last_event_id() -> None:
    _, events = parse(b"id: 1-0\ndata: a\n\nid\ndata: b\n\nid: 2-0\ndata: c\n\nid:\ndata: d\n\n")
    assert [e.id for e in events] == ["1-0", "", "2-0", ""]


def test_an_id_containing_nul_is_ignored() -> None:
    parser, events = parse(b"id: 1-0\ndata: a\n\nid: 2\x00-0\ndata: b\n\n")
    assert [e.id for e in events] == ["1-0", "1-0"]
    assert parser.last_id == "1-0"


def test_a_field_with_no_colon_has_an_empty_value() -> None:
    _, events = parse(b"data\n\ndata\ndata\n\n")
    assert events == [ServerEvent("message", "", ""), ServerEvent("message", "\n", "")]


def test_unknown_fields_are_ignored() -> None:
    _, events = parse(b"foo: bar\ndata: x\nDATA: y\nData: z\n\n")
    assert events == [ServerEvent("message", "x", "")]


def test_an_initial_last_id_is_kept_until_the_stream_sends_one() -> None:
    parser = EventParser(last_id="9-9")
    assert parser.feed(b"data: a\n\n") == [ServerEvent("message", "a", "9-9")]


def test_utf8_split_across_feeds_decodes_correctly() -> None:
    payload = "data: ☃ café\n\n".encode()
    split = payload.index("☃".encode()) + 1
    _, events = parse(payload[:split], payload[split:])
    assert events == [ServerEvent("message", "☃ café", "")]


def test_invalid_utf8_is_replaced_not_raised() -> None:
    _, events = parse(b"data: \xff\n\n")
    assert events == [ServerEvent("message", "\ufffd", "")]


# -- chunking does not change the result ----------------------------------------------------

STREAM = (
    BOM
    + b"retry: 2500\r\n: ok\r\n\r\n"
    + b'id: 1-0\r\nevent: progress\r\ndata: {"p": 1}\r\n\r\n'
    + b"id: 2-0\ndata: line one\ndata: line two\n\n"
    + b": ping\n\n"
    + b"event: nodata\n\n"
    + b"data\r\n\r\n"
    + b"id: 3-0\rdata: caf\xc3\xa9\r\r"
    + b"data: tail\r\n\r\n"
)
EXPECTED = [
    ServerEvent("progress", '{"p": 1}', "1-0"),
    ServerEvent("message", "line one\nline two", "2-0"),
    ServerEvent("message", "", "2-0"),
    ServerEvent("message", "café", "3-0"),
    ServerEvent("message", "tail", "3-0"),
]


def test_one_feed_parses_a_mixed_stream() -> None:
    parser, events = parse(STREAM)
    assert events == EXPECTED
    assert parser.retry == 2500
    assert parser.comments == ["ok", "ping"]
    assert parser.last_id == "3-0"


def test_byte_at_a_time_feeding_gives_the_same_result_as_one_feed() -> None:
    one, events_one = parse(STREAM)
    each, events_each = byte_by_byte(STREAM)
    assert events_each == events_one == EXPECTED
    assert (each.retry, each.comments, each.last_id) == (one.retry, one.comments, one.last_id)


@pytest.mark.parametrize("size", [2, 3, 5, 7, 11, 64])
def test_any_chunk_size_gives_the_same_result(size: int) -> None:
    _, events = parse(*(STREAM[i : i + size] for i in range(0, len(STREAM), size)))
    assert events == EXPECTED


# -- the id is taken at dispatch; a new connection starts a new parse ------------------------


def test_an_id_line_counts_only_once_its_event_is_dispatched() -> None:
    """Issue 11: the id must be taken when an event is dispatched, not when its ``id:`` line
    arrives (a resume from an id whose event was never delivered skips that event)."""
    parser = EventParser()
    assert parser.feed(b"id: 1-0\ndata: a\n\nid: 2-0\ndata: b\n") == [
        ServerEvent("message", "a", "1-0")
    ]
    assert parser.last_id == "1-0"
    assert parser.feed(b"\n") == [ServerEvent("message", "b", "2-0")]
    assert parser.last_id == "2-0"


def test_a_position_line_moves_the_last_id_at_its_blank_line() -> None:
    parser = EventParser()
    assert parser.feed(b"id: 7-0\n") == []
    assert parser.last_id == ""
    assert parser.feed(b"\n") == []
    assert parser.last_id == "7-0"


def test_reset_between_connections_drops_the_unfinished_frame() -> None:
    """Issue 11: the parser must be reset between connections; a connection cut in the middle
    of a frame must neither move the last id nor glue the frame's lines onto the next one."""
    parser = EventParser()
    assert parser.feed(b"id: 1-0\ndata: a\n\nid: 2-0\nevent: progress\ndata: b") == [
        ServerEvent("message", "a", "1-0")
    ]
    parser.reset()
    assert parser.last_id == "1-0"
    assert parser.feed(BOM + b"id: 2-0\ndata: b\n\n") == [ServerEvent("message", "b", "2-0")]
