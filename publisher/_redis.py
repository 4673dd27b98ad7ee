"""Publishing straight to Redis with the atomic publish script."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
import redis.asyncio

from publisher._message import Message
from publisher._schema import DEFAULT_MAX_AGE_SECONDS, DEFAULT_MAX_EVENTS, Keys

PUBLISH_SCRIPT = resources.files("publisher").joinpath("publish.lua").read_text("utf-8")


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
        if self.max_age < 0:
            raise ValueError("max_age must be >= 0")


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


class RedisTransport:
    def __init__(self, client: redis.Redis, keys: Keys, retention: Retention) -> None:
        self.client = client
        self.keys = keys
        self.retention = retention
        self.script = client.register_script(PUBLISH_SCRIPT)

    def send(self, messages: list[Message]) -> list[str]:
        if len(messages) == 1:
            script_keys, args = script_call(self.keys, self.retention, messages[0])
            return [_decode(self.script(keys=script_keys, args=args))]
        with self.client.pipeline(transaction=False) as pipe:
            for message in messages:
                script_keys, args = script_call(self.keys, self.retention, message)
                self.script(keys=script_keys, args=args, client=pipe)
            return [_decode(v) for v in pipe.execute()]

    def close(self) -> None:
        self.client.close()


class AsyncRedisTransport:
    def __init__(self, client: redis.asyncio.Redis, keys: Keys, retention: Retention) -> None:
        self.client = client
        self.keys = keys
        self.retention = retention
        self.script = client.register_script(PUBLISH_SCRIPT)

    async def send(self, messages: list[Message]) -> list[str]:
        if len(messages) == 1:
            script_keys, args = script_call(self.keys, self.retention, messages[0])
            return [_decode(await self.script(keys=script_keys, args=args))]
        async with self.client.pipeline(transaction=False) as pipe:
            for message in messages:
                script_keys, args = script_call(self.keys, self.retention, message)
                await self.script(keys=script_keys, args=args, client=pipe)
            return [_decode(v) for v in await pipe.execute()]

    async def close(self) -> None:
        await self.client.aclose()
