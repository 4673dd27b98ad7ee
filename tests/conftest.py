"""Fixtures: a real redis-server for the session, gateway processes per test, and a ``node``
fixture that runs a behaviour test once per engine (Redis and in-memory)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from publisher import Publisher, Retention
from tests.support.gateway import GatewayProcess
from tests.support.redis_server import redis_url as start_redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    try:
        with start_redis() as url:
            yield url
    except RuntimeError as exc:
        pytest.exit(str(exc), returncode=3)


@pytest.fixture
def prefix() -> str:
    """A key prefix of the test's own, so tests never see each other's history."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


GatewayFactory = Callable[..., GatewayProcess]


@pytest.fixture
def gateway_factory() -> Iterator[GatewayFactory]:
    started: list[GatewayProcess] = []

    def make(*args: str, redis_url: str | None = None, start: bool = True) -> GatewayProcess:
        node = GatewayProcess(*args, redis_url=redis_url)
        started.append(node)
        return node.start() if start else node

    yield make
    for node in started:
        node.close()


@dataclass
class Node:
    """One gateway under test and a way to publish to it, whatever the engine."""

    engine: str
    gateway: GatewayProcess
    publisher: Publisher
    redis: redis.Redis | None = None
    prefix: str = "sse"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.gateway.url

    def new_publisher(self) -> Publisher:
        """Another publisher on the same engine (e.g. for a publishing thread)."""
        if self.engine == "redis":
            return Publisher.from_url(self.extra["redis_url"], prefix=self.prefix)
        return Publisher.from_url(self.url)

    def publish(self, topics: str | list[str], data: Any, event: str | None = None) -> str:
        return self.publisher.publish(topics, data, event)


NodeFactory = Callable[..., Node]


@pytest.fixture(params=["redis", "memory"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def node_factory(
    engine: str, request: pytest.FixtureRequest, gateway_factory: GatewayFactory, prefix: str
) -> Iterator[NodeFactory]:
    publishers: list[Publisher] = []

    def make(*args: str, max_events: int = 10_000, max_age: float = 3600.0) -> Node:
        retention = ["--max-events", str(max_events), "--max-age", str(max_age)]
        if engine == "redis":
            url = request.getfixturevalue("redis_url")
            gateway = gateway_factory("--prefix", prefix, *retention, *args, redis_url=url)
            pub = Publisher.from_url(url, prefix=prefix, retention=Retention(max_events, max_age))
            client = request.getfixturevalue("redis_client")
            node = Node(engine, gateway, pub, client, prefix, {"redis_url": url})
        else:
            gateway = gateway_factory(*retention, *args)
            pub = Publisher.from_url(gateway.url)
            node = Node(engine, gateway, pub)
        publishers.append(pub)
        return node

    yield make
    for pub in publishers:
        pub.close()


@pytest.fixture
def node(node_factory: NodeFactory) -> Node:
    return node_factory()
