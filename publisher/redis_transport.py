"""Publishing straight to Redis with the atomic publish script.

Public for the gateway, whose engine publishes and connects exactly as a worker does: the
transports, ``connect``/``connect_async`` (Sentinel URLs included), and how a failed publish
is classified (``is_transient``, ``permanent_failure``, ``Failure``, ``NotReplicated``)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.retry
import redis.sentinel
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TimeoutError,
    TryAgainError,
)

from publisher._retry import Backoff
from publisher.protocol import (
    BEGINNING,
    DEFAULT_IDEMPOTENCY_TTL,
    Keys,
    Message,
    Retention,
    id_key,
)

log = logging.getLogger("publisher")

PUBLISH_SCRIPT = resources.files("publisher").joinpath("publish.lua").read_text("utf-8")
SCRIPT_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()

DEFAULT_RETRY_FOR = 10.0
DEFAULT_WAIT_TIMEOUT = 1.0
TRANSIENT_ERRORS = (
    ConnectionError, TimeoutError, BusyLoadingError, ReadOnlyError, TryAgainError, MasterDownError,
    OSError,
)  # fmt: skip
"""Errors after which the same publish may be sent again: its idempotency key makes that safe."""


def is_transient(exc: BaseException) -> bool:
    """Whether a publish that failed with ``exc`` may be sent again.

    ``NOREPLICAS`` (``min-replicas-to-write``) is a plain ``ResponseError`` in redis-py: the
    primary has lost its replicas, typically because one of them was just promoted."""
    if isinstance(exc, TRANSIENT_ERRORS):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith("NOREPLICAS")


def redis_options() -> dict[str, Any]:
    """Connection settings chosen on purpose rather than inherited from redis-py defaults.

    redis-py's own retries are off: a publish is retried by the transport, with its
    idempotency key, and never blindly by the client."""
    return {"protocol": 2, "socket_timeout": 10.0, "socket_connect_timeout": 5.0}


@dataclass(frozen=True)
class SentinelTarget:
    """``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]``."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None


def sentinel_target(url: str) -> SentinelTarget | None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis+sentinel", "sentinel"):
        return None
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels = []
    for host in hosts.split(","):
        name, _, port = host.strip().rpartition(":")
        if not name:
            name, port = port, "26379"
        sentinels.append((name.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError(
            f"{url!r}: name the Sentinel service, e.g. redis+sentinel://h:26379/mymaster"
        )
    return SentinelTarget(
        sentinels,
        urllib.parse.unquote(path[0]),
        int(path[1]) if len(path) > 1 else 0,
        urllib.parse.unquote(username) or None,
        urllib.parse.unquote(password) or None,
    )


def connect(url: str) -> redis.Redis:
    """A client for ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://``."""
    options = {**redis_options(), "retry": redis.retry.Retry(NoBackoff(), 0)}
    target = sentinel_target(url)
    if target is None:
        return redis.Redis.from_url(url, **options)
    sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
        target.sentinels, socket_timeout=2.0, socket_connect_timeout=2.0
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call,unused-ignore]
        target.service, db=target.db, username=target.username, password=target.password,
        **options,
    )  # fmt: skip
    return client


def connect_async(url: str, **extra: Any) -> redis.asyncio.Redis:
    options = {**redis_options(), "retry": redis.asyncio.retry.Retry(NoBackoff(), 0), **extra}
    target = sentinel_target(url)
    if target is None:
        return redis.asyncio.Redis.from_url(url, **options)
    sentinel = redis.asyncio.sentinel.Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
        target.sentinels, socket_timeout=2.0, socket_connect_timeout=2.0
    )
    client: redis.asyncio.Redis = sentinel.master_for(
        target.service, db=target.db, username=target.username, password=target.password,
        **options,
    )  # fmt: skip
    return client


class NotReplicated(ConnectionError):
    """``WAIT`` timed out: the publishes were stored and delivered on the primary, but fewer
    replicas than asked confirmed them, so a failover may lose them. Sent again with their
    idempotency keys, they return the same ids and wait for the replicas again."""

    def __init__(self, ids: list[str], replicas: int, wanted: int, attached: int | None = None):
        super().__init__(ids, replicas, wanted, attached)
        self.ids = ids
        self.replicas = replicas
        self.wanted = wanted
        self.attached = attached
        """Replicas attached to the primary when the publish gave up (None: not asked)."""

    def __str__(self) -> str:
        what = "the event was" if len(self.ids) == 1 else f"{len(self.ids)} events were"
        attached = "" if self.attached is None else f" ({self.attached} replicas attached)"
        return (
            f"{what} stored and delivered with id {', '.join(self.ids)}, but only "
            f"{self.replicas} of {self.wanted} replicas confirmed it in time{attached}: a "
            "failover may lose it. Publishing again with the same idempotency key returns the "
            "same id and waits for the replicas again."
        )


def attached_replicas(info: dict[str, Any]) -> int | None:
    value = info.get("connected_slaves")
    return int(value) if value is not None else None


