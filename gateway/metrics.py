"""GatewayMetrics: every gateway metric of design.md, on an injected registry.

With several worker processes (`workers > 1`), `PROMETHEUS_MULTIPROC_DIR` is set by the CLI before any worker
starts; prometheus-client then writes values to per-process files and `render()` aggregates them, so `/metrics`
is correct whichever worker answers the scrape.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

REQUEST_LABELS = ("endpoint", "variant", "model", "version")


def multiprocess_mode() -> bool:
    """Whether prometheus-client writes values to files for several worker processes (set by the CLI)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # One process: gauges of live state (queue depths, requests in flight) read that state when scraped
        # instead of being set on every change (~0.3 µs each, several per request). Several processes:
        # prometheus-client only aggregates values written to its files, so they are set on every change.
        self.gauges_read_at_scrape = not multiprocess_mode()
        self.requests = Counter(
            "gatewatch_requests", "Inference requests answered.", (*REQUEST_LABELS, "code"), registry=registry
        )
        self.request_duration = Histogram(
            "gatewatch_request_duration_seconds",
            "Time from request arrival to response, in the gateway.",
            REQUEST_LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "gatewatch_inference_duration_seconds",
            "onnxruntime run time per batch.",
            ("model", "version"),
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "gatewatch_batch_size",
            "Rows per onnxruntime run.",
            ("model", "version"),
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "gatewatch_queue_depth",
            "Requests waiting for a batch.",
            ("model", "version"),
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.in_flight = Gauge(
            "gatewatch_requests_in_flight",
            "Inference requests being handled.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.model_loaded = Gauge(
            "gatewatch_model_loaded",
            "1 while a model version is loaded and serving.",
            ("model", "version"),
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.model_load_failures = Counter(
            "gatewatch_model_load_failures",
            "Model versions refused at load.",
            ("model", "version", "reason"),
            registry=registry,
        )
        self.model_reloads = Counter(
            "gatewatch_model_reloads",
            "Registry changes applied or refused.",
            ("model", "outcome"),
            registry=registry,
        )
        self.model_events = ModelEventCounting(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

        self.shadow_requests = Counter(
            "gatewatch_shadow_requests", "Shadow inferences sampled.", ("endpoint", "variant"), registry=registry
        )
        self.shadow_skipped = Counter(
            "gatewatch_shadow_skipped",
            "Shadow inferences skipped because shadows fell behind.",
            ("endpoint", "variant"),
            registry=registry,
        )
        self.shadow_disagreements = Counter(
            "gatewatch_shadow_disagreements",
            "Shadow answers that disagree with the primary's.",
            ("endpoint", "variant"),
            registry=registry,
        )
        self.log_records = Counter(
            "gatewatch_log_records", "Prediction log records by outcome.", ("outcome",), registry=registry
        )
        self.log_queue_depth = Gauge(
            "gatewatch_log_queue_depth",
            "Log records waiting to be written.",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.log_spool_bytes = Gauge(
            "gatewatch_log_spool_bytes",
            "Bytes in the disk spool (records waiting for Redis).",
            multiprocess_mode="livesum",
            registry=registry,
        )

    def for_version(self, model: str, version: int) -> VersionMetrics:
        labels = (model, str(version))
        return VersionMetrics(
            batch_size=self.batch_size.labels(*labels),
            inference_duration=self.inference_duration.labels(*labels),
            queue=self.queue_depth.labels(*labels),
            read_at_scrape=self.gauges_read_at_scrape,
        )


class ModelEventCounting:
    """Says whether this process counts registry events (versions loaded or refused, aliases moved).

    Every worker process mirrors the registry on its own, so each event happens once per worker; the multiprocess
    counters would add them up (two workers: one refused version counted twice). One worker counts them: the one
    holding a lock on a file in the metrics directory. When it exits the lock is free, and the next worker with an
    event to count takes it over. The first start-up counted is the gateway's: a worker that starts later (one
    uvicorn restarted) loads what is already counted, so its start-up counts nothing.
    """

    def __init__(self, metrics_dir: str | None) -> None:
        self._path = None if metrics_dir is None else Path(metrics_dir) / "model-events.lock"
        self._held: IO[str] | None = None
        self._counts_start_up: bool | None = None  # decided at this process's first start-up event

    def counts(self, start_up: bool = False) -> bool:
        """Whether to count an event; `start_up` for events of this process's first look at the registry."""
        if self._path is None:
            return True
        if not start_up:
            return self._hold()
        if self._counts_start_up is None:
            marker = self._path.with_name("model-events.start-up-counted")
            self._counts_start_up = not marker.exists() and self._hold()  # a late start-up takes no lock
            if self._counts_start_up:
                marker.touch()
        return self._counts_start_up

    def close(self) -> None:
        """Give the lock up (exiting does too)."""
        if self._held is not None:
            self._held.close()
            self._held = None

    def _hold(self) -> bool:
        if self._held is not None:
            return True
        assert self._path is not None
        handle = self._path.open("a")  # a local file, once per event until held: not worth a thread
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._held = handle
        return True


@dataclass(frozen=True)
class VersionMetrics:
    """The metric children of one model version, resolved once so the hot path skips label lookups."""

    batch_size: Histogram
    inference_duration: Histogram
    queue: Gauge
    read_at_scrape: bool = False

    def batch_ran(self, rows: int, seconds: float) -> None:
        self.batch_size.observe(rows)
        self.inference_duration.observe(seconds)

    def queue_depth(self, depth: int) -> None:
        self.queue.set(depth)

    def follow_queue(self, depth: Callable[[], int]) -> bool:
        if self.read_at_scrape:
            self.queue.set_function(depth)
        return self.read_at_scrape


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The exposition for `/metrics`: this process's registry, or every worker's in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        aggregate = CollectorRegistry()
        multiprocess.MultiProcessCollector(aggregate)  # type: ignore[no-untyped-call]
        return generate_latest(aggregate), CONTENT_TYPE_LATEST
    return generate_latest(registry), CONTENT_TYPE_LATEST
