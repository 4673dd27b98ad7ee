"""The production engine: Redis Streams for history, Redis pub/sub for live frames.

The pub/sub link is one raw redis-py connection read by one task. It is not redis-py's
``PubSub`` object, which may reconnect and re-subscribe silently and so lose frames without
notice; here a dropped link always reaches ``on_lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError, ResponseError

from gateway.engines.base import (
    Engine,
    EngineObserver,
    EngineUnavailable,
    Frame,
    Head,
    Health,
    HeldFrames,
    History,
    HistoryBroken,
    InvalidStore,
    Position,
    Replay,
    ResetReason,
    TopicRead,
    release,
)
from gateway.publishing import PublishFailed
from publisher.protocol import (
    DEFAULT_IDEMPOTENCY_TTL,
    DEFAULT_PREFIX,
    PREV_FIELD,
    STREAM_FIELD,
    Keys,
    Message,
    Retention,
    id_key,
    key_to_id,
)
from publisher.redis_transport import (
    AsyncRedisTransport,
    NotReplicated,
    connect_async,
    permanent_failure,
    sentinel_target,
)

log = logging.getLogger("gateway.engine")

REDIS_CONCURRENCY = 64
"""Replays and publishes in flight at once. A reconnect storm opens thousands of streams in a
second; past this they queue here instead of each taking a Redis connection (redis-py's pool
raises "Too many connections" rather than waiting)."""
PUBLISH_RETRY_FOR = 2.0
MAX_RECONNECT_DELAY = 2.0
LINK_TIMEOUT = 5.0
"""Seconds the pub/sub link may take to connect (with its handshake) or to write a command."""
BACKFILL_HELD_BYTES = 32 << 20
"""Live frames kept while a reconnected link backfills; past this they are let go and the
backfill reads on from the streams to a newer clock instead."""
HEAD_WINDOW = 0.002
"""Seconds a clock read waits for others to share it (streams opening together)."""
MAX_KEY = (1 << 128) - 1
_BODY = STREAM_FIELD.encode()
_PREV = PREV_FIELD.encode()


def _pubsub_pool(url: str) -> ConnectionPool:
    """Connections for the pub/sub link: bounded connect, handshake and writes, no silent
    retries. Its reads may idle: the reader bounds them itself (see ``_read_link``)."""
    options: dict[str, Any] = {
        "protocol": 2,
        "socket_timeout": LINK_TIMEOUT,
        "socket_connect_timeout": LINK_TIMEOUT,
        "socket_keepalive": True,
        "retry": Retry(NoBackoff(), 0),
    }
    target = sentinel_target(url)
    if target is None:
        if url.startswith("unix://"):
            del options["socket_keepalive"]  # a unix socket connection does not take it
        return ConnectionPool.from_url(url, **options)
    sentinel = Sentinel(target.sentinels, socket_timeout=2.0, socket_connect_timeout=2.0)  # type: ignore[no-untyped-call,unused-ignore]
    return SentinelConnectionPool(  # type: ignore[no-untyped-call]
        target.service, sentinel, db=target.db, username=target.username,
        password=target.password, **options,
    )  # fmt: skip


def _held_key(item: tuple[str, Frame], covered: set[str]) -> int:
    """A held frame's id, or above every id when the backfill did not read its topic."""
    topic, frame = item
    return frame.key if topic in covered else MAX_KEY + 1


def _consume_exception(future: asyncio.Future[Any]) -> None:
    """Every waiter of a shared read may have left: its failure is theirs, not the loop's."""
    if not future.cancelled():
        future.exception()


def _settle(batch: asyncio.Future[Head], read: asyncio.Task[Head]) -> None:
    """Hand the shared read's outcome to everyone waiting for it."""
    if batch.done():
        return
    if read.cancelled():
        batch.cancel()
    elif (exc := read.exception()) is not None:
        batch.set_exception(exc)
    else:
        batch.set_result(read.result())


