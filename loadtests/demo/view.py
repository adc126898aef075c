"""What the demo shows while it runs: traffic per variant, drift per feature, webhooks as they arrive."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.panel import Panel
from rich.table import Table

from loadtests.demo.receiver import Delivery

_WINDOW_S = 10.0


@dataclass
class TrafficStats:
    """Client-side view of the answers, per variant (from `x-gatewatch-variant`)."""

    totals: Counter[str] = field(default_factory=Counter)
    errors: Counter[int] = field(default_factory=Counter)
    recent: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)

    def record(self, variant: str, status: int, latency_ms: float) -> None:
        if status != 200:
            self.errors[status] += 1
            return
        self.totals[variant] += 1
        self.recent.setdefault(variant, deque(maxlen=20_000)).append((time.monotonic(), latency_ms))

    def table(self) -> Table:
        table = Table(title="traffic (client side, last 10 s)", expand=True)
        for column in ("variant", "requests", "req/s", "p50 ms", "p99 ms"):
            table.add_column(column, justify="right" if column != "variant" else "left")
        now = time.monotonic()
        for variant in sorted(self.totals):
            window = [lat for t, lat in self.recent.get(variant, ()) if now - t <= _WINDOW_S]
            p50, p99 = (np.percentile(window, [50, 99]) if window else (0.0, 0.0))
            rate = f"{len(window) / _WINDOW_S:.0f}"
            table.add_row(variant, str(self.totals[variant]), rate, f"{p50:.1f}", f"{p99:.1f}")
        if self.errors:
            table.caption = "errors: " + ", ".join(f"{code}: {n}" for code, n in sorted(self.errors.items()))
        return table


@dataclass
class DriftView:
    """The monitor's latest per-feature p-values and drift state for one model version, scraped from /metrics."""

    p_values: dict[str, tuple[str, float]] = field(default_factory=dict)
    detected: bool = False
    windows_rows: float = 0.0

    def update(self, exposition: str, model: str, version: str) -> None:
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                labels = sample.labels
                if labels.get("model") != model or labels.get("version") != version:
                    continue
                if labels.get("role", "primary") != "primary":
                    continue
                if sample.name == "gatewatch_drift_p_value" and labels.get("test") in ("ks", "chi2"):
                    self.p_values[labels["feature"]] = (labels["test"], sample.value)
                elif sample.name == "gatewatch_drift_detected":
                    self.detected = sample.value >= 1
                elif sample.name == "gatewatch_window_rows_total":
                    self.windows_rows = sample.value

    def table(self, alpha: float) -> Table:
        state = "[red]DRIFT DETECTED[/red]" if self.detected else "[green]no drift[/green]"
        table = Table(title=f"drift of the champion's inputs and outputs: {state}", expand=True)
        for column in ("feature", "test", "p-value", "vs alpha / features"):
            table.add_column(column)
        threshold = alpha / max(len(self.p_values), 1)
        for feature, (test, p_value) in sorted(self.p_values.items()):
            flag = "[red]shifted[/red]" if p_value < threshold else "ok"
            table.add_row(feature, test, f"{p_value:.2e}", flag)
        table.caption = f"rows analysed: {self.windows_rows:.0f}"
        return table


def alerts_table(deliveries: list[Delivery]) -> Table:
    table = Table(title="webhooks received (signed; verified with webhook_secret)", expand=True)
    for column in ("at", "type", "model", "drifted features", "signature"):
        table.add_column(column)
    for delivery in deliveries[-8:]:
        event = delivery.event
        drifted = [f["name"] for f in event.get("features", []) if f.get("drifted")]
        table.add_row(
            time.strftime("%H:%M:%S", time.localtime(delivery.received_at)),
            f"{event.get('type')} ({delivery.path})",
            f"{event.get('model')} v{event.get('version')}",
            ", ".join(sorted(set(drifted))) or "-",
            "valid" if delivery.signature_ok else "[red]INVALID[/red]",
        )
    return table


def screen(phase: str, traffic: TrafficStats, drift: DriftView, deliveries: list[Delivery], alpha: float,
           where: str) -> Group:
    return Group(
        Panel(phase, title="gatewatch demo"),
        traffic.table(),
        drift.table(alpha),
        alerts_table(deliveries),
        Panel(where, title="where to look"),
    )
