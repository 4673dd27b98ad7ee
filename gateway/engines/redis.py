"""The production engine: Redis Streams for history, Redis pub/sub for live frames.

The pub/sub link is one raw redis-py connection read by one task. It is not redis-py's
``PubSub`` object, which may reconnect and re-subscribe silently and so lose frames without
notice; here a dropped link always reaches ``on_lost``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.engines.base import (
    Engine,
    EngineUnavailable,
    Frame,
    Position,
    Replay,
    check_history,
    merge_unique,
)
from publisher import Message, Retention
from publisher._redis import AsyncRedisTransport, redis_options
from publisher._schema import PREV_FIELD, STREAM_FIELD, Keys, id_key, key_to_id

log = logging.getLogger("gateway.engine")

REPLAY_PAGE = 1000
MAX_KEY = (1 << 128) - 1
_BODY = STREAM_FIELD.encode()
_PREV = PREV_FIELD.encode()


def _key_or_none(value: Any) -> int | None:
    return None if value is None else id_key(value)


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
    ) -> None:
        super().__init__()
        self.keys = Keys(prefix)
        self.client = redis.asyncio.Redis.from_url(url, **redis_options())
        self.transport = AsyncRedisTransport(self.client, self.keys, retention or Retention())
        self.subscribe_timeout = subscribe_timeout
        self._pubsub_pool = ConnectionPool.from_url(
            url,
            protocol=2,
            socket_timeout=None,
            socket_connect_timeout=5.0,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
        )
        self._channel_prefix = self.keys.channel_prefix.encode()
        self._conn: AbstractConnection | None = None
        self._connected = asyncio.Event()
        self._confirmations: dict[bytes, deque[asyncio.Future[None] | None]] = {}
        self._send_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read_forever(), name="sse-gateway pubsub reader")

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.client.aclose()
        await self._pubsub_pool.disconnect()

    async def ready(self) -> bool:
        if self._conn is None:
            return False
        try:
            return bool(await asyncio.wait_for(self.client.ping(), 2.0))
        except (RedisError, OSError, TimeoutError):
            return False

    # -- live ---------------------------------------------------------------------------------

    async def _read_forever(self) -> None:
        backoff = 0.05
        while not self._closing:
            conn = self._pubsub_pool.make_connection()  # type: ignore[no-untyped-call]
            try:
                await conn.connect()
                self._conn = conn
                self._connected.set()
                backoff = 0.05
                log.info("pub/sub link connected")
                while True:
                    self._handle(await conn.read_response(timeout=None))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError) as exc:
                if not self._closing:
                    log.warning("pub/sub link lost: %s", exc)
            except Exception:
                log.exception("pub/sub reader failed; reconnecting")
            finally:
                was_connected = self._conn is conn
                self._drop_link()
                # Before any await: nothing may attach to the old link once it is gone.
                if was_connected and not self._closing:
                    self.on_lost()
                await conn.disconnect()
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 5.0)

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
            try:
                topic = message[1][len(self._channel_prefix) :].decode()
                frame = Frame.from_live(message[2])
            except (ValueError, UnicodeDecodeError):
                log.warning("ignored a message that is not a frame on %r", message[1][:200])
                return
            self.on_frame(topic, frame)
        elif kind in (b"subscribe", b"unsubscribe"):
            waiters = self._confirmations.get(message[1])
            if not waiters:
                return
            waiter = waiters.popleft()
            if not waiters:
                del self._confirmations[message[1]]
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

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
        try:
            await asyncio.wait_for(self._connected.wait(), self.subscribe_timeout)
            waiter = asyncio.get_running_loop().create_future()
            await self._send("SUBSCRIBE", topic, waiter)
            await asyncio.wait_for(waiter, self.subscribe_timeout)
        except (TimeoutError, RedisError, OSError) as exc:
            raise EngineUnavailable(f"could not subscribe to {topic!r}: {exc}") from None

    async def unsubscribe(self, topic: str) -> None:
        try:
            await self._send("UNSUBSCRIBE", topic, None)
        except (RedisError, OSError, EngineUnavailable) as exc:
            log.debug("unsubscribe %s skipped: %s", topic, exc)

    # -- history --------------------------------------------------------------------------------

    async def replay(self, topics: Sequence[str], position: Position | None) -> Replay:
        try:
            return await self._replay(topics, position)
        except (RedisError, OSError) as exc:
            raise EngineUnavailable(f"replay failed: {exc}") from None

    async def _replay(self, topics: Sequence[str], position: Position | None) -> Replay:
        if position is None:
            clock = await self.client.get(self.keys.clock)
            return Replay([], None, _key_or_none(clock) or 0)
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
        return Replay(merge_unique(list(runs.values())), reset, clock_key or 0)

    async def publish(self, message: Message) -> str:
        try:
            return (await self.transport.send([message]))[0]
        except (RedisError, OSError) as exc:
            raise EngineUnavailable(f"publish failed: {exc}") from None
