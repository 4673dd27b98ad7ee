"""``sse-gateway pg-bridge``: publish a PostgreSQL transactional outbox.

An app (or a trigger) calls ``sse_emit(topics, event, data)`` in the transaction that changes
its rows; the row lands in ``sse_outbox`` and leaves only if that transaction commits. The
bridge LISTENs for the commit's wake-up (and polls as a safety net), publishes unsent rows in
commit order with ``pg-outbox-<id>`` as idempotency key, and marks them sent in the same
transaction that read them.

- Commit order: a deferred trigger gives each outbox transaction a ``seq`` under a lock held
  until it commits, so ``seq`` order is commit order (see gateway/sql/outbox.sql).
- Several bridges: a batch runs under a transaction-scoped advisory lock, so one bridge
  publishes at a time and the others take over when it stops; none publishes a row twice.
- A crash between publish and mark: the batch's transaction rolls back, and the next batch
  publishes the same rows with the same keys, which the gateway answers with the first ids
  (within the idempotency TTL, 300 s by default): nothing is sent twice.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from importlib.resources import files
from types import FrameType
from typing import TYPE_CHECKING, Any

import redis

from publisher import Publisher, PublishError
from publisher.protocol import DEFAULT_IDEMPOTENCY_TTL, DEFAULT_PREFIX

if TYPE_CHECKING:  # psycopg is the optional `pg` extra: imported where it is used
    import psycopg

log = logging.getLogger("gateway.pg_bridge")

ENV = "SSE_GATEWAY_PG_"
DEFAULT_CHANNEL = "sse_outbox"
BRIDGE_LOCK = (1397966165, 2)
"""The advisory lock a batch holds (the commit seal in outbox.sql uses ``(…, 1)``)."""
CHANNEL_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,62}")

SELECT_BATCH = """
SELECT id, topics, event, data FROM sse_outbox
WHERE sent_at IS NULL AND seq IS NOT NULL
ORDER BY seq, id LIMIT %s FOR UPDATE
"""
PRUNE = "DELETE FROM sse_outbox WHERE sent_at < now() - make_interval(secs => %s)"


@dataclass(frozen=True)
class BridgeSettings:
    dsn: str
    url: str
    prefix: str = DEFAULT_PREFIX
    token: str | None = None
    channel: str = DEFAULT_CHANNEL
    batch_size: int = 100
    poll_interval: float = 5.0
    connect_timeout: int = 10
    statement_timeout: float = 30.0
    keep_sent: float = 86400.0
    idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL


def outbox_sql(channel: str = DEFAULT_CHANNEL) -> str:
    """The install script, for the NOTIFY channel ``channel``."""
    check_channel(channel)
    text = files("gateway").joinpath("sql/outbox.sql").read_text(encoding="utf-8")
    return text.replace("__CHANNEL__", channel)


def check_channel(channel: str) -> str:
    if not CHANNEL_PATTERN.fullmatch(channel):
        raise ValueError(f"channel {channel!r}: lower-case letters, digits and _ only")
    return channel


def connect(settings: BridgeSettings) -> psycopg.Connection[Any]:
    """An autocommit connection whose statements and idle transactions are bounded."""
    import psycopg

    conn = psycopg.connect(
        settings.dsn,
        autocommit=True,
        connect_timeout=settings.connect_timeout,
        application_name="sse-gateway pg-bridge",
    )
    ms = int(settings.statement_timeout * 1000)
    conn.execute(f"SET statement_timeout = {ms}")
    conn.execute(f"SET lock_timeout = {ms}")
    # A bridge that stops answering mid-batch (a hung publish, a lost network) releases its
    # row locks and advisory lock after this, so another bridge can go on.
    conn.execute(f"SET idle_in_transaction_session_timeout = {2 * ms}")
    return conn


def install(settings: BridgeSettings) -> None:
    with connect(settings) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (BRIDGE_LOCK[0], 0))
        conn.execute(outbox_sql(settings.channel).encode())


STOP_CHECK = 0.25
"""Seconds between two looks at whether the bridge was told to stop while it waits."""


class Bridge:
    def __init__(self, settings: BridgeSettings, publisher: Publisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self.stopping = threading.Event()
        self.published = 0

    def batch(self, conn: psycopg.Connection[Any]) -> int | None:
        """Publish one batch; the number of rows, or None while another bridge is active."""
        with conn.transaction():
            row = conn.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", BRIDGE_LOCK).fetchone()
            if row is None or not row[0]:
                return None
            rows = conn.execute(SELECT_BATCH, (self.settings.batch_size,)).fetchall()
            for outbox_id, topics, event, data in rows:
                self.publisher.publish(
                    list(topics), data, event, idempotency_key=f"pg-outbox-{outbox_id}"
                )
            if rows:
                ids = [r[0] for r in rows]
                conn.execute("UPDATE sse_outbox SET sent_at = now() WHERE id = ANY(%s)", (ids,))
        self.published += len(rows)
        return len(rows)

    def run(self) -> None:
        """Publish until stopped; a lost database or publish target is retried every poll
        interval (the failed batch rolled back, so nothing is lost or sent twice)."""
        import psycopg

        while not self.stopping.is_set():
            try:
                self.serve()
            except (psycopg.Error, OSError, PublishError, redis.RedisError, ValueError) as exc:
                log.warning("pg-bridge: %s: %s; retrying", type(exc).__name__, exc)
                self.stopping.wait(self.settings.poll_interval)

    def serve(self) -> None:
        settings = self.settings
        with connect(settings) as conn:
            conn.execute(f"LISTEN {check_channel(settings.channel)}")
            log.info("pg-bridge: listening on %s", settings.channel)
            prune_at = 0.0
            while not self.stopping.is_set():
                count = self.batch(conn)
                if count == settings.batch_size:
                    continue  # more may be waiting
                now = time.monotonic()
                if settings.keep_sent > 0 and count is not None and now >= prune_at:
                    conn.execute(PRUNE, (settings.keep_sent,))
                    prune_at = now + 60.0
                self.wait_for_commit(conn)

    def wait_for_commit(self, conn: psycopg.Connection[Any]) -> None:
        """Wait for a commit's wake-up, at most one poll interval (a missed NOTIFY, or the
        active bridge stopping, is then noticed by the poll). The wait is taken in slices of
        ``STOP_CHECK`` seconds: a signal does not interrupt it (Python resumes the wait after
        EINTR), and a stopped bridge must not sit out a long poll interval."""
        deadline = time.monotonic() + self.settings.poll_interval
        while not self.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            for _ in conn.notifies(timeout=min(STOP_CHECK, left), stop_after=1):
                return

    def stop(self) -> None:
        self.stopping.set()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    inst = actions.add_parser("install", help="install the outbox table, sse_emit and triggers")
    run = actions.add_parser("run", help="publish the outbox's committed rows")
    for sub in (inst, run):
        sub.add_argument(
            "--dsn", default=os.environ.get(ENV + "DSN"), help=f"libpq DSN (${ENV}DSN)"
        )
        sub.add_argument(
            "--channel", default=os.environ.get(ENV + "CHANNEL", DEFAULT_CHANNEL),
            help=f"the NOTIFY channel (${ENV}CHANNEL, default {DEFAULT_CHANNEL})",
        )  # fmt: skip
    run.add_argument(
        "--url", default=os.environ.get("SSE_GATEWAY_REDIS_URL"),
        help="redis:// to publish directly, or a gateway's http:// URL ($SSE_GATEWAY_REDIS_URL)",
    )  # fmt: skip
    defaults = BridgeSettings
    run.add_argument("--prefix", default=os.environ.get("SSE_GATEWAY_PREFIX", defaults.prefix))
    run.add_argument("--token", default=os.environ.get("SSE_GATEWAY_TOKEN"))
    run.add_argument(
        "--batch-size", type=int,
        default=int(os.environ.get(ENV + "BATCH_SIZE", defaults.batch_size)),
    )  # fmt: skip
    run.add_argument(
        "--poll-interval", type=float,
        default=float(os.environ.get(ENV + "POLL_INTERVAL", defaults.poll_interval)),
    )  # fmt: skip
    run.add_argument(
        "--keep-sent", type=float,
        default=float(os.environ.get(ENV + "KEEP_SENT", defaults.keep_sent)),
    )  # fmt: skip
    run.add_argument(
        "--idempotency-ttl", type=float, default=float(
            os.environ.get("SSE_GATEWAY_IDEMPOTENCY_TTL", DEFAULT_IDEMPOTENCY_TTL)
        ), help="seconds a redis:// publish's key is remembered (a gateway uses its own)",
    )  # fmt: skip


def settings_from(args: argparse.Namespace) -> BridgeSettings:
    if not args.dsn:
        raise SystemExit(f"pg-bridge: --dsn (or ${ENV}DSN) is required")
    check_channel(args.channel)
    if args.action == "install":
        return BridgeSettings(dsn=args.dsn, url="", channel=args.channel)
    if not args.url:
        raise SystemExit("pg-bridge: --url (or $SSE_GATEWAY_REDIS_URL) is required")
    if args.batch_size < 1 or args.poll_interval <= 0:
        raise SystemExit("pg-bridge: --batch-size and --poll-interval must be positive")
    return BridgeSettings(
        dsn=args.dsn, url=args.url, prefix=args.prefix, token=args.token,
        channel=args.channel, batch_size=args.batch_size,
        poll_interval=args.poll_interval, keep_sent=args.keep_sent,
        idempotency_ttl=args.idempotency_ttl,
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise SystemExit("pg-bridge needs psycopg 3: pip install 'sse-gateway[pg]'") from None
    try:
        settings = settings_from(args)
    except ValueError as exc:
        raise SystemExit(f"pg-bridge: {exc}") from None
    if args.action == "install":
        install(settings)
        print("pg-bridge: outbox installed")
        return 0
    with Publisher.from_url(
        settings.url, prefix=settings.prefix, token=settings.token,
        idempotency_ttl=settings.idempotency_ttl,
    ) as pub:  # fmt: skip
        bridge = Bridge(settings, pub)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            bridge.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        bridge.run()
    return 0
