"""The monitor's Prometheus metrics (design.md, "Metrics", monitor part), names and labels exactly as there.

One `MonitorMetrics` per worker process, on an injected registry (a fresh one per test). Gauges describe the
latest closed window of each key; a worker that gives a stream up removes that endpoint's gauges, so only the
stream's current owner reports them. `window_rows_total` and `webhook_deliveries_total` are counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from monitors.drift.detector import DriftReport
from monitors.feedback import Performance
from monitors.latency import TrafficStats
from monitors.windows import WindowKey

_KEY = ("endpoint", "model", "version", "role")
_VERSION = ("endpoint", "model", "version")


class MonitorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.drift_score = Gauge(
            "gatewatch_drift_score", "Drift statistic of a feature in the latest window (ks, chi2, psi, wasserstein).",
            [*_KEY, "feature", "test"], registry=registry)
        self.drift_p_value = Gauge(
            "gatewatch_drift_p_value", "p-value of a feature's test in the latest window (ks, chi2).",
            [*_KEY, "feature", "test"], registry=registry)
        self.drift_detected = Gauge(
            "gatewatch_drift_detected", "1 while a drift incident is open (detected, not yet resolved).",
            _KEY, registry=registry)
        self.window_rows = Counter(
            "gatewatch_window_rows_total", "Rows in closed monitor windows.", _KEY, registry=registry)
        self.latency = Gauge(
            "gatewatch_latency_quantile_seconds", "Gateway latency quantile in the latest primary window.",
            [*_VERSION, "quantile"], registry=registry)
        self.error_rate = Gauge(
            "gatewatch_error_rate", "Share of requests answered with status >= 400 in the latest primary window.",
            _VERSION, registry=registry)
        self.accuracy = Gauge(
            "gatewatch_accuracy", "Accuracy of the predictions joined to feedback in the latest window.",
            _VERSION, registry=registry)
        self.mae = Gauge(
            "gatewatch_mae", "Mean absolute error of the predictions joined to feedback in the latest window.",
            _VERSION, registry=registry)
        self.stream_lag = Gauge(
            "gatewatch_stream_lag_entries", "Log entries not yet delivered to the monitor group, plus pending ones.",
            ["endpoint"], registry=registry)
        self.webhook_deliveries = Counter(
            "gatewatch_webhook_deliveries_total", "Webhook tries by outcome.", ["outcome"], registry=registry)
        for outcome in ("delivered", "retried", "dead"):
            self.webhook_deliveries.labels(outcome)

    def window(self, key: WindowKey, rows: int, drift: DriftReport | None, drift_active: bool) -> None:
        labels = (key.endpoint, key.model, key.version, key.role)
        self.window_rows.labels(*labels).inc(rows)
        self.drift_detected.labels(*labels).set(1 if drift_active else 0)
        if drift is None:
            return
        for feature in drift.features:
            for score in feature.scores:
                self.drift_score.labels(*labels, score.feature, score.test).set(score.statistic)
                if score.p_value is not None:
                    self.drift_p_value.labels(*labels, score.feature, score.test).set(score.p_value)

    def traffic(self, key: WindowKey, stats: TrafficStats) -> None:
        labels = (key.endpoint, key.model, key.version)
        for quantile, milliseconds in stats.latency_ms.items():
            self.latency.labels(*labels, f"{quantile:g}").set(milliseconds / 1000)
        self.error_rate.labels(*labels).set(stats.error_rate)

    def performance(self, key: WindowKey, performance: Performance) -> None:
        labels = (key.endpoint, key.model, key.version)
        if performance.accuracy is not None:
            self.accuracy.labels(*labels).set(performance.accuracy)
        if performance.mae is not None:
            self.mae.labels(*labels).set(performance.mae)

    def lag(self, endpoint: str, entries: int) -> None:
        self.stream_lag.labels(endpoint).set(entries)

    def forget_endpoint(self, endpoint: str) -> None:
        """Drop the gauges of a stream this worker no longer owns (its new owner reports them)."""
        for gauge in (self.drift_score, self.drift_p_value, self.drift_detected, self.latency, self.error_rate,
                      self.accuracy, self.mae, self.stream_lag):
            for labels in _label_sets(gauge):
                if labels[0] == endpoint:
                    gauge.remove(*labels)

    def webhook_delivered(self) -> None:
        self.webhook_deliveries.labels("delivered").inc()

    def webhook_retried(self) -> None:
        self.webhook_deliveries.labels("retried").inc()

    def webhook_dead(self) -> None:
        self.webhook_deliveries.labels("dead").inc()


def _label_sets(gauge: Gauge) -> list[tuple[str, ...]]:
    # prometheus_client keeps no public list of a metric's children; collect() yields one sample per child.
    names = gauge._labelnames
    return [tuple(sample.labels[name] for name in names) for metric in gauge.collect() for sample in metric.samples]
