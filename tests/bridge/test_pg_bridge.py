"""The PostgreSQL bridge (issue 12, item 5): a real postgres, a real Redis, a real gateway node
and real ``sse-gateway pg-bridge`` processes."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from publisher import Publisher
from publisher.subscriber import Event, subscribe
from tests.conftest import GatewayFactory
from tests.support.gateway import GatewayProcess
from tests.support.postgres import own_database
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

TOPIC = "orders"
DONE = "done"


@pytest.fixture
def dsn(postgres_dsn: str) -> Iterator[str]:
    """A database of the test's own, with the outbox installed by the CLI."""
    with own_database(postgres_dsn) as own:
        done = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "pg-bridge", "install", "--dsn", own],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        yield own


class Bridges:
    """``sse-gateway pg-bridge run`` processes, all stopped at the end."""

    def __init__(self, dsn: str, url: str, prefix: str) -> None:
        self.args = [
            sys.executable, "-m", "gateway.cli", "pg-bridge", "run", "--dsn", dsn,
            "--url", url, "--prefix", prefix, "--batch-size", "25",
        ]  # fmt: skip
        self.processes: list[subprocess.Popen[bytes]] = []
        self.logged: dict[int, bytes] = {}
        """What each bridge (by pid) wrote to stderr before it was listening."""

    def start(self, poll_interval: float = 0.5, listening: bool = False) -> subprocess.Popen[bytes]:
        """A bridge; with ``listening``, once its ``listening on`` line was written (its SIGTERM
        handler is then in place, and a second bridge runs at the same time as the first)."""
        args = [*self.args, "--poll-interval", str(poll_interval)]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.processes.append(process)
        if not listening:
            return process
        assert process.stderr is not None
        fd = process.stderr.fileno()
        logged = b""

        def ready() -> bool:
            nonlocal logged
            while select.select([fd], [], [], 0)[0]:
                chunk = os.read(fd, 4096)
                assert chunk, f"the bridge exited: {logged!r}"
                logged += chunk
            return b"listening on" in logged

        wait_until(ready, "the bridge listening", 30)
        self.logged[process.pid] = logged
        return process

    def stop(self) -> None:
        """SIGTERM every bridge still running: each ends cleanly, without a traceback."""
        stopped = [p for p in self.processes if p.poll() is None]
        for process in stopped:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                _, err = process.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                _, err = process.communicate(timeout=5)
            err = self.logged.get(process.pid, b"") + (err or b"")
            if process in stopped:
                assert process.returncode == 0, err
                assert b"Traceback" not in err, err
        self.processes.clear()


@pytest.fixture
def setup(
    dsn: str, redis_url: str, prefix: str, gateway_factory: GatewayFactory
) -> Iterator[tuple[str, Bridges, GatewayProcess]]:
    gateway = gateway_factory("--prefix", prefix, redis_url=redis_url)
    bridges = Bridges(dsn, redis_url, prefix)
    yield dsn, bridges, gateway
    bridges.stop()


