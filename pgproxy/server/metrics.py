"""Counters and histograms for ``/metrics`` (Prometheus text exposition format 0.0.4).

Kept deliberately small: the proxy updates plain attributes on the hot path and the text is
rendered only when scraped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

LATENCY_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            running += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {self.n}')
        lines.append(f"{self.name}_sum {self.total}")
        lines.append(f"{self.name}_count {self.n}")
        return lines


@dataclass
class Metrics:
    connections_total: int = 0
    connections_active: int = 0
    auth_failures: int = 0
    pending_holds: int = 0
    masked_cells: int = 0
    statements: dict[str, int] = field(default_factory=dict)
    decision_seconds: Histogram = field(
        default_factory=lambda: Histogram(
            "pgproxy_decision_seconds", "Time the policy took to decide a statement."
        )
    )
    query_seconds: Histogram = field(
        default_factory=lambda: Histogram(
            "pgproxy_query_seconds", "Time from sending a statement upstream to its completion."
        )
    )

    def count_statement(self, decision: str) -> None:
        self.statements[decision] = self.statements.get(decision, 0) + 1

    def render(self, extra: dict[str, float] | None = None) -> str:
        lines = [
            "# HELP pgproxy_connections_total Agent connections accepted.",
            "# TYPE pgproxy_connections_total counter",
            f"pgproxy_connections_total {self.connections_total}",
            "# HELP pgproxy_connections_active Agent connections open now.",
            "# TYPE pgproxy_connections_active gauge",
            f"pgproxy_connections_active {self.connections_active}",
            "# HELP pgproxy_auth_failures_total Failed agent authentications.",
            "# TYPE pgproxy_auth_failures_total counter",
            f"pgproxy_auth_failures_total {self.auth_failures}",
            "# HELP pgproxy_statements_total Statements decided, by decision.",
            "# TYPE pgproxy_statements_total counter",
        ]
        for decision in ("ALLOW", "MASK", "HOLD", "BLOCK"):
            count = self.statements.get(decision, 0)
            lines.append(f'pgproxy_statements_total{{decision="{decision}"}} {count}')
        lines += [
            "# HELP pgproxy_pending_holds Statements waiting for an approval.",
            "# TYPE pgproxy_pending_holds gauge",
            f"pgproxy_pending_holds {self.pending_holds}",
            "# HELP pgproxy_masked_cells_total Result cells rewritten by masking.",
            "# TYPE pgproxy_masked_cells_total counter",
            f"pgproxy_masked_cells_total {self.masked_cells}",
        ]
        lines += self.decision_seconds.render()
        lines += self.query_seconds.render()
        for name, value in (extra or {}).items():
            lines += [f"# TYPE {name} gauge", f"{name} {value}"]
        return "\n".join(lines) + "\n"
