"""Prometheus collectors, counted per batch or per connection, never per client write.

Under ``--workers N`` every worker writes its values to ``PROMETHEUS_MULTIPROC_DIR`` (set up
by the CLI before the workers start: prometheus-client picks its value store when it is
imported) and a scrape of any worker reads the whole node from there.
"""

from __future__ import annotations

import asyncio
import platform
import time
from importlib.metadata import PackageNotFoundError, version

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.engines.base import EngineObserver

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_COMMAND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _version() -> str:
    try:
        return version("sse-gateway")
    except PackageNotFoundError:
        return "unknown"


class Metrics(EngineObserver):
    """One node's collectors. ``multiprocess_dir``: where the workers of this node write their
    values (``--workers`` above 1); the exposition then sums every worker's files."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir
        r = self.registry
        self.connections = Gauge(
            "sse_connections", "Open SSE streams", registry=r, multiprocess_mode="livesum"
        )
        self.connections_total = Counter("sse_connections_opened", "SSE streams opened", registry=r)
        self.attempts = Counter(
            "sse_connection_attempts",
            "GET /events by outcome: accepted, or the error code of the refusal",
            ["outcome"],
            registry=r,
        )
        self.accepted = self.attempts.labels("accepted")
        """The ``accepted`` child, resolved once: it is counted per connection."""
        self.disconnects = Counter(
            "sse_disconnects", "SSE streams closed, by reason", ["reason"], registry=r
        )
        self._disconnects: dict[str, Counter] = {}
        self.rejected = Counter(
            "sse_requests_rejected",
            "Requests answered with an error status, by status code",
            ["status"],
            registry=r,
        )
        self.refused = Counter(
            "sse_streams_refused",
            "Temporary refusals of GET /events (however answered), by reason",
            ["reason"],
            registry=r,
        )
        self.frames = Counter("sse_live_frames", "Live frames received by this node", registry=r)
        self.delivered = Counter(
            "sse_events_delivered", "Events queued to clients (live and replay)", registry=r
        )
        self.bytes_delivered = Counter(
            "sse_bytes_delivered",
            "Bytes of the event frames counted in sse_events_delivered_total",
            registry=r,
        )
        self.replayed = Counter("sse_events_replayed", "Events sent from history", registry=r)
        self.resets = Counter("sse_resets", "reset events sent, by reason", ["reason"], registry=r)
        self.published = Counter(
            "sse_events_published", "Events published through POST /publish", registry=r
        )
        self.publish_requests = Counter(
            "sse_publish_requests",
            "POST /publish requests by outcome: accepted, or the error code",
            ["outcome"],
            registry=r,
        )
        self.hub_topics = Gauge(
            "sse_hub_topics", "Topics subscribed by this node", registry=r,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.latency = Histogram(
            "sse_publish_to_dispatch_seconds",
            "Time from publish (the id's clock) to this node's dispatch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.link_up = Gauge(
            "sse_engine_link_up",
            "1 when the engine's live link is up and not backfilling",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.node_ready = Gauge(
            "sse_node_ready",
            "1 when the node serves streams (link up, not draining)",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.reconnects = Counter(
            "sse_engine_reconnects", "Live link connections after the first", registry=r
        )
        self.backfilled_events = Counter(
            "sse_engine_backfilled_events",
            "Events delivered by backfill after a reconnect",
            registry=r,
        )
        self.probe_failures = Counter(
            "sse_engine_probe_failures", "Self-probes that did not come back in time", registry=r
        )
        self.redis_commands = Histogram(
            "sse_redis_command_seconds",
            "Redis command round trips seen by this node, by command",
            ["command"],
            buckets=_COMMAND_BUCKETS,
            registry=r,
        )
        build = Gauge(
            "sse_build_info", "Always 1: the gateway's version and Python's",
            ["version", "python"], registry=r, multiprocess_mode="max",
        )  # fmt: skip
        build.labels(_version(), platform.python_version()).set(1)
        self._is_up = False
        self._draining = False
        self._frames = 0
        self._delivered = 0
        self._bytes = 0
        self._pending = False

    # -- the hot path: summed per loop turn, written once ---------------------------------------

    def observe_dispatch(self, key: int, delivered: int, size: int) -> None:
        """One live frame of ``size`` bytes, queued for ``delivered`` clients."""
        self._frames += 1
        if delivered:
            self._delivered += delivered
            self._bytes += delivered * size
        self.latency.observe(max(0.0, time.time() - (key >> 64) / 1000))
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self.commit)

    def commit(self) -> None:
        """Add what the dispatches of this loop turn counted."""
        self._pending = False
        frames, delivered, size = self._frames, self._delivered, self._bytes
        self._frames = self._delivered = self._bytes = 0
        if frames:
            self.frames.inc(frames)
        if delivered:
            self.delivered.inc(delivered)
            self.bytes_delivered.inc(size)

    def sent(self, events: int, size: int, replayed: int = 0) -> None:
        """Events of ``size`` bytes in all queued to one client outside live dispatch (a
        replay page, or frames held during the replay), ``replayed`` of them from history."""
        if events:
            self.delivered.inc(events)
            self.bytes_delivered.inc(size)
        if replayed:
            self.replayed.inc(replayed)

    def disconnected(self, reason: str) -> None:
        """One stream closed for ``reason`` (each reason's child resolved once)."""
        child = self._disconnects.get(reason)
        if child is None:
            child = self._disconnects[reason] = self.disconnects.labels(reason)
        child.inc()

    # -- node state -----------------------------------------------------------------------------

    def draining(self) -> None:
        self._draining = True
        self._readiness()

    def _readiness(self) -> None:
        self.node_ready.set(1 if self._is_up and not self._draining else 0)

    # -- EngineObserver -------------------------------------------------------------------------

    def link(self, up: bool) -> None:
        self._is_up = up
        self.link_up.set(1 if up else 0)
        self._readiness()

    def reconnected(self) -> None:
        self.reconnects.inc()

    def backfilled(self, events: int) -> None:
        self.backfilled_events.inc(events)

    def probe_failed(self) -> None:
        self.probe_failures.inc()

    def command(self, name: str, seconds: float) -> None:
        self.redis_commands.labels(name).observe(seconds)

    def exposition(self) -> bytes:
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