class Failure(StrEnum):
    """Why a publish failed in a way that sending it again cannot fix."""

    TOPIC_CONFLICT = "topic_storage_conflict"
    """A topic's stream key holds another type: an operator must repair or delete it."""
    STORAGE_FULL = "storage_full"
    """Redis refuses writes (``maxmemory`` reached): it needs memory freed, not a retry."""
    STORAGE_ERROR = "storage_error"
    """Anything else (a clock the script refuses, a script error): see the raw text."""


def permanent_failure(exc: BaseException) -> Failure | None:
    """What kind of permanent failure ``exc`` is, or None when sending again may succeed."""
    if is_transient(exc):
        return None
    if isinstance(exc, OutOfMemoryError) or str(exc).startswith("OOM"):
        return Failure.STORAGE_FULL
    text = str(exc)
    if text.startswith("WRONGTYPE") and text.endswith("not a stream"):
        return Failure.TOPIC_CONFLICT
    return Failure.STORAGE_ERROR


def script_call(
    keys: Keys,
    retention: Retention,
    message: Message,
    idempotency_ttl: float,
    prior: str = "",
) -> tuple[list[str], list[Any]]:
    script_keys = [
        keys.clock,
        keys.origin,
        keys.idempotency(message.idempotency_digest),
        *(keys.stream(t) for t in message.topics),
    ]
    args: list[Any] = [
        message.body,
        retention.max_events,
        int(retention.max_age * 1000),
        max(1, int(idempotency_ttl * 1000)) if message.remember else 0,
        prior,
        *(keys.channel(t) for t in message.topics),
    ]
    return script_keys, args


def _decode(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def clock_position(keys: Keys, value: bytes | str | None) -> str:
    """The clock key's id, or the beginning when nothing was published yet."""
    if value is None:
        return BEGINNING
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    try:
        id_key(text)
    except ValueError:
        raise ValueError(f"the clock key {keys.clock!r} holds {value[:40]!r}, not an id") from None
    return text


def _unloaded(results: list[Any]) -> list[int]:
    """Indexes of results that failed only because Redis did not have the script (so the
    script did not run, and sending them again publishes nothing twice)."""
    failed = []
    for index, result in enumerate(results):
        if isinstance(result, NoScriptError):
            failed.append(index)
        elif isinstance(result, Exception):
            raise result
    return failed


class Replication:
    """``WAIT numreplicas timeout`` at the end of each publish pipeline (same round trip), so
    a publish is acknowledged only once ``replicas`` replicas hold it."""

    def __init__(self, replicas: int, timeout: float) -> None:
        if replicas < 0:
            raise ValueError("wait_replicas must be >= 0")
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError("wait_timeout must be a number of seconds > 0")
        self.replicas = replicas
        self.timeout_ms = max(1, int(timeout * 1000))
        self.checked = not replicas
        """Whether the attached replicas were counted (once, at the first publish)."""

    def check(self, attached: int | None) -> None:
        """Warn once when fewer replicas are attached than each publish waits for: every
        publish would then wait ``wait_timeout``, be retried and raise ``NotReplicated``."""
        if attached is None:
            return
        self.checked = True
        if attached < self.replicas:
            log.warning(
                "wait_replicas=%d, but the primary has %d replicas attached: publishes are "
                "stored and delivered, then raise NotReplicated after their retries",
                self.replicas, attached,
            )  # fmt: skip

    def queue(self, pipe: Any) -> None:
        if self.replicas:
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)

    def split(self, results: list[Any]) -> tuple[list[Any], int]:
        """The scripts' results, and how many replicas confirmed them."""
        if not self.replicas:
            return results, 0
        confirmed = results.pop()
        if isinstance(confirmed, Exception):
            raise confirmed
        return results, int(confirmed)

    def confirm(self, ids: list[str], confirmed: int) -> list[str]:
        if confirmed < self.replicas:
            raise NotReplicated(ids, confirmed, self.replicas)
        return ids