def _write_refusal(exc: Exception) -> str:
    if isinstance(exc, OutOfMemoryError):
        return "out_of_memory"
    if isinstance(exc, ReadOnlyError):
        return "read_only"
    return "error"


def _after(key: int) -> str:
    """An XRANGE start just after ``key`` (``(max`` is not a valid range in Redis)."""
    return "(" + key_to_id(key) if key < MAX_KEY else "+"


def _stored_id(keys: Keys, name: str, value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return id_key(value)
    except (ValueError, UnicodeDecodeError):
        key = keys.clock if name == "clock" else keys.origin
        raise InvalidStore(
            f"the {name} key {key!r} holds {value[:40]!r}, which is not an event id "
            "(<ms>-<seq>): delete it or set it to the newest id issued"
        ) from None


class RedisHistory(History):
    """Replay reads without transactions, so they keep working when Redis refuses writes (under
    ``maxmemory``, Redis refuses every command queued in MULTI).

    Why that is still exact: the clock is read first, in a round trip of its own. The publish
    script sets the clock and appends to every stream atomically, so each id up to that clock
    is in its streams before the clock read returns, and a later read sees it unless retention
    trimmed it, which the back-links (``p``) of the entries that remain reveal. Ids above the
    clock are published after the node subscribed, so they arrive live; read here, they only
    serve to check back-links. Reads of one page need not be atomic with each other: streams
    only grow at their end and shrink at their start."""

    def __init__(self, client: Any, keys: Keys, slots: asyncio.Semaphore) -> None:
        self.client = client
        self.keys = keys
        self.slots = slots
        self.observer = EngineObserver()
        self._next_head: asyncio.Future[Head] | None = None
        """The clock read that callers may still join: it has not been sent yet."""
        self.store_invalid = False
        """The last clock read found a clock or origin that is not an event id."""

    async def head(self) -> Head:
        """Callers within :data:`HEAD_WINDOW` share one read: new streams arriving together
        (a connect ramp, a reconnect storm) make one round trip, not one each. Still exact:
        the shared read is sent after each caller asked for it, so after its subscribe."""
        batch = self._next_head
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = self._next_head = loop.create_future()
            batch.add_done_callback(_consume_exception)
            loop.call_later(HEAD_WINDOW, self._send_head, batch)
        return await asyncio.shield(batch)

    def _send_head(self, batch: asyncio.Future[Head]) -> None:
        if self._next_head is batch:
            self._next_head = None  # from here on, a caller waits for the next read
        task = asyncio.create_task(self._read_head())
        task.add_done_callback(functools.partial(_settle, batch))

    async def _read_head(self) -> Head:
        try:
            async with self.slots, self.client.pipeline(transaction=False) as pipe:
                pipe.mget(self.keys.clock, self.keys.origin)
                pipe.time()
                started = time.perf_counter()
                (clock, origin), (seconds, micros) = await pipe.execute()
                self.observer.command("head", time.perf_counter() - started)
        except (RedisError, OSError) as exc:
            raise EngineUnavailable(f"reading the clock failed: {exc}") from None
        try:
            head = Head(
                _stored_id(self.keys, "clock", clock),
                _stored_id(self.keys, "origin", origin),
                int(seconds) * 1000 + int(micros) // 1000,
            )
        except InvalidStore:
            self.store_invalid = True
            raise
        self.store_invalid = False
        return head

    async def read(self, requests: Sequence[tuple[str, int, int]]) -> list[TopicRead]:
        try:
            async with self.slots, self.client.pipeline(transaction=False) as pipe:
                for topic, after, count in requests:
                    pipe.xrange(self.keys.stream(topic), _after(after), "+", count=count)
                started = time.perf_counter()
                results = await pipe.execute(raise_on_error=False)
                self.observer.command("read_history", time.perf_counter() - started)
        except (RedisError, OSError) as exc:
            raise EngineUnavailable(f"replay failed: {exc}") from None
        return [
            self._entries(topic, result)
            for (topic, _, _), result in zip(requests, results, strict=True)
        ]

    def _entries(self, topic: str, result: Any) -> TopicRead:
        if isinstance(result, ResponseError):
            code = str(result).split(" ", 1)[0] or "error"
            return HistoryBroken(topic, f"{self.keys.stream(topic)!r} is not a stream ({code})")
        if isinstance(result, Exception):
            raise EngineUnavailable(f"replay failed: {result}")
        entries = []
        for entry_id, fields in result:
            try:
                frame = Frame.from_body(entry_id, fields[_BODY])
                prev = id_key(fields.get(_PREV, b"0-0"))
            except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError):
                return HistoryBroken(topic, f"entry {entry_id[:40]!r} is not an event")
            entries.append((frame, prev))
        return entries


