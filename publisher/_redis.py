"""Publishing straight to Redis with the atomic publish script."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import NoScriptError

from publisher._message import Message
from publisher._schema import DEFAULT_MAX_AGE_SECONDS, DEFAULT_MAX_EVENTS, Keys

PUBLISH_SCRIPT = resources.files("publisher").joinpath("publish.lua").read_text("utf-8")
SCRIPT_SHA = hashlib.sha1(PUBLISH_SCRIPT.encode()).hexdigest()


@dataclass(frozen=True)
class Retention:
    """How much history each topic keeps for replay.

    ``max_events`` is approximate (Redis trims whole stream nodes, so at least that many are
    kept); ``max_age`` (seconds, 0 for none) is applied when the topic is next published to.
    """

    max_events: int = DEFAULT_MAX_EVENTS
    max_age: float = DEFAULT_MAX_AGE_SECONDS

    def __post_init__(self) -> None:
        if self.max_events < 1:
            raise ValueError("max_events must be at least 1")
        if not math.isfinite(self.max_age) or self.max_age < 0:
            raise ValueError("max_age must be a finite number >= 0")


def redis_options() -> dict[str, Any]:
    """Connection settings chosen on purpose rather than inherited from redis-py defaults."""
    return {"protocol": 2, "socket_timeout": 10.0, "socket_connect_timeout": 5.0}


def script_call(keys: Keys, retention: Retention, message: Message) -> tuple[list[str], list[Any]]:
    script_keys = [keys.clock, keys.origin, *(keys.stream(t) for t in message.topics)]
    args: list[Any] = [
        message.body,
        retention.max_events,
        int(retention.max_age * 1000),
        *(keys.channel(t) for t in message.topics),
    ]
    return script_keys, args


def _decode(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


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


class RedisTransport:
    """EVALSHA in one pipeline: one round trip per batch (redis-py's ``Script`` in a pipeline
    would first ask ``SCRIPT EXISTS``, a second round trip)."""

    def __init__(self, client: redis.Redis, keys: Keys, retention: Retention) -> None:
        self.client = client
        self.keys = keys
        self.retention = retention
        self.sha = SCRIPT_SHA

    def _run(self, messages: list[Message]) -> list[Any]:
        with self.client.pipeline(transaction=False) as pipe:
            for message in messages:
                script_keys, args = script_call(self.keys, self.retention, message)
                pipe.evalsha(self.sha, len(script_keys), *script_keys, *args)
            return pipe.execute(raise_on_error=False)

    def send(self, messages: list[Message]) -> list[str]:
        results = self._run(messages)
        if failed := _unloaded(results):
            self.client.script_load(PUBLISH_SCRIPT)
            for index, result in zip(failed, self._run([messages[i] for i in failed]), strict=True):
                results[index] = result
            if _unloaded(results):
                raise NoScriptError("the publish script could not be loaded")
        return [_decode(v) for v in results]

    def close(self) -> None:
        self.client.close()


class AsyncRedisTransport:
    def __init__(self, client: redis.asyncio.Redis, keys: Keys, retention: Retention) -> None:
        self.client = client
        self.keys = keys
        self.retention = retention
        self.sha = SCRIPT_SHA

    async def _run(self, messages: list[Message]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for message in messages:
                script_keys, args = script_call(self.keys, self.retention, message)
                pipe.evalsha(self.sha, len(script_keys), *script_keys, *args)
            return await pipe.execute(raise_on_error=False)

    async def send(self, messages: list[Message]) -> list[str]:
        results = await self._run(messages)
        if failed := _unloaded(results):
            await self.client.script_load(PUBLISH_SCRIPT)
            retried = await self._run([messages[i] for i in failed])
            for index, result in zip(failed, retried, strict=True):
                results[index] = result
            if _unloaded(results):
                raise NoScriptError("the publish script could not be loaded")
        return [_decode(v) for v in results]

    async def close(self) -> None:
        await self.client.aclose()
