"""Prometheus collectors, counted per event or per connection, never per client write."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connections = Gauge("sse_connections", "Open SSE streams", registry=r)
        self.connections_total = Counter("sse_connections_opened", "SSE streams opened", registry=r)
        self.disconnects = Counter(
            "sse_disconnects", "SSE streams closed, by reason", ["reason"], registry=r
        )
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
        self.replayed = Counter("sse_events_replayed", "Events sent from history", registry=r)
        self.resets = Counter("sse_resets", "reset events sent, by reason", ["reason"], registry=r)
        self.published = Counter(
            "sse_events_published", "Events published through POST /publish", registry=r
        )
        self.hub_topics = Gauge("sse_hub_topics", "Topics subscribed by this node", registry=r)
        self.latency = Histogram(
            "sse_publish_to_dispatch_seconds",
            "Time from publish (the id's clock) to this node's dispatch",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def observe_dispatch(self, key: int, delivered: int) -> None:
        self.frames.inc()
        if delivered:
            self.delivered.inc(delivered)
        self.latency.observe(max(0.0, time.time() - (key >> 64) / 1000))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
