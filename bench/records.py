"""What one measured run produces (also the shape of ``--json``)."""

from dataclasses import asdict, dataclass, field
from typing import Any

PASS_DELIVERED = 0.95
PASS_P99_MS = 250.0


@dataclass
class FanoutResult:
    scenario: str
    target: str
    workers: int
    clients: int
    rate: float
    payload: int
    duration_s: float
    warmup_s: float
    ramp_per_s: float
    connected: int = 0
    failed: int = 0
    fail_reasons: dict[str, int] = field(default_factory=dict)
    disconnected_early: int = 0
    disconnect_reasons: dict[str, int] = field(default_factory=dict)
    http_status: dict[str, int] = field(default_factory=dict)
    events: int = 0
    window_s: float = 0.0
    delivered_per_s: float = 0.0
    published_per_s: float = 0.0
    publish_errors: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    p999_ms: float = 0.0
    max_ms: float = 0.0
    gaps: int = 0
    duplicates: int = 0
    server_cpu_s: float = 0.0
    server_us_per_event: float | None = None
    server_processes: int = 0
    redis_cpu_s: float | None = None
    redis_us_per_event: float | None = None
    client_cpu_pct: float = 0.0
    client_bound: bool = False
    loadavg_1m: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def expected_per_s(self) -> float:
        return self.clients * self.rate

    @property
    def delivered_fraction(self) -> float:
        return self.delivered_per_s / self.expected_per_s if self.expected_per_s else 0.0

    @property
    def publisher_short(self) -> bool:
        return self.published_per_s < PASS_DELIVERED * self.rate

    @property
    def passed(self) -> bool:
        """The saturation rule: at least 95 % of clients x rate delivered, p99 < 250 ms, every
        client connected, nothing missing or repeated."""
        return (
            self.error is None
            and self.failed == 0
            and self.delivered_fraction >= PASS_DELIVERED
            and self.p99_ms < PASS_P99_MS
            and self.gaps == 0
            and self.duplicates == 0
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "expected_per_s": self.expected_per_s,
            "delivered_fraction": self.delivered_fraction,
            "passed": self.passed,
        }


@dataclass
class IdleResult:
    target: str
    workers: int
    clients: int
    ramp_per_s: float
    connected: int = 0
    failed: int = 0
    fail_reasons: dict[str, int] = field(default_factory=dict)
    disconnected_early: int = 0
    disconnect_reasons: dict[str, int] = field(default_factory=dict)
    http_status: dict[str, int] = field(default_factory=dict)
    rss_before: int = 0
    rss_after: int = 0
    server_processes: int = 0
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def open_connections(self) -> int:
        return self.connected - self.disconnected_early

    @property
    def bytes_per_connection(self) -> float | None:
        if self.open_connections <= 0:
            return None
        return (self.rss_after - self.rss_before) / self.open_connections

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"bytes_per_connection": self.bytes_per_connection}
