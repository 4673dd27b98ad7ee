"""The replay rules both engines share (gateway/engines/base.py, docs/architecture.md §3-4): where a
replay starts, when it cannot be complete (``reset``), and how per-topic runs are merged."""

from __future__ import annotations

import pytest

from gateway.engines.base import (
    Frame,
    Position,
    PositionKind,
    Reset,
    ResetReason,
    check_history,
    merge_unique,
)
from publisher.protocol import encode_body, id_key

TOPICS = ("alpha", "beta")
ORIGIN = id_key("1000-0")
CLOCK = id_key("2000-3")
NOTHING_TRIMMED = [("alpha", 0), ("beta", 0)]


def check(
    position: Position,
    *,
    clock: int | None = CLOCK,
    origin: int | None = ORIGIN,
    trimmed: list[tuple[str, int]] | None = None,
    topics: tuple[str, ...] = TOPICS,
) -> Reset | None:
    return check_history(position, topics, clock, origin, trimmed or NOTHING_TRIMMED)


# -- Position -------------------------------------------------------------------------------


def test_last_event_id_position_replays_ids_strictly_after_it() -> None:
    position = Position.after("1500-7")
    assert position.kind is PositionKind.LAST_EVENT_ID
    assert position.event_id == "1500-7"
    assert position.after_key == id_key("1500-7")
    assert not position.from_beginning


def test_since_position_includes_the_first_id_of_that_millisecond() -> None:
    position = Position.since(1500)
    assert position.kind is PositionKind.SINCE
    assert position.event_id == "1500-0"
    assert position.after_key == id_key("1500-0") - 1
    assert position.after_key < id_key("1500-0") < id_key("1500-1")
    assert position.after_key >= id_key("1499-99999")


@pytest.mark.parametrize("position", [Position.after("0-0"), Position.since(0)], ids=str)
def test_zero_positions_mean_from_the_beginning(position: Position) -> None:
    assert position.from_beginning
    assert position.after_key == 0


