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


@dataclass
class ConnectResult:
    """``connect``: what opening ``clients`` streams at ``ramp_per_s`` costs the server, what
    they hold while idle, and what it gives back once they leave."""

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
    connect_s: float = 0.0
    """From sseload's start to every client connected or failed."""
    connect_cpu_s: float = 0.0
    """Server CPU from the first connection to one second after the last."""
    close_cpu_s: float = 0.0
    """Server CPU from the clients leaving to the ``rss_after_leave`` sample."""
    rss_before: int = 0
    rss_open: int = 0
    rss_after_leave: int = 0
    after_leave_s: float = 0.0
    server_processes: int = 0
    loadavg_1m: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def open_connections(self) -> int:
        return self.connected - self.disconnected_early

    @property
    def cpu_us_per_connection(self) -> float | None:
        return self.connect_cpu_s / self.connected * 1e6 if self.connected else None

    @property
    def cpu_us_per_close(self) -> float | None:
        return self.close_cpu_s / self.open_connections * 1e6 if self.open_connections else None

    @property
    def bytes_per_connection(self) -> float | None:
        if self.open_connections <= 0:
            return None
        return (self.rss_open - self.rss_before) / self.open_connections

    @property
    def leave_ratio(self) -> float | None:
        """RSS after the clients left / RSS before they came."""
        return self.rss_after_leave / self.rss_before if self.rss_before else None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "cpu_us_per_connection": self.cpu_us_per_connection,
            "cpu_us_per_close": self.cpu_us_per_close,
            "bytes_per_connection": self.bytes_per_connection,
            "leave_ratio": self.leave_ratio,
        }


@dataclass
class StormResult:
    """``storm``: every client drops at once while ``behind`` events are published, then all
    reconnect at once with their Last-Event-ID; sseload checks each client's ``seq`` runs on
    without a hole or a repeat up to the last event."""

    target: str
    workers: int
    clients: int
    behind: int
    connected: int = 0
    failed: int = 0
    dropped: int = 0
    behind_min: int = 0
    behind_max: int = 0
    reconnected: int = 0
    with_last_event_id: int = 0
    reconnect_failed: int = 0
    reconnect_fail_reasons: dict[str, int] = field(default_factory=dict)
    resumed: int = 0
    all_resumed_s: float | None = None
    """From the reconnect signal to the last client's last event; None when not all resumed."""
    resume_p50_ms: float = 0.0
    resume_p99_ms: float = 0.0
    lost: int = 0
    duplicates: int = 0
    disconnected_early: int = 0
    disconnect_reasons: dict[str, int] = field(default_factory=dict)
    http_status: dict[str, int] = field(default_factory=dict)
    storm_cpu_s: float = 0.0
    """Server CPU from the reconnect signal until every client resumed (or the wait ended)."""
    client_cpu_s: float = 0.0
    loadavg_1m: float = 0.0
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def cpu_us_per_reconnect(self) -> float | None:
        return self.storm_cpu_s / self.reconnected * 1e6 if self.reconnected else None

    @property
    def passed(self) -> bool:
        """Every client dropped came back and resumed, nothing lost, nothing twice."""
        return (
            self.error is None
            and self.dropped == self.clients
            and self.resumed == self.dropped
            and self.lost == 0
            and self.duplicates == 0
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "cpu_us_per_reconnect": self.cpu_us_per_reconnect,
            "passed": self.passed,
        }