class RedisEngine(Engine):
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention: Retention | None = None,
        subscribe_timeout: float = 5.0,
        probe_interval: float = 5.0,
        idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
        publish_replicas: int = 0,
    ) -> None:
        super().__init__()
        self.keys = Keys(prefix)
        self.client = connect_async(url, max_connections=REDIS_CONCURRENCY + 16)
        self._slots = asyncio.Semaphore(REDIS_CONCURRENCY)
        self.history = RedisHistory(self.client, self.keys, self._slots)
        self.publish_replicas = publish_replicas
        self.retention = retention or Retention()
        self.transport = AsyncRedisTransport(
            self.client, self.keys, self.retention,
            retry_for=PUBLISH_RETRY_FOR, idempotency_ttl=idempotency_ttl,
            wait_replicas=publish_replicas,
        )  # fmt: skip
        self.subscribe_timeout = subscribe_timeout
        self.probe_interval = probe_interval
        self._pubsub_pool = _pubsub_pool(url)
        self._channel_prefix = self.keys.channel_prefix.encode()
        node = uuid.uuid4().hex
        self._probe_channel = self.keys.probe(node).encode()
        self._ready_key = f"{self.keys.prefix}:ready:{node}"
        """A short-lived key written by each readiness check: does Redis accept writes?"""
        self._probe_seen = asyncio.Event()
        self._probe_token = b""
        """The payload of the probe in flight: only its own return counts."""
        self._probes = 0
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
        self._held: HeldFrames[tuple[str, Frame]] | None = None
        """Live frames that arrive while a reconnected link backfills (None when live)."""
        self._links = 0
        """Pub/sub links that came up (subscribed and backfilled) so far: each after the first
        is a reconnect."""

    def set_observer(self, observer: EngineObserver) -> None:
        super().set_observer(observer)
        self.history.observer = observer

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._read_forever(), name="sse-gateway pubsub reader"),
            asyncio.create_task(self._probe_forever(), name="sse-gateway pubsub probe"),
            asyncio.create_task(self._check_setup(), name="sse-gateway redis checks"),
        ]

    async def _check_setup(self) -> None:
        """Warn once, at start-up, about Redis settings that break what this node promises.
        Best effort: a managed Redis may refuse CONFIG, and Redis may not be up yet."""
        try:
            async with asyncio.timeout(LINK_TIMEOUT):
                try:
                    config = await self.client.config_get("maxmemory-policy")
                except ResponseError:
                    config = {}  # CONFIG is disabled or renamed
                policy = str(config.get("maxmemory-policy") or "")
                replicas = 0
                if self.publish_replicas:
                    info = await self.client.info("replication")
                    replicas = int(info.get("connected_slaves", 0))
        except (RedisError, OSError, TimeoutError, ValueError) as exc:
            log.info("Redis settings not checked: %s", exc or type(exc).__name__)
            return
        if policy.startswith("allkeys-"):
            log.warning(
                "Redis maxmemory-policy is %s: when Redis is full it may evict the clock key "
                "%r (ids could then go backwards and clients miss events) and the streams; "
                "use noeviction",
                policy, self.keys.clock,
            )  # fmt: skip
        if replicas < self.publish_replicas:
            log.warning(
                "--publish-replicas %d, but Redis has %d replica(s) attached: publishes are "
                "stored and delivered, but POST /publish answers that they were not "
                "replicated in time until enough replicas attach",
                self.publish_replicas, replicas,
            )  # fmt: skip

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()
        await self._pubsub_pool.disconnect()

    async def ready(self) -> bool:
        return (await self.health()).ready

    async def health(self) -> Health:
        """Ready when the pub/sub link is up (not backfilling) and Redis answers.

        A Redis that refuses writes (``maxmemory`` reached under ``noeviction``, a read-only
        replica) still serves every stream, replays included: the node stays ready and says
        ``"publish": "refused"`` (taking every node out of rotation would strand every client
        while only publishing is impossible)."""
        link = "down" if self._conn is None else "backfilling" if self._held is not None else "up"
        detail = {"link": link}
        try:
            async with asyncio.timeout(2.0), self.client.pipeline(transaction=False) as pipe:
                pipe.ping()
                pipe.set(self._ready_key, b"1", px=10_000)
                started = time.perf_counter()
                pong, wrote = await pipe.execute(raise_on_error=False)
                self.observer.command("ready", time.perf_counter() - started)
        except (RedisError, OSError, TimeoutError):
            pong = wrote = None
        if pong is None or isinstance(pong, Exception):
            detail["redis"] = "unreachable"
            return Health(False, detail)
        detail["redis"] = "up"
        detail["publish"] = "refused" if isinstance(wrote, Exception) else "ok"
        if isinstance(wrote, Exception):
            detail["publish_error"] = _write_refusal(wrote)
        return Health(link == "up", detail)

    # -- live ---------------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        """Keep one pub/sub link; after each (re)connect, re-subscribe and backfill from the
        streams whatever was published while the link was down, before any newer frame.

        Every wait is bounded: connecting (with its handshake) by :data:`LINK_TIMEOUT`, and a
        link that stays silent is pinged, then dropped (``_read_link``)."""
        backoff = 0.05
        lost_before = False
        while not self._closing:
            conn = self._pubsub_pool.make_connection()  # type: ignore[no-untyped-call]
            recovery: asyncio.Task[None] | None = None
            try:
                async with asyncio.timeout(LINK_TIMEOUT):
                    await conn.connect()
                if lost_before:
                    # Pooled command connections may sit on the same dead path: start afresh.
                    await self.client.connection_pool.disconnect(inuse_connections=False)
                self._held = HeldFrames(BACKFILL_HELD_BYTES)
                self._conn = conn
                self._connected.set()
                recovery = asyncio.create_task(self._recover(conn), name="sse-gateway backfill")
                recovery.add_done_callback(self._recovered)
                async for message in self._read_link(conn):
                    self._handle(message)
                    if recovery is not None and recovery.done():
                        recovery.result()
                        recovery = None
                        backoff = 0.05
                        lost_before = False
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError, EngineUnavailable) as exc:
                if not self._closing:
                    log.warning("pub/sub link lost: %s", exc or type(exc).__name__)
            except Exception:
                log.exception("pub/sub reader failed; reconnecting")
            finally:
                lost_before = True
                self._drop_link()
                if recovery is not None:
                    recovery.cancel()
                    await asyncio.gather(recovery, return_exceptions=True)
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await conn.disconnect(nowait=True)
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, MAX_RECONNECT_DELAY)

    async def _read_link(self, conn: AbstractConnection) -> AsyncIterator[list[Any]]:
        """Messages from the link. After ``idle`` seconds without one, a PING is sent (the
        self-probe normally keeps the link busy); when that brings nothing back within another
        ``idle`` seconds, the link is dead (a network that drops bytes without closing)."""
        idle = max(1.0, self.probe_interval or 5.0) + LINK_TIMEOUT
        pinged = False
        while True:
            message = await conn.read_response(timeout=idle)
            if message is not None:
                pinged = False
                yield message
                continue
            if pinged:
                raise TimeoutError(f"the pub/sub link was silent for {2 * idle:.0f}s")
            async with self._send_lock:
                await conn.send_command("PING")
            pinged = True

    async def _recover(self, conn: AbstractConnection) -> None:
        """Subscribe the probe channel and every active topic, then deliver what was missed,
        page by page. A topic whose history cannot be read is lost on its own: the others
        are backfilled."""
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
            since = None
            if self._seen is not None and topics:
                since = Position.after(key_to_id(self._seen))
            backfill = Replay(
                self.history, topics, since, drop_broken=True, max_age=self.retention.max_age
            )
            await backfill.open()
            await self._backfill(backfill)
        except (RedisError, OSError, TimeoutError) as exc:
            raise EngineUnavailable(f"backfill failed: {exc}") from None

    async def _backfill(self, backfill: Replay) -> None:
        reset = backfill.reset
        if reset is not None and reset.reason is ResetReason.FUTURE_ID:
            # This node saw frames that this Redis no longer has (a failover or a restart lost
            # its last writes): nothing after them is missing, and a retried publish that takes
            # its first id again is skipped by each client.
            reset = None
        lost = set(reset.topics) if reset is not None else set()
        if lost:
            self.on_lost(sorted(lost))
        count = await self._deliver_pages(backfill, lost)
        while self._held is not None and self._held.dropped:
            # More live frames arrived than a backfill keeps: they are in the streams, so read
            # on to the clock of now. Topics subscribed since the backfill began are not read
            # here: their streams are ended, and resume from history.
            log.info("backfill reads on to a newer clock: live frames outgrew what it keeps")
            if newer := sorted(self._topics - set(backfill.topics) - lost):
                self.on_lost(newer)
            self._held.again()
            await backfill.extend()
            count += await self._deliver_pages(backfill, lost)
        if gaps := [t for t in backfill.gaps if t not in lost]:
            lost.update(gaps)
            self.on_lost(gaps)
        clock = backfill.clock
        covered = set(backfill.topics)
        held, self._held = self._held.items if self._held is not None else [], None
        self._seen = max(self._seen or 0, clock)
        # what arrived meanwhile and is newer than what was read (or of a topic it did not read)
        for topic, frame in release(held, clock, lambda item: _held_key(item, covered)):
            self._deliver(topic, frame)
        if count:
            self.observer.backfilled(count)
        self._links += 1
        if self._links > 1:
            self.observer.reconnected()
        self.observer.link(True)
        if count or lost:
            log.info(
                "pub/sub link restored: %d events backfilled, %d topics lost history",
                count, len(lost),
            )  # fmt: skip

    async def _deliver_pages(self, backfill: Replay, lost: set[str]) -> int:
        """Hand on the backfill page by page. While it covers every subscribed topic, each
        page moves ``_seen``: a backfill cut short by another lost link is not sent again."""
        count = 0
        covered = set(backfill.topics)
        while runs := await backfill.next_runs():
            self._lose_broken(backfill, lost)
            page = sorted(
                ((frame.key, topic, frame) for topic, run in runs.items() if topic not in lost
                 for frame in run),
                key=lambda item: item[0],
            )  # fmt: skip
            for _, topic, frame in page:
                self.on_frame(topic, frame)
            count += len(page)
            if page and self._topics <= covered:
                self._seen = max(self._seen or 0, page[-1][0])
        self._lose_broken(backfill, lost)
        return count

    def _lose_broken(self, backfill: Replay, lost: set[str]) -> None:
        for broken in backfill.broken:
            if broken.topic not in lost:
                log.warning("%s: closing the streams of that topic", broken)
                lost.add(broken.topic)
                self.on_lost([broken.topic])
        backfill.broken.clear()

    def _recovered(self, task: asyncio.Task[None]) -> None:
        """A failed backfill drops the link (waking the reader), so it is tried again."""
        if task.cancelled() or task.exception() is None:
            return
        conn = self._conn
        if conn is not None:
            log.warning("backfill failed: %s", task.exception())
            self._tasks.append(asyncio.create_task(conn.disconnect()))

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
                self._probes += 1
                self._probe_token = token = b"probe %d" % self._probes
                clock = await asyncio.wait_for(self._clock_and_probe(token), timeout)
                await asyncio.wait_for(self._probe_seen.wait(), timeout)
                if clock is not None and conn is self._conn and self._held is None:
                    # Still the link the probe went through, live all along: every frame of a
                    # subscribed topic up to that clock has arrived (the probe came after it).
                    self._seen = max(self._seen or 0, clock)
            except TimeoutError:  # before OSError, of which it is a subclass
                self.observer.probe_failed()
                if conn is self._conn:
                    log.warning("pub/sub link is silent: reconnecting")
                    await conn.disconnect()
            except (RedisError, OSError):
                continue  # Redis itself is unreachable; the reader notices on its own

    async def _clock_and_probe(self, token: bytes) -> int | None:
        """Read the clock, then publish the probe, in that order on one connection. Redis sends
        a subscriber its messages in the order they were published, and the publish script
        sets the clock and publishes atomically: once the probe is back on the link, every
        frame up to that clock on the topics it is subscribed to has arrived before it. So the
        node's position keeps up with the clock while its own topics are quiet."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.mget(self.keys.clock, self.keys.origin)
            pipe.publish(self._probe_channel, token)
            started = time.perf_counter()
            (clock, origin), _ = await pipe.execute()
            self.observer.command("probe", time.perf_counter() - started)
        try:
            # Both keys, as a replay's clock read checks them: the probe clears what a failed
            # read found only when the whole store is readable again.
            _stored_id(self.keys, "origin", origin)
            valid = _stored_id(self.keys, "clock", clock)
        except InvalidStore:
            self.history.store_invalid = True
            return None
        self.history.store_invalid = False
        return valid

    def delivered_through(self) -> int | None:
        """``_seen`` while the link is up and not backfilling. The publish script issues ids and
        publishes in one atomic step, so frames arrive in id order; each is handed on as it
        arrives, and a backfill hands on held frames only above what it read. So no frame at or
        below it can still arrive. None as well once a clock read found the store unreadable:
        streams then read the clock themselves, and are refused."""
        if self._conn is None or self._held is not None or self.history.store_invalid:
            return None
        return self._seen

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
        self.observer.link(False)
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
                if message[2] == self._probe_token:
                    self._probe_seen.set()
                return
            try:
                topic = channel[len(self._channel_prefix) :].decode()
                frame = Frame.from_live(message[2])
            except (ValueError, UnicodeDecodeError):
                log.warning("ignored a message that is not a frame on %r", channel[:200])
                return
            if self._held is not None:
                self._held.hold((topic, frame), len(frame.data))
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

    async def replay(
        self, topics: Sequence[str], position: Position | None, *, clock: int | None = None
    ) -> Replay:
        replay = Replay(self.history, topics, position, max_age=self.retention.max_age)
        await replay.open(clock)
        return replay

    async def publish(self, message: Message) -> str:
        return (await self.publish_many([message]))[0]

    async def publish_many(self, messages: Sequence[Message]) -> list[str]:
        """One pipeline for all the events. Transient errors (after the transport's retries)
        are ``EngineUnavailable``; what no retry can fix is ``PublishFailed``;
        ``NotReplicated`` passes through (the events are stored and delivered)."""
        try:
            async with self._slots:
                started = time.perf_counter()
                try:
                    return await self.transport.send(list(messages))
                finally:
                    self.observer.command("publish", time.perf_counter() - started)
        except NotReplicated:
            raise
        except (RedisError, OSError) as exc:
            failure = permanent_failure(exc)
            if failure is not None:
                raise PublishFailed(failure, str(exc)) from None
            raise EngineUnavailable(f"publish failed: {exc}") from None
