"""The chaos scenario object: ``Chaos`` starts a scenario's parts and closes each of them,
newest first, at teardown (the ``chaos`` fixture in tests/chaos/conftest.py), so no process,
port, file or thread outlives its test. The parts themselves (Redis and Sentinel processes,
gateway nodes, the load balancer and proxies, browser-like clients, publishers and the
delivery invariant) live in tests/support/, where the other suites use them too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import traceback
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from gateway.config import Settings
from publisher import Publisher
from tests.support.clients import ClientPool, SSEClient, StalledClients
from tests.support.gateway import GatewayProcess
from tests.support.proxy import FreezingProxy, LoadBalancer, ReplyCutter
from tests.support.publishing import PublisherThread
from tests.support.redis_server import RedisServer, SentinelSetup, server_binary

NODE_ARGS = ("--connect-rate", "0", "--max-connections-per-subject", "0", "--heartbeat", "2")
"""Every chaos node: no admission limits (all clients come from 127.0.0.1) and a short
heartbeat, so a silently dead stream is noticed by the clients' idle timeout."""


def redis_binary() -> str:
    """Found on PATH or installed: the chaos suite never skips for a missing redis-server."""
    return server_binary()


def backfill_available() -> bool:
    """Whether the node keeps streams open through a pub/sub outage (spec 4): it has the
    self-probe setting that comes with it."""
    return "probe_interval" in {f.name for f in dataclasses.fields(Settings)}


def publisher_retries() -> bool:
    return "retry_for" in inspect.signature(Publisher.from_url).parameters


# -- the fixture's object ---------------------------------------------------------------------


class Chaos:
    """Starts the parts of a scenario and closes each of them, newest first, at teardown."""

    def __init__(self) -> None:
        self.prefix = "chaos" + uuid.uuid4().hex[:8]
        self.nodes: list[GatewayProcess] = []
        self.redis_nodes: list[RedisServer] = []
        self.failed = False
        self._cleanups: list[Callable[[], None]] = []
        self._pool: ClientPool | None = None

    def defer(self, cleanup: Callable[[], None]) -> None:
        self._cleanups.append(cleanup)

    def binary(self) -> str:
        return redis_binary()

    def redis(self, *extra: str) -> RedisServer:
        """A redis-server with its append-only file on (a ``kill`` and ``start`` replay it)."""
        node = RedisServer(self.binary(), *extra, aof=True)
        self.defer(node.close)
        self.redis_nodes.append(node)
        return node.start()

    def sentinel(self) -> SentinelSetup:
        setup = SentinelSetup(self.binary())
        self.defer(setup.close)
        self.redis_nodes.extend(setup.nodes.values())
        return setup.start()

    def node(self, redis_url: str, *extra: str, port: int | None = None) -> GatewayProcess:
        node = GatewayProcess(*NODE_ARGS, "--prefix", self.prefix, *extra, redis_url=redis_url)
        return self._start(node, port)

    def restart(self, old: GatewayProcess, *extra: str) -> GatewayProcess:
        """A new process with the same arguments on the same port."""
        return self._start(GatewayProcess(*old.args, *extra), old.port)

    def _start(self, node: GatewayProcess, port: int | None) -> GatewayProcess:
        if port is not None:
            node.port = port
        self.nodes.append(node)

        def close() -> None:
            node.stop(timeout=10)
            node.close()

        self.defer(close)
        return node.start(timeout=30)

    def load_balancer(self, nodes: Iterable[GatewayProcess]) -> LoadBalancer:
        lb = LoadBalancer(node.port for node in nodes)
        self.defer(lb.close)
        return lb

    def clients(
        self, port: int, topic_sets: Sequence[Sequence[str]], name: str = "c", **options: Any
    ) -> list[SSEClient]:
        if self._pool is None:
            self._pool = ClientPool()
            self.defer(self._pool.close)
        return self._pool.spawn(port, topic_sets, name, **options)

    @property
    def pool(self) -> ClientPool:
        assert self._pool is not None
        return self._pool

    def publisher(
        self, url: str, topics: Sequence[str], rate: float, **options: Any
    ) -> PublisherThread:
        publisher = PublisherThread(url, self.prefix, topics, rate, **options)

        def stop() -> None:
            with contextlib.suppress(RuntimeError):
                publisher.stop(30)

        self.defer(stop)
        return publisher

    def reply_cutter(self, redis_port: int, cut_at: Iterable[int]) -> ReplyCutter:
        cutter = ReplyCutter(redis_port, cut_at)
        self.defer(cutter.close)
        return cutter

    def freezing_proxy(self, redis_port: int) -> FreezingProxy:
        proxy = FreezingProxy(redis_port)
        self.defer(proxy.close)
        return proxy

    def stalled(self) -> StalledClients:
        stalled = StalledClients()
        self.defer(stalled.close)
        return stalled

    def report(self) -> str:
        """The tail of every node's and Redis's log, for a failed scenario."""
        parts = []
        for node in self.nodes:
            with contextlib.suppress(OSError):
                parts.append(f"--- gateway :{node.port} ---\n{node.output()[-4000:]}")
        for redis_node in self.redis_nodes:
            parts.append(f"--- redis :{redis_node.port} ---\n{redis_node.log_tail(1500)}")
        return "\n".join(parts)

    def close(self) -> None:
        if self.failed:
            print(self.report())
        while self._cleanups:
            cleanup = self._cleanups.pop()
            try:
                cleanup()
            except Exception:
                traceback.print_exc()
