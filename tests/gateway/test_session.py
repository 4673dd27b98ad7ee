"""The session core as a specification: frames and time in, bytes and decisions out.

No event loop, no socket, no Redis: each test feeds a :class:`Session` and reads what it
returns.
"""

from __future__ import annotations

from gateway.engines.base import Frame
from gateway.session import FIRST, NOT_QUEUED, PING, QUEUED, CloseReason, Phase, Session
from gateway.sinks import http_chunk


def frame(ms: int, event: str = "message", data: str = "x") -> Frame:
    body = (b"event: " + event.encode() + b"\n" if event != "message" else b"") + (
        b"data: " + data.encode() + b"\n\n"
    )
    return Frame.from_body(f"{ms}-0", body)


def key(ms: int) -> int:
    return ms << 64


def live(types: frozenset[bytes] | None = None, max_pending: int = 10_000) -> Session:
    session = Session(("a",), types, max_pending)
    session.start_replay(0, 0)
    session.go_live()
    return session


def test_the_phases_run_replaying_live_closing_closed() -> None:
    session = Session(("a",), None, 10_000)
    phases = [session.phase]
    session.start_replay(0, 0)
    session.go_live()
    phases.append(session.phase)
    assert session.close(CloseReason.CLIENT_CLOSED)
    phases.append(session.phase)
    assert session.closed
    assert session.finished() is CloseReason.CLIENT_CLOSED
    phases.append(session.phase)
    assert phases == [Phase.REPLAYING, Phase.LIVE, Phase.CLOSING, Phase.CLOSED]


def test_live_frames_are_held_while_replaying_and_released_through_the_rule() -> None:
    session = Session(("a", "b"), None, 10_000)
    session.start_replay(key(1), key(1))
    # arrive during the replay: one already replayed, one twice (two topics), one new
    for f in (frame(1), frame(2), frame(2), frame(3)):
        assert session.offer(f, b"") == NOT_QUEUED
    writes, sent, size = session.replay_page([frame(2)], budget=10_000)
    assert (writes, sent, size) == ([frame(2).data], 1, len(frame(2).data))
    events, size = session.go_live()
    assert (events, size) == (1, len(frame(3).data))
    assert session.take() == frame(3).data
    assert session.last_key == key(3)


def test_a_fresh_client_gets_every_frame_that_arrived_after_it_joined() -> None:
    """No position: frames newer than the node's position when the client joined are its own,
    even at or below the clock its replay read; the position still moves to that clock."""
    session = Session(("a",), None, 10_000)
    session.start_replay(key(5), key(9))
    session.offer(frame(7), b"")
    session.go_live()
    assert session.take() == frame(7).data
    assert session.last_key == key(9)


def test_a_client_with_no_position_on_a_followed_topic_goes_live_at_once() -> None:
    """``live_from``: what a stream opened below the request cycle does instead of an empty
    replay; only frames newer than the node's position when it joined are its own."""
    session = Session(("a",), None, 10_000)
    session.live_from(key(5))
    assert session.phase is Phase.LIVE
    assert session.held is None
    assert session.offer(frame(5), b"") == NOT_QUEUED
    assert session.offer(frame(6), b"") == FIRST
    assert session.take() == frame(6).data
    closed = Session(("a",), None, 10_000)
    closed.close(CloseReason.CLIENT_CLOSED)
    closed.live_from(key(5))
    assert closed.phase is Phase.CLOSING


def test_the_id_rule_drops_repeats_and_older_ids() -> None:
    session = live()
    assert session.offer(frame(2), b"w2") == FIRST
    assert session.offer(frame(2), b"w2") == NOT_QUEUED  # the same event on a second topic
    assert session.offer(frame(1), b"w1") == NOT_QUEUED
    assert session.offer(frame(3), b"w3") == QUEUED
    assert session.take() == frame(2).data + frame(3).data
    assert session.events == 2


def test_types_filter_moves_the_position_and_owes_a_position_line() -> None:
    session = live(frozenset({b"wanted"}))
    assert session.offer(frame(4, "other"), b"") == NOT_QUEUED
    assert session.behind
    assert session.offer(frame(5, "wanted"), b"") == FIRST
    assert session.position_line() == b"id: 5-0\n\n"
    assert not session.behind


def test_a_framed_session_queues_the_node_framed_bytes_and_frames_its_own() -> None:
    session = live()
    session.framing = http_chunk
    wire = http_chunk(frame(1).data)
    session.offer(frame(1), wire)
    assert session.out[0] is wire  # framed once per node, shared by every client
    session.write_raw(PING)
    assert session.out[1] == http_chunk(PING)


def test_held_frames_past_the_budget_are_dropped_and_the_replay_reads_on() -> None:
    session = Session(("a",), None, max_pending=2_500)
    session.start_replay(0, 0)
    frames = [frame(n, data="y" * 994) for n in range(1, 6)]
    for f in frames:
        session.offer(f, b"")
    assert session.held is not None
    assert session.held.dropped
    assert session.held.items == []
    assert session.read_on()  # held afresh
    assert not session.held.dropped
    assert not session.read_on()
    session.offer(frames[-1], b"")
    session.replay_page(frames[:4], budget=10_000)
    session.go_live()
    assert session.take() == frames[-1].data


def test_a_replay_page_is_cut_into_writes_of_about_the_budget() -> None:
    session = Session(("a",), None, 10_000)
    session.start_replay(0, 0)
    frames = [frame(n, data="z" * 90) for n in range(1, 6)]
    writes, sent, size = session.replay_page(frames, budget=200)
    assert sent == 5
    assert b"".join(writes) == b"".join(f.data for f in frames)
    assert size == sum(len(f.data) for f in frames)
    assert len(writes) == 3
    assert session.events == 5