def test_the_first_possible_id_is_not_the_beginning() -> None:
    assert not Position.after("0-1").from_beginning
    assert not Position.since(1).from_beginning


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "1", "1-", "-1", "1-2-3", "1.0-0", "-1-0", "1-0 ", "18446744073709551616-0"],
)
def test_a_malformed_last_event_id_is_a_value_error(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid event id"):
        Position.after(bad)


# -- check_history: origin and clock ---------------------------------------------------------


def test_full_history_needs_no_reset() -> None:
    assert check(Position.after("1500-0")) is None
    assert check(Position.since(1500)) is None


@pytest.mark.parametrize("last_id", ["999-0", "999-99", "1-0", "0-1"])
def test_last_event_id_older_than_origin_is_history_lost_for_every_topic(last_id: str) -> None:
    assert check(Position.after(last_id)) == Reset(ResetReason.HISTORY_LOST, TOPICS)


def test_last_event_id_equal_to_origin_is_complete() -> None:
    assert check(Position.after("1000-0")) is None
    assert check(Position.after("1000-1")) is None


def test_last_event_id_newer_than_the_clock_is_a_future_id() -> None:
    assert check(Position.after("2000-4")) == Reset(ResetReason.FUTURE_ID, TOPICS)
    assert check(Position.after("9999999999999-0")) == Reset(ResetReason.FUTURE_ID, TOPICS)


def test_last_event_id_equal_to_the_clock_is_complete() -> None:
    assert check(Position.after("2000-3")) is None


@pytest.mark.parametrize(
    ("clock", "origin"), [(None, None), (CLOCK, None), (None, ORIGIN)], ids=["none", "no-origin",
                                                                           "no-clock"]
)  # fmt: skip
def test_last_event_id_on_an_engine_without_history_is_history_lost(
    clock: int | None, origin: int | None
) -> None:
    """A fresh or flushed engine cannot replay what the client missed."""
    reset = check(Position.after("1500-0"), clock=clock, origin=origin)
    assert reset == Reset(ResetReason.HISTORY_LOST, TOPICS)


def test_since_on_an_engine_without_history_is_not_a_reset() -> None:
    """Nothing was ever published: "everything since T" is complete (and empty)."""
    assert check(Position.since(1500), clock=None, origin=None) is None


def test_since_equal_to_the_origin_millisecond_is_not_a_reset() -> None:
    assert check(Position.since(1000)) is None


def test_since_before_the_origin_is_history_lost() -> None:
    assert check(Position.since(999)) == Reset(ResetReason.HISTORY_LOST, TOPICS)


def test_since_after_the_clock_is_not_a_future_id() -> None:
    """``since`` is a time, not an id this engine issued: a later time just has no events yet."""
    assert check(Position.since(3000)) is None


# -- check_history: trimming ----------------------------------------------------------------


def test_a_topic_trimmed_after_the_position_is_reset_naming_only_that_topic() -> None:
    trimmed = [("alpha", id_key("1600-0")), ("beta", id_key("1200-0"))]
    reset = check(Position.after("1500-0"), trimmed=trimmed)
    assert reset == Reset(ResetReason.TRIMMED, ("alpha",))


def test_every_topic_trimmed_after_the_position_is_named_in_request_order() -> None:
    topics = ("c", "a", "b")
    trimmed = [("c", id_key("1700-0")), ("a", 0), ("b", id_key("1600-0"))]
    reset = check(Position.after("1500-0"), trimmed=trimmed, topics=topics)
    assert reset == Reset(ResetReason.TRIMMED, ("c", "b"))


def test_trimming_up_to_the_position_itself_is_complete() -> None:
    """The client already has the last trimmed event."""
    trimmed = [("alpha", id_key("1500-0")), ("beta", id_key("1499-0"))]
    assert check(Position.after("1500-0"), trimmed=trimmed) is None


def test_since_is_checked_for_trimming_inclusively() -> None:
    trimmed = [("alpha", id_key("1500-0")), ("beta", id_key("1499-9"))]
    assert check(Position.since(1500), trimmed=trimmed) == Reset(ResetReason.TRIMMED, ("alpha",))
    assert check(Position.since(1501), trimmed=trimmed) is None


@pytest.mark.parametrize("position", [Position.after("0-0"), Position.since(0)], ids=str)
def test_from_the_beginning_is_never_history_lost(position: Position) -> None:
    """Asking for everything retained cannot miss history before the origin or a flush."""
    assert check(position) is None
    assert check(position, clock=None, origin=None) is None


@pytest.mark.parametrize("position", [Position.after("0-0"), Position.since(0)], ids=str)
def test_from_the_beginning_is_still_checked_for_trimming(position: Position) -> None:
    trimmed = [("alpha", 0), ("beta", id_key("1100-0"))]
    assert check(position, trimmed=trimmed) == Reset(ResetReason.TRIMMED, ("beta",))


# -- merge_unique ---------------------------------------------------------------------------


def frame(event_id: str, data: str = "") -> Frame:
    return Frame.from_body(event_id, encode_body(data or event_id))


def ids(frames: list[Frame]) -> list[str]:
    return [f.data.split(b"\n", 1)[0].removeprefix(b"id: ").decode() for f in frames]


def test_frames_carry_their_id_key_bytes_and_event_name() -> None:
    made = Frame.from_body("5-1", encode_body("x", "progress"))
    assert made == Frame(id_key("5-1"), b"id: 5-1\nevent: progress\ndata: x\n\n", b"progress")
    assert Frame.from_live(made.data) == made
    assert Frame.from_live(b"id: 6-0\ndata: y\n\n").event == b"message"


def test_merge_unique_merges_runs_in_id_order() -> None:
    runs = [
        [frame("1-0"), frame("3-0"), frame("10-0")],
        [frame("2-0"), frame("9-5"), frame("11-0")],
        [frame("9-4")],
    ]
    assert ids(merge_unique(runs)) == ["1-0", "2-0", "3-0", "9-4", "9-5", "10-0", "11-0"]


def test_merge_unique_keeps_one_copy_of_an_id_published_to_several_topics() -> None:
    shared = frame("5-0", "to both")
    runs = [[frame("1-0"), shared, frame("7-0")], [frame("2-0"), shared, frame("6-0")]]
    merged = merge_unique(runs)
    assert ids(merged) == ["1-0", "2-0", "5-0", "6-0", "7-0"]
    assert merged.count(shared) == 1


def test_merge_unique_with_three_runs_sharing_ids() -> None:
    a, b = frame("4-0"), frame("8-0")
    runs = [[a, b], [frame("3-0"), a, b], [a, frame("9-0")]]
    assert ids(merge_unique(runs)) == ["3-0", "4-0", "8-0", "9-0"]


def test_merge_unique_handles_empty_and_single_runs() -> None:
    assert merge_unique([]) == []
    assert merge_unique([[], []]) == []
    run = [frame("1-0"), frame("2-0")]
    merged = merge_unique([run])
    assert merged == run
    merged.append(frame("3-0"))
    assert len(run) == 2, "the result must not alias the caller's run"
    assert ids(merge_unique([[], run])) == ["1-0", "2-0"]
