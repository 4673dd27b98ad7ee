"""Publishing straight to Redis with the atomic publish script.

Public for the gateway, whose engine publishes and connects exactly as a worker does: the
transports, ``connect``/``connect_async`` (Sentinel URLs included), and how a failed publish
is classified (``is_transient``, ``permanent_failure``, ``Failure``, ``NotReplicated``, which
live in :mod:`publisher.publish_plan` and are importable from here too).

The two transports are drivers of one :class:`~publisher.publish_plan.PublishPlan`: the plan
makes every decision (retries, ``NOSCRIPT``, sticky ids, the replica check) and the drivers
only turn its commands into redis-py calls, blocking or awaited."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.retry
import redis.sentinel
from redis.backoff import NoBackoff

from publisher.protocol import DEFAULT_IDEMPOTENCY_TTL, Keys, Message, Retention
from publisher.publish_plan import (
    DEFAULT_RETRY_FOR,
    DEFAULT_WAIT_TIMEOUT,
    TRANSIENT_ERRORS,
    Attempt,
    Command,
    CountReplicas,
    Done,
    Failure,
    LoadScript,
    NotReplicated,
    Plan,
    PublishPlan,
    ReadClock,
    Reconnect,
    Replication,
    RunScripts,
    Sleep,
    advance,
    attached_replicas,
    clock_position,
    is_transient,
    permanent_failure,
    script_call,
)

__all__ = [
    "DEFAULT_RETRY_FOR",
    "DEFAULT_WAIT_TIMEOUT",
    "PUBLISH_SCRIPT",
    "SCRIPT_SHA",
    "TRANSIENT_ERRORS",
    "AsyncRedisTransport",
    "Failure",
    "NotReplicated",
    "RedisTransport",
    "Replication",
    "SentinelTarget",
    "attached_replicas",
    "clock_position",
    "connect",
    "connect_async",
    "is_transient",
    "permanent_failure",
    "redis_options",
    "script_call",
    "sentinel_target",
]

_T = TypeVar("_T")

PUBLISH_SCRIPT = resources.files("publisher").joinpath("publish.lua").read_text("utf-8")
SCRIPT_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()


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


class RedisTransport:
    """EVALSHA in one pipeline: one round trip per batch (redis-py's ``Script`` in a pipeline
    would first ask ``SCRIPT EXISTS``, a second round trip). Transient errors are retried for
    ``retry_for`` seconds; each message's idempotency key makes a retry return its first id.

    The blocking driver of a :class:`PublishPlan`."""

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
        self.plan = PublishPlan(
            keys, retention, retry_for=retry_for, idempotency_ttl=idempotency_ttl,
            wait_replicas=wait_replicas, wait_timeout=wait_timeout,
        )  # fmt: skip
        self.sleep = sleep
        self.sha = SCRIPT_SHA

    def send(self, messages: list[Message]) -> list[str]:
        return self._drive(self.plan.send(messages))

    def _send_once(self, messages: Sequence[Message], priors: Sequence[str]) -> list[str]:
        """One attempt of a publish (the plan's ``Attempt``): one round trip, two after
        ``NOSCRIPT``."""
        return self._drive(self.plan.attempt(messages, priors))

    def position(self, topics: tuple[str, ...] = ()) -> str:
        """The clock (one ``GET``); transient errors are retried for ``retry_for`` seconds."""
        return self._drive(self.plan.position())

    def close(self) -> None:
        self.client.close()

    def _drive(self, plan: Plan[_T]) -> _T:
        """Carry out the plan's commands until it ends; an error is the plan's to judge."""
        with contextlib.closing(plan):
            step = advance(plan)
            while not isinstance(step, Done):
                try:
                    result = self._do(step)
                except Exception as exc:
                    step = advance(plan, failure=exc)
                else:
                    step = advance(plan, result)
            return step.value

    def _do(self, command: Command) -> Any:
        match command:
            case RunScripts():
                with self.client.pipeline(transaction=False) as pipe:
                    for keys, args in command.calls:
                        pipe.evalsha(self.sha, len(keys), *keys, *args)
                    if command.wait_replicas:
                        wait = ("WAIT", command.wait_replicas, command.wait_timeout_ms)
                        pipe.execute_command(*wait)  # type: ignore[no-untyped-call,unused-ignore]
                    return pipe.execute(raise_on_error=False)
            case LoadScript():
                return self.client.script_load(PUBLISH_SCRIPT)
            case CountReplicas():
                return self.client.info("replication")
            case Reconnect():
                self.client.connection_pool.disconnect(inuse_connections=False)
            case Sleep():
                self.sleep(command.seconds)
            case ReadClock():
                return self.client.get(command.key)
            case Attempt():
                return self._send_once(command.messages, command.priors)
        return None


class AsyncRedisTransport:
    """The asyncio driver of a :class:`PublishPlan`: :class:`RedisTransport`, awaited."""

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
        self.plan = PublishPlan(
            keys, retention, retry_for=retry_for, idempotency_ttl=idempotency_ttl,
            wait_replicas=wait_replicas, wait_timeout=wait_timeout,
        )  # fmt: skip
        self.sha = SCRIPT_SHA

    async def send(self, messages: list[Message]) -> list[str]:
        return await self._drive(self.plan.send(messages))

    async def _send_once(self, messages: Sequence[Message], priors: Sequence[str]) -> list[str]:
        return await self._drive(self.plan.attempt(messages, priors))

    async def position(self, topics: tuple[str, ...] = ()) -> str:
        """The clock (one ``GET``); transient errors are retried for ``retry_for`` seconds."""
        return await self._drive(self.plan.position())

    async def close(self) -> None:
        await self.client.aclose()

    async def _drive(self, plan: Plan[_T]) -> _T:
        """Carry out the plan's commands until it ends; an error is the plan's to judge."""
        with contextlib.closing(plan):
            step = advance(plan)
            while not isinstance(step, Done):
                try:
                    result = await self._do(step)
                except Exception as exc:
                    step = advance(plan, failure=exc)
                else:
                    step = advance(plan, result)
            return step.value

    async def _do(self, command: Command) -> Any:
        match command:
            case RunScripts():
                async with self.client.pipeline(transaction=False) as pipe:
                    for keys, args in command.calls:
                        pipe.evalsha(self.sha, len(keys), *keys, *args)
                    if command.wait_replicas:
                        pipe.execute_command("WAIT", command.wait_replicas, command.wait_timeout_ms)
                    return await pipe.execute(raise_on_error=False)
            case LoadScript():
                return await self.client.script_load(PUBLISH_SCRIPT)
            case CountReplicas():
                return await self.client.info("replication")
            case Reconnect():
                await self.client.connection_pool.disconnect(inuse_connections=False)
            case Sleep():
                await asyncio.sleep(command.seconds)
            case ReadClock():
                return await self.client.get(command.key)
            case Attempt():
                return await self._send_once(command.messages, command.priors)
        return None
