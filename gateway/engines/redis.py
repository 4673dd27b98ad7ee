"""The production engine: Redis Streams for history, Redis pub/sub for live frames.

The pub/sub link is one raw redis-py connection read by one task. It is not redis-py's
``PubSub`` object, which may reconnect and re-subscribe silently and so lose frames without
notice; here a dropped link always reaches ``on_lost``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.engines.base import (
    Engine,
    EngineUnavailable,
    Frame,
    Position,
    Replay,
    Reset,
    ResetReason,
    check_history,
    merge_unique,
)
from gateway.publishing import PublishFailed
from publisher import Message, Retention
from publisher._redis import (
    AsyncRedisTransport,
    NotReplicated,
    connect_async,
    permanent_failure,
    sentinel_target,
)
from publisher._schema import PREV_FIELD, STREAM_FIELD, Keys, id_key, key_to_id

log = logging.getLogger("gateway.engine")

REPLAY_PAGE = 1000
REDIS_CONCURRENCY = 64
"""Replays and publishes in flight at once. A reconnect storm opens thousands of streams in a
second; past this they queue here instead of each taking a Redis connection (redis-py's pool
raises "Too many connections" rather than waiting)."""
PUBLISH_RETRY_FOR = 2.0
MAX_RECONNECT_DELAY = 2.0
MAX_KEY = (1 << 128) - 1
_BODY = STREAM_FIELD.encode()
_PREV = PREV_FIELD.encode()


def _key_or_none(value: Any) -> int | None:
    return None if value is None else id_key(value)


def _pubsub_pool(url: str) -> ConnectionPool:
    """Connections for the pub/sub link: no read timeout (it idles), no silent retries."""
    options: dict[str, Any] = {
        "protocol": 2,
        "socket_timeout": None,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "retry": Retry(NoBackoff(), 0),
    }
    target = sentinel_target(url)
    if target is None:
        return ConnectionPool.from_url(url, **options)
    sentinel = Sentinel(target.sentinels, socket_timeout=2.0, socket_connect_timeout=2.0)  # type: ignore[no-untyped-call]
    return SentinelConnectionPool(  # type: ignore[no-untyped-call]
        target.service, sentinel, db=target.db, username=target.username,
        password=target.password, **options,
    )  # fmt: skip


def _after(key: int) -> str:
    """An XRANGE start just after ``key`` (``(max`` is not a valid range in Redis)."""
    return "(" + key_to_id(key) if key < MAX_KEY else "+"


class RedisEngine(Engine):
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "sse",
        retention: Retention | None = None,
        subscribe_timeout: float = 5.0,
        probe_interval: float = 5.0,
        idempotency_ttl: float = 300.0,
        publish_replicas: int = 0,
    ) -> None:
        super().__init__()
        self.keys = Keys(prefix)
        self.client = connect_async(url, max_connections=REDIS_CONCURRENCY + 16)
        self._slots = asyncio.Semaphore(REDIS_CONCURRENCY)
        self.transport = AsyncRedisTransport(
            self.client, self.keys, retention or Retention(),
            retry_for=PUBLISH_RETRY_FOR, idempotency_ttl=idempotency_ttl,
            wait_replicas=publish_replicas,
        )  # fmt: skip
        self.subscribe_timeout = subscribe_timeout
        self.probe_interval = probe_interval
        self._pubsub_pool = _pubsub_pool(url)
        self._channel_prefix = self.keys.channel_prefix.encode()
        self._probe_channel = self.keys.probe(uuid.uuid4().hex).encode()
        self._probe_seen = asyncio.Event()
        self._conn: AbstractConnection | None = None
        self._connected = asyncio.Event()
        self._confirmations: dict[bytes, deque[asyncio.Future[None] | None]] = {}
        self._send_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._topics: set[str] = set()
        """Topics to keep subscribed across reconnects."""
        self._seen: int | None = None
        """Every frame up to this id was delivered live or predates the subscriptions
        (None until the first link is up)."""
        self._held: list[tuple[str, Frame]] | None = None
        """Live frames that arrive while a reconnected link backfills (None when live)."""

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read_forever(), name="sse-gateway pubsub reader"),
            asyncio.create_task(self._probe_forever(), name="sse-gateway pubsub probe"),
        ]

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()
        await self._pubsub_pool.disconnect()

    async def ready(self) -> bool:
        if self._conn is None or self._held is not None:
            return False
        try:
            return bool(await asyncio.wait_for(self.client.ping(), 2.0))
        except (RedisError, OSError, TimeoutError):
            return False

    # -- live ---------------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        """Keep one pub/sub link; after each (re)connect, re-subscribe and backfill from the
        streams whatever was published while the link was down, before any newer frame."""
        backoff = 0.05
        while not self._closing:
            conn = self._pubsub_pool.make_connection()  # type: ignore[no-untyped-call]
            recovery: asyncio.Task[None] | None = None
            try:
                await conn.connect()
                self._held = []
                self._conn = conn
                self._connected.set()
                recovery = asyncio.create_task(self._recover(conn), name="sse-gateway backfill")
                recovery.add_done_callback(self._recovered)
                while True:
                    self._handle(await conn.read_response(timeout=None))
                    if recovery is not None and recovery.done():
                        recovery.result()
                        recovery = None
                        backoff = 0.05
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError, EngineUnavailable) as exc:
                if not self._closing:
                    log.warning("pub/sub link lost: %s", exc)
            except Exception:
                log.exception("pub/sub reader failed; reconnecting")
            finally:
                self._drop_link()
                if recovery is not None:
                    recovery.cancel()
                    await asyncio.gather(recovery, return_exceptions=True)
                await conn.disconnect()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, MAX_RECONNECT_DELAY)

    async def _recover(self, conn: AbstractConnection) -> None:
        """Subscribe the probe channel and every active topic, then read what was missed."""
        try:
            topics = sorted(self._topics)
            async with self._send_lock:
                await conn.send_command("SUBSCRIBE", self._probe_channel)
                waiters = [self._queue_confirmation(topic) for topic in topics]
                if topics:
                    channels = [self.keys.channel(t).encode() for t in topics]
                    await conn.send_command("SUBSCRIBE", *channels)
            if waiters:
                await asyncio.wait_for(asyncio.gather(*waiters), self.subscribe_timeout)
            if self._seen is not None and topics:
                since = Position.after(key_to_id(self._seen))
                runs, reset, clock = await self._read_runs(topics, since)
                if reset is not None and reset.reason is ResetReason.FUTURE_ID:
                    # This node saw frames that this Redis no longer has (a failover or a
                    # restart lost its last writes): nothing after them is missing, and a
                    # retried publish that takes its first id again is skipped by each client.
                    reset = None
            else:
                runs, reset = {}, None
                clock = _key_or_none(await self.client.get(self.keys.clock)) or 0
        except (RedisError, OSError, TimeoutError) as exc:
            raise EngineUnavailable(f"backfill failed: {exc}") from None
        self._release(runs, reset, clock)

    def _recovered(self, task: asyncio.Task[None]) -> None:
        """A failed backfill drops the link (waking the reader), so it is tried again."""
        if task.cancelled() or task.exception() is None:
            return
        conn = self._conn
        if conn is not None:
            log.warning("backfill failed: %s", task.exception())
            self._tasks.append(asyncio.create_task(conn.disconnect()))

    def _release(self, runs: dict[str, list[Frame]], reset: Reset | None, clock: int) -> None:
        lost = set(reset.topics) if reset is not None else set()
        if lost:
            self.on_lost(sorted(lost))
        backfill = sorted(
            ((frame.key, topic, frame) for topic, run in runs.items() if topic not in lost
             for frame in run),
            key=lambda item: item[0],
        )  # fmt: skip
        for _, topic, frame in backfill:
            self.on_frame(topic, frame)
        held, self._held = self._held or [], None
        self._seen = max(self._seen or 0, clock)
        for topic, frame in held:
            if frame.key > clock or topic not in runs:
                self._deliver(topic, frame)
        if backfill or lost:
            log.info(
                "pub/sub link restored: %d events backfilled, %d topics lost history",
                len(backfill), len(lost),
            )  # fmt: skip

    def _deliver(self, topic: str, frame: Frame) -> None:
        if self._seen is None or frame.key > self._seen:
            self._seen = frame.key
        self.on_frame(topic, frame)

    async def _probe_forever(self) -> None:
        """Publish to this node's own channel through the command connection and expect it
        back on the pub/sub link: a link left on a demoted server hears nothing."""
        if self.probe_interval <= 0:
            return
        timeout = max(1.0, min(3.0, self.probe_interval))
        while True:
            await asyncio.sleep(self.probe_interval)
            conn = self._conn
            if conn is None or self._held is not None:
                continue
            self._probe_seen.clear()
            try:
                primary = await asyncio.wait_for(self._primary_address(), timeout)
                at = (getattr(conn, "host", None), getattr(conn, "port", None))
                if primary and at != primary and conn is self._conn:
                    log.warning("pub/sub link is on a former primary; moving to %s:%s", *primary)
                    await conn.disconnect()
                    continue
                await asyncio.wait_for(self.client.publish(self._probe_channel, b"probe"), timeout)
                await asyncio.wait_for(self._probe_seen.wait(), timeout)
            except TimeoutError:  # before OSError, of which it is a subclass
                if conn is self._conn:
                    log.warning("pub/sub link is silent: reconnecting")
                    await conn.disconnect()
            except (RedisError, OSError):
                continue  # Redis itself is unreachable; the reader notices on its own

    async def _primary_address(self) -> tuple[str, int] | None:
        """Under Sentinel, where the primary is now (None otherwise).

        A demoted primary keeps its pub/sub clients, and until Sentinel reconfigures it (up to
        ~10 s) it hears nothing published on the new one: only asking Sentinel tells. Asking
        through the command pool also drops its idle connections to the former primary."""
        pool = self.client.connection_pool
        if not isinstance(pool, SentinelConnectionPool):
            return None
        host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]
        return str(host), int(port)

    def _drop_link(self) -> None:
        self._conn = None
        self._connected.clear()
        for waiters in self._confirmations.values():
            for waiter in waiters:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(EngineUnavailable("pub/sub link lost"))
        self._confirmations.clear()

    def _handle(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == b"message":
            channel = message[1]
            if channel == self._probe_channel:
                self._probe_seen.set()
                return
            try:
                topic = channel[len(self._channel_prefix) :].decode()
                frame = Frame.from_live(message[2])
            except (ValueError, UnicodeDecodeError):
                log.warning("ignored a message that is not a frame on %r", channel[:200])
                return
            if self._held is not None:
                self._held.append((topic, frame))
            else:
                self._deliver(topic, frame)
        elif kind in (b"subscribe", b"unsubscribe"):
            waiters = self._confirmations.get(message[1])
            if not waiters:
                return
            waiter = waiters.popleft()
            if not waiters:
                del self._confirmations[message[1]]
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _queue_confirmation(self, topic: str) -> asyncio.Future[None]:
        waiter = asyncio.get_running_loop().create_future()
        channel = self.keys.channel(topic).encode()
        self._confirmations.setdefault(channel, deque()).append(waiter)
        return waiter

    async def _send(self, verb: str, topic: str, waiter: asyncio.Future[None] | None) -> None:
        """Record the expected confirmation and write the command under one FIFO lock, so the
        confirmations come back in the order they were recorded, and commands reach Redis in
        the order the hub issued them."""
        async with self._send_lock:
            conn = self._conn
            if conn is None:
                raise EngineUnavailable("pub/sub link is down")
            channel = self.keys.channel(topic).encode()
            self._confirmations.setdefault(channel, deque()).append(waiter)
            await conn.send_command(verb, channel)

    async def subscribe(self, topic: str) -> None:
        self._topics.add(topic)
        try:
            await asyncio.wait_for(self._connected.wait(), self.subscribe_timeout)
            waiter = asyncio.get_running_loop().create_future()
            await self._send("SUBSCRIBE", topic, waiter)
            await asyncio.wait_for(waiter, self.subscribe_timeout)
        except (TimeoutError, RedisError, OSError) as exc:
            raise EngineUnavailable(f"could not subscribe to {topic!r}: {exc}") from None

    async def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)
        try:
            await self._send("UNSUBSCRIBE", topic, None)
        except (RedisError, OSError, EngineUnavailable) as exc:
            log.debug("unsubscribe %s skipped: %s", topic, exc)

    # -- history --------------------------------------------------------------------------------

    async def replay(self, topics: Sequence[str], position: Position | None) -> Replay:
        try:
            async with self._slots:
                return await self._replay(topics, position)
        except (RedisError, OSError) as exc:
            raise EngineUnavailable(f"replay failed: {exc}") from None

    async def _replay(self, topics: Sequence[str], position: Position | None) -> Replay:
        if position is None:
            return Replay([], None, _key_or_none(await self.client.get(self.keys.clock)) or 0)
        runs, reset, clock = await self._read_runs(topics, position)
        return Replay(merge_unique(list(runs.values())), reset, clock)

    async def _read_runs(
        self, topics: Sequence[str], position: Position
    ) -> tuple[dict[str, list[Frame]], Reset | None, int]:
        """Each topic's entries after ``position`` up to the clock, and what history lacks."""
        after = position.after_key
        runs: dict[str, list[Frame]] = {t: [] for t in topics}
        missing = dict.fromkeys(topics, 0)
        cursors = dict.fromkeys(topics, after)
        clock_key = origin_key = None
        first = True
        pending = list(topics)
        while pending:
            # Each round is atomic; the first also reads the clock. Entries after the clock
            # arrive live (the hub subscribed before this), so they only serve to check the
            # back-link of what came before them.
            async with self.client.pipeline(transaction=True) as pipe:
                if first:
                    pipe.get(self.keys.clock)
                    pipe.get(self.keys.origin)
                for topic in pending:
                    start = _after(cursors[topic])
                    pipe.xrange(self.keys.stream(topic), start, "+", count=REPLAY_PAGE)
                results = await pipe.execute()
            if first:
                clock_key, origin_key = _key_or_none(results[0]), _key_or_none(results[1])
                results = results[2:]
                first = False
            bound = clock_key or 0
            still = []
            for topic, entries in zip(pending, results, strict=True):
                run = runs[topic]
                done = len(entries) < REPLAY_PAGE
                for entry_id, fields in entries:
                    frame = Frame.from_body(entry_id, fields[_BODY])
                    prev = id_key(fields.get(_PREV, b"0-0"))
                    if prev > (run[-1].key if run else after):
                        missing[topic] = max(missing[topic], prev)
                    if frame.key > bound:
                        done = True
                        break
                    run.append(frame)
                if not done:
                    cursors[topic] = run[-1].key
                    still.append(topic)
            pending = still
        reset = check_history(position, topics, clock_key, origin_key, missing.items())
        return runs, reset, clock_key or 0

    async def publish(self, message: Message) -> str:
        """Transient errors (after the transport's retries) are ``EngineUnavailable``; what
        no retry can fix is ``PublishFailed``; ``NotReplicated`` passes through (the event
        is stored and delivered)."""
        try:
            async with self._slots:
                return (await self.transport.send([message]))[0]
        except NotReplicated:
            raise
        except (RedisError, OSError) as exc:
            failure = permanent_failure(exc)
            if failure is not None:
                raise PublishFailed(failure, str(exc)) from None
            raise EngineUnavailable(f"publish failed: {exc}") from None