class Collector:
    """A live subscriber on TOPIC that records events until the ``done`` event."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.events: list[Event] = []
        self.count = threading.Condition()
        self.subscription = subscribe(gateway.url, TOPIC, since=0, read_timeout=30)
        self.thread = threading.Thread(target=self.read, daemon=True)
        self.thread.start()

    def read(self) -> None:
        with self.subscription as sub:
            for event in sub:
                with self.count:
                    self.events.append(event)
                    self.count.notify_all()
                if event.type == DONE:
                    return

    def wait_for(self, n: int, timeout: float = 30) -> None:
        with self.count:
            assert self.count.wait_for(lambda: len(self.events) >= n, timeout), len(self.events)

    def finish(self, redis_url: str, prefix: str) -> list[Any]:
        """Every change event up to the ``done`` marker, published once the bridges stopped
        (so any duplicate would have arrived before it)."""
        with Publisher.from_url(redis_url, prefix=prefix) as pub:
            pub.publish(TOPIC, {}, DONE)
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert self.events[-1].type == DONE
        return [e.value for e in self.events[:-1]]


def write_changes(dsn: str, writers: int, per_writer: int) -> None:
    """Each transaction emits an event first (its outbox id is taken then), then takes the next
    number from a shared counter row: commits happen in counter order, ids do not."""

    def writer() -> None:
        with psycopg.connect(dsn) as conn:
            for _ in range(per_writer):
                with conn.transaction():
                    row = conn.execute(
                        "SELECT sse_emit(ARRAY[%s], 'change', '{}')", (TOPIC,)
                    ).fetchone()
                    assert row is not None
                    counted = conn.execute("UPDATE counter SET n = n + 1 RETURNING n").fetchone()
                    assert counted is not None
                    conn.execute(
                        "UPDATE sse_outbox SET data = jsonb_build_object('n', %s::int) "
                        "WHERE id = %s",
                        (counted[0], row[0]),
                    )
            conn.commit()

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE counter (n int NOT NULL)")
        conn.execute("INSERT INTO counter VALUES (0)")
    threads = [threading.Thread(target=writer) for _ in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive()


def test_changes_reach_a_subscriber_once_in_commit_order_across_bridge_crashes(
    setup: tuple[str, Bridges, GatewayProcess], redis_url: str, prefix: str
) -> None:
    """Issue 12 item 5: 1000 changes committed by four writers while the bridge is SIGKILLed
    and restarted twice reach a subscriber exactly once, in commit order (the order of the
    counter row every transaction updates: its row lock orders their commits)."""
    dsn, bridges, gateway = setup
    collector = Collector(gateway)
    bridge = bridges.start()
    writing = threading.Thread(target=write_changes, args=(dsn, 4, 250))
    writing.start()
    for seen in (200, 600):
        collector.wait_for(seen)
        bridge.send_signal(signal.SIGKILL)
        bridge.wait(10)
        bridge = bridges.start()
    writing.join(60)
    collector.wait_for(1000)
    bridges.stop()
    values = collector.finish(redis_url, prefix)
    assert [v["n"] for v in values] == list(range(1, 1001))
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM sse_outbox WHERE sent_at IS NULL").fetchone()
    assert row == (0,)
    ids = [e.id for e in collector.events[:-1]]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))


def test_rolled_back_transactions_publish_nothing(
    setup: tuple[str, Bridges, GatewayProcess], redis_url: str, prefix: str
) -> None:
    """Issue 12 item 5: a rolled-back change, by sse_emit or by a row trigger, never leaves;
    the committed one does, with the row as data."""
    dsn, bridges, gateway = setup
    collector = Collector(gateway)
    bridges.start()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE sources (id int PRIMARY KEY, status text)")
        conn.execute(
            "CREATE TRIGGER sources_sse AFTER INSERT OR UPDATE OR DELETE ON sources FOR EACH ROW "
            f"EXECUTE FUNCTION sse_row_change('source', '{TOPIC}', 'source:{{id}}')"
        )
        with conn.transaction(force_rollback=True):
            conn.execute("SELECT sse_emit(ARRAY[%s], 'change', '{\"n\": -1}')", (TOPIC,))
            conn.execute("INSERT INTO sources VALUES (1, 'rolled back')")
        conn.execute("INSERT INTO sources VALUES (2, 'crawling')")
        with conn.transaction(force_rollback=True):
            conn.execute("UPDATE sources SET status = 'rolled back' WHERE id = 2")
        conn.execute("UPDATE sources SET status = 'done' WHERE id = 2")
    collector.wait_for(2)
    bridges.stop()
    values = collector.finish(redis_url, prefix)
    assert [(e.type, v["row"]) for e, v in zip(collector.events[:-1], values, strict=True)] == [
        ("source.insert", {"id": 2, "status": "crawling"}),
        ("source.update", {"id": 2, "status": "done"}),
    ]
    with subscribe(gateway.url, "source:2", since=0, read_timeout=10) as sub:
        assert next(iter(sub)).type == "source.insert"


def test_two_bridges_at_once_publish_each_row_once(
    setup: tuple[str, Bridges, GatewayProcess], redis_url: str, prefix: str
) -> None:
    """Issue 12 item 5: two bridges running at once publish each row once, in commit order."""
    dsn, bridges, gateway = setup
    collector = Collector(gateway)
    first, second = bridges.start(listening=True), bridges.start(listening=True)
    write_changes(dsn, 2, 150)
    collector.wait_for(300)
    assert first.poll() is None
    assert second.poll() is None
    bridges.stop()
    values = collector.finish(redis_url, prefix)
    assert [v["n"] for v in values] == list(range(1, 301))


def test_install_is_idempotent_and_refuses_a_bad_channel(dsn: str) -> None:
    """Issue 12 item 5: the install runs again without error; a channel must be a plain name."""
    again = [sys.executable, "-m", "gateway.cli", "pg-bridge", "install", "--dsn", dsn]
    assert subprocess.run(again, capture_output=True, timeout=30).returncode == 0
    bad = subprocess.run(
        [*again, "--channel", "x; DROP TABLE sse_outbox"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode != 0
    assert "channel" in bad.stderr


def test_changes_committed_while_no_bridge_runs_are_published_when_one_starts(
    setup: tuple[str, Bridges, GatewayProcess], redis_url: str, prefix: str
) -> None:
    """Issue 12 item 5: none is lost while the bridge is down: rows committed with no bridge
    running wait in the outbox and leave, in order, when a bridge starts."""
    dsn, bridges, gateway = setup
    collector = Collector(gateway)
    write_changes(dsn, 2, 40)
    with psycopg.connect(dsn) as conn:
        waiting = conn.execute("SELECT count(*) FROM sse_outbox WHERE sent_at IS NULL").fetchone()
    assert waiting == (80,)
    bridges.start()
    collector.wait_for(80)
    bridges.stop()
    assert [v["n"] for v in collector.finish(redis_url, prefix)] == list(range(1, 81))


def test_a_bridge_whose_database_connection_is_lost_reconnects(
    setup: tuple[str, Bridges, GatewayProcess], redis_url: str, prefix: str
) -> None:
    """Issue 12 item 5: the bridge's session ended by the server (a restart, a failover, an
    admin) is retried after a poll interval; the changes on either side arrive once, in order."""
    dsn, bridges, gateway = setup
    collector = Collector(gateway)
    bridge = bridges.start()
    write_changes(dsn, 1, 20)
    collector.wait_for(20)
    with psycopg.connect(dsn, autocommit=True) as conn:
        ended = conn.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'sse-gateway pg-bridge'"
        ).fetchone()
        assert ended == (1,)
        for _ in range(20):
            conn.execute("SELECT sse_emit(ARRAY[%s], 'change', '{}')", (TOPIC,))
    collector.wait_for(40)
    assert bridge.poll() is None
    bridges.stop()
    values = collector.finish(redis_url, prefix)
    assert [v.get("n") for v in values] == [*range(1, 21), *([None] * 20)]


@pytest.mark.parametrize(
    ("topics", "event"),
    [(["has space"], "change"), ([], "change"), (["ok"], "two\nlines"), (["ok"], "")],
)
def test_an_event_that_cannot_be_published_is_refused_in_the_writers_transaction(
    dsn: str, topics: list[str], event: str
) -> None:
    """Issue 12 item 5: sse_emit refuses bad topics and event names when called, so the writer
    sees the error and no unpublishable row holds back the rows after it."""
    with psycopg.connect(dsn) as conn:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="sse_emit: invalid"):
            conn.execute("SELECT sse_emit(%s::text[], %s, '{}')", (topics, event))
        conn.rollback()
        row = conn.execute("SELECT count(*) FROM sse_outbox").fetchone()
    assert row == (0,)


def test_commits_during_a_batch_are_not_left_for_the_next_poll(
    setup: tuple[str, Bridges, GatewayProcess], redis_url: str, prefix: str
) -> None:
    """Issue 12 item 5: a wake-up that arrives while the bridge is publishing a batch is acted
    on at once: with a 60 s poll interval, steady commits still arrive promptly."""
    dsn, bridges, gateway = setup
    collector = Collector(gateway)
    bridges.start(poll_interval=60)
    write_changes(dsn, 3, 100)
    collector.wait_for(300, timeout=20)
    bridges.stop()
    assert [v["n"] for v in collector.finish(redis_url, prefix)] == list(range(1, 301))


def test_an_idle_bridge_stops_at_once_on_sigterm(
    setup: tuple[str, Bridges, GatewayProcess],
) -> None:
    """A bridge waiting for a commit's wake-up (up to its poll interval, here 60 s) ends
    within a second or two of SIGTERM, as a container's stop expects, not at the next poll."""
    _, bridges, _ = setup
    bridge = bridges.start(poll_interval=60, listening=True)
    started = time.monotonic()
    bridge.send_signal(signal.SIGTERM)
    try:
        bridge.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("the idle bridge was still running 5 s after SIGTERM")
    assert time.monotonic() - started < 5
    assert bridge.returncode == 0
