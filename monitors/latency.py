"""Latency quantiles, error rate and throughput of one window (per entry: a request, whatever its rows)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from monitors.windows import LogEntry

QUANTILES = (0.5, 0.95, 0.99)


@dataclass(frozen=True)
class TrafficStats:
    entries: int
    errors: int
    latency_ms: dict[float, float]  # quantile -> milliseconds; empty for an empty window
    records_per_second: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.entries if self.entries else 0.0

    @property
    def p99_ms(self) -> float | None:
        return self.latency_ms.get(0.99)


def traffic_stats(entries: Sequence[LogEntry], start_ms: int, end_ms: int) -> TrafficStats:
    if not entries:
        return TrafficStats(0, 0, {}, 0.0)
    latencies = np.fromiter((entry.latency_ms for entry in entries), dtype=np.float64, count=len(entries))
    latencies = latencies[np.isfinite(latencies)]
    quantiles: list[float] = np.quantile(latencies, QUANTILES).tolist() if latencies.size else []
    errors = sum(entry.status >= 400 for entry in entries)
    # A window whose entries all carry one timestamp still spans a millisecond, so the rate stays finite.
    seconds = max(end_ms - start_ms, 1) / 1000
    return TrafficStats(
        entries=len(entries),
        errors=errors,
        latency_ms={q: float(v) for q, v in zip(QUANTILES, quantiles, strict=False)},
        records_per_second=len(entries) / seconds,
    )