class RedisTransport:
    """EVALSHA in one pipeline: one round trip per batch (redis-py's ``Script`` in a pipeline
    would first ask ``SCRIPT EXISTS``, a second round trip). Transient errors are retried for
    ``retry_for`` seconds; each message's idempotency key makes a retry return its first id."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        retention: Retention,
        *,
        retry_for: float = DEFAULT_RETRY_FOR,
        idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
        wait_replicas: int = 0,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.keys = keys
        self.retention = retention
        self.retry_for = retry_for
        self.idempotency_ttl = idempotency_ttl
        self.replication = Replication(wait_replicas, wait_timeout)
        self.sleep = sleep
        self.sha = SCRIPT_SHA

    def _run(self, messages: list[Message], priors: list[str]) -> list[Any]:
        with self.client.pipeline(transaction=False) as pipe:
            for message, prior in zip(messages, priors, strict=True):
                script_keys, args = script_call(
                    self.keys, self.retention, message, self.idempotency_ttl, prior
                )
                pipe.evalsha(self.sha, len(script_keys), *script_keys, *args)
            self.replication.queue(pipe)
            return pipe.execute(raise_on_error=False)

    def send(self, messages: list[Message]) -> list[str]:
        if not self.replication.checked:
            self.replication.check(self._attached())
        backoff = Backoff(self.retry_for)
        priors = [""] * len(messages)
        while True:
            try:
                return self._send_once(messages, priors)
            except (*TRANSIENT_ERRORS, ResponseError) as exc:
                delay = backoff.next_delay() if is_transient(exc) else None
                if delay is None:
                    if isinstance(exc, NotReplicated):
                        exc.attached = self._attached()
                    raise
                if isinstance(exc, NotReplicated):
                    priors = exc.ids
                # Reconnect for the retry: under Sentinel that asks where the primary is now.
                self.client.connection_pool.disconnect(inuse_connections=False)
                self.sleep(delay)

    def _attached(self) -> int | None:
        """How many replicas the primary has now, for the error message (None if unknown)."""
        try:
            return attached_replicas(self.client.info("replication"))
        except (RedisError, OSError):
            return None

    def _send_once(self, messages: list[Message], priors: list[str]) -> list[str]:
        results, confirmed = self.replication.split(self._run(messages, priors))
        if failed := _unloaded(results):
            self.client.script_load(PUBLISH_SCRIPT)
            retried, confirmed = self.replication.split(
                self._run([messages[i] for i in failed], [priors[i] for i in failed])
            )
            for index, result in zip(failed, retried, strict=True):
                results[index] = result
            if _unloaded(results):
                raise NoScriptError("the publish script could not be loaded")
        return self.replication.confirm([_decode(v) for v in results], confirmed)

    def position(self, topics: tuple[str, ...] = ()) -> str:
        """The clock (one ``GET``); transient errors are retried for ``retry_for`` seconds."""
        backoff = Backoff(self.retry_for)
        while True:
            try:
                return clock_position(self.keys, self.client.get(self.keys.clock))
            except TRANSIENT_ERRORS:
                delay = backoff.next_delay()
                if delay is None:
                    raise
                self.client.connection_pool.disconnect(inuse_connections=False)
                self.sleep(delay)

    def close(self) -> None:
        self.client.close()


class AsyncRedisTransport:
    def __init__(
        self,
        client: redis.asyncio.Redis,
        keys: Keys,
        retention: Retention,
        *,
        retry_for: float = DEFAULT_RETRY_FOR,
        idempotency_ttl: float = DEFAULT_IDEMPOTENCY_TTL,
        wait_replicas: int = 0,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    ) -> None:
        self.client = client
        self.keys = keys
        self.retention = retention
        self.retry_for = retry_for
        self.idempotency_ttl = idempotency_ttl
        self.replication = Replication(wait_replicas, wait_timeout)
        self.sha = SCRIPT_SHA

    async def _run(self, messages: list[Message], priors: list[str]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for message, prior in zip(messages, priors, strict=True):
                script_keys, args = script_call(
                    self.keys, self.retention, message, self.idempotency_ttl, prior
                )
                pipe.evalsha(self.sha, len(script_keys), *script_keys, *args)
            self.replication.queue(pipe)
            return await pipe.execute(raise_on_error=False)

    async def send(self, messages: list[Message]) -> list[str]:
        if not self.replication.checked:
            self.replication.check(await self._attached())
        backoff = Backoff(self.retry_for)
        priors = [""] * len(messages)
        while True:
            try:
                return await self._send_once(messages, priors)
            except (*TRANSIENT_ERRORS, ResponseError) as exc:
                delay = backoff.next_delay() if is_transient(exc) else None
                if delay is None:
                    if isinstance(exc, NotReplicated):
                        exc.attached = await self._attached()
                    raise
                if isinstance(exc, NotReplicated):
                    priors = exc.ids
                await self.client.connection_pool.disconnect(inuse_connections=False)
                await asyncio.sleep(delay)

    async def _attached(self) -> int | None:
        try:
            return attached_replicas(await self.client.info("replication"))
        except (RedisError, OSError):
            return None

    async def _send_once(self, messages: list[Message], priors: list[str]) -> list[str]:
        results, confirmed = self.replication.split(await self._run(messages, priors))
        if failed := _unloaded(results):
            await self.client.script_load(PUBLISH_SCRIPT)
            retried, confirmed = self.replication.split(
                await self._run([messages[i] for i in failed], [priors[i] for i in failed])
            )
            for index, result in zip(failed, retried, strict=True):
                results[index] = result
            if _unloaded(results):
                raise NoScriptError("the publish script could not be loaded")
        return self.replication.confirm([_decode(v) for v in results], confirmed)

    async def position(self, topics: tuple[str, ...] = ()) -> str:
        backoff = Backoff(self.retry_for)
        while True:
            try:
                return clock_position(self.keys, await self.client.get(self.keys.clock))
            except TRANSIENT_ERRORS:
                delay = backoff.next_delay()
                if delay is None:
                    raise
                await self.client.connection_pool.disconnect(inuse_connections=False)
                await asyncio.sleep(delay)

    async def close(self) -> None:
        await self.client.aclose()