def test_a_replay_whose_last_events_are_filtered_ends_with_a_position_line() -> None:
    session = Session(("a",), frozenset({b"kept"}), 10_000)
    session.start_replay(0, 0)
    _, sent, _ = session.replay_page([frame(1, "kept"), frame(2, "skipped")], 10_000)
    assert sent == 1
    assert session.replay_ended(complete=True) == b"id: 2-0\n\n"
    assert session.replay_ended(complete=True) is None  # owed once


def test_no_position_line_passes_a_gap() -> None:
    session = Session(("a",), frozenset({b"kept"}), 10_000)
    session.start_replay(0, 0)
    session.replay_page([frame(1, "skipped")], 10_000)
    assert session.replay_ended(complete=False) is None


def test_an_unframed_client_past_max_pending_is_shed() -> None:
    session = live(max_pending=100)
    session.offer(frame(1, data="a" * 60), b"")
    assert not session.closed
    assert session.offer(frame(2, data="b" * 60), b"") == QUEUED  # counted, then shed
    assert session.reason is CloseReason.SLOW_CONSUMER
    assert session.reason.shed
    assert session.out == []


def test_a_flush_writes_everything_once_or_sheds_a_client_that_does_not_read() -> None:
    session = live(max_pending=1_000)
    session.framing = http_chunk
    session.offer(frame(1), http_chunk(frame(1).data))
    session.offer(frame(2), http_chunk(frame(2).data))
    data = session.flush(buffered=0, closing=False, now=12.5)
    assert data == http_chunk(frame(1).data) + http_chunk(frame(2).data)
    assert session.last_write == 12.5
    assert session.events == 2
    assert session.flush(buffered=0, closing=False, now=13.0) is None  # nothing queued

    session.offer(frame(3), http_chunk(frame(3).data))
    assert session.flush(buffered=990, closing=False, now=14.0) is None
    assert session.reason is CloseReason.SLOW_CONSUMER
    assert session.events == 2  # what was never written is not counted


def test_a_flush_to_a_closing_transport_closes_the_session() -> None:
    session = live()
    session.framing = http_chunk
    session.offer(frame(1), http_chunk(frame(1).data))
    assert session.flush(buffered=0, closing=True, now=1.0) is None
    assert session.reason is CloseReason.CLIENT_CLOSED


def test_a_quiet_client_gets_a_ping_and_a_position_line_when_the_node_moved_on() -> None:
    session = live()
    session.last_write = 100.0
    assert session.heartbeat(quiet_since=99.0, through=None) == NOT_QUEUED  # not quiet yet
    assert session.heartbeat(quiet_since=100.0, through=None) == FIRST
    assert session.take() == PING
    assert session.heartbeat(quiet_since=100.0, through=key(42)) == FIRST
    assert session.take() == b"id: 42-0\n\n" + PING
    assert session.last_key == key(42)
    session.offer(frame(40), b"")  # older than its position now: never sent
    assert session.out == []


def test_no_heartbeat_while_replaying_or_with_bytes_pending() -> None:
    replaying = Session(("a",), None, 10_000)
    assert replaying.heartbeat(quiet_since=1e9, through=None) == NOT_QUEUED
    busy = live()
    busy.offer(frame(1), b"")
    assert busy.heartbeat(quiet_since=1e9, through=None) == NOT_QUEUED


def test_a_transport_that_keeps_unread_bytes_for_send_timeout_is_dropped() -> None:
    session = live()
    assert not session.stall(buffered=10, now=0.0, send_timeout=5.0)
    assert not session.stall(buffered=10, now=5.0, send_timeout=5.0)
    assert not session.stall(buffered=0, now=6.0, send_timeout=5.0)  # it read: starts over
    assert not session.stall(buffered=10, now=7.0, send_timeout=5.0)
    assert session.stall(buffered=10, now=12.1, send_timeout=5.0)
    assert session.reason is CloseReason.SEND_TIMEOUT


def test_the_first_close_counts_and_a_farewell_follows_what_is_queued() -> None:
    told: list[Session] = []
    session = live()
    session.listener = told.append
    session.offer(frame(1), b"")
    assert session.close("max_lifetime", b"retry: 1000\n\n")
    assert not session.close(CloseReason.SHUTDOWN)
    assert told == [session]
    assert session.reason is CloseReason.MAX_LIFETIME
    assert session.take() == frame(1).data + b"retry: 1000\n\n"
    assert session.offer(frame(2), b"") == NOT_QUEUED
    assert session.write_raw(PING) == NOT_QUEUED


def test_a_shed_client_loses_what_is_queued() -> None:
    session = live()
    session.offer(frame(1), b"")
    session.close(CloseReason.SEND_TIMEOUT, b"never sent")
    assert session.out == []


def test_close_reasons_are_the_metric_labels() -> None:
    assert {reason.value for reason in CloseReason} == {
        "client_closed", "slow_consumer", "send_timeout", "max_lifetime", "token_expired",
        "history_lost", "shutdown", "engine_unavailable", "history_unreadable", "closed",
    }  # fmt: skip
    assert {reason for reason in CloseReason if reason.shed} == {
        CloseReason.SLOW_CONSUMER,
        CloseReason.SEND_TIMEOUT,
    }
    assert f"{CloseReason.SHUTDOWN}" == "shutdown"


def test_a_session_never_closed_by_a_reason_finishes_as_closed() -> None:
    session = live()
    assert session.finished() is CloseReason.CLOSED
