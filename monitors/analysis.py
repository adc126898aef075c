"""Everything computed from one closed window, in one call meant for a worker thread (it decodes JSON and runs
the statistics: never on the event loop)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gateway.records import PAYLOAD_SAMPLED_OUT, ROLE_PRIMARY
from monitors.drift.detector import Correction, DriftReport, ReferenceProfile, evaluate
from monitors.features import Tensors, columns_of, parse_tensor_lists, stack
from monitors.feedback import predictions_of, task_of
from monitors.latency import TrafficStats, traffic_stats
from monitors.windows import ClosedWindow

_SAMPLED_OUT = PAYLOAD_SAMPLED_OUT.encode()


@dataclass(frozen=True)
class DriftSettings:
    alpha: float
    correction: Correction


@dataclass
class WindowAnalysis:
    traffic: TrafficStats
    drift: DriftReport | None
    tensor_rows: int  # rows whose tensors were usable for drift
    inputs: Tensors = field(default_factory=dict)  # kept only when a live reference wants rows
    outputs: Tensors = field(default_factory=dict)
    output_types: dict[str, str] = field(default_factory=dict)
    task: str = ""
    predictions: list[tuple[bytes, np.ndarray]] = field(default_factory=list)


def analyse(
    window: ClosedWindow,
    profile: ReferenceProfile | None,
    meta: Mapping[str, Any],
    keep_tensors: bool,
    drift: DriftSettings,
) -> WindowAnalysis:
    traffic = traffic_stats(window.entries, window.start_ms, window.end_ms)
    # Errors carry no outputs and maybe unusable inputs; sampled-out entries carry no tensors at all.
    logged = [e for e in window.entries if e.payload != _SAMPLED_OUT and e.status < 400]
    if not logged or (profile is None and not keep_tensors and window.key.role != ROLE_PRIMARY):
        return WindowAnalysis(traffic, None, 0)
    inputs = stack(parse_tensor_lists([e.inputs for e in logged]), [e.redacted for e in logged])
    outputs = stack(parse_tensor_lists([e.outputs for e in logged]), [frozenset()] * len(logged))
    columns, _ = columns_of(inputs.tensors, outputs.tensors, outputs.datatypes, meta)
    report = evaluate(profile, columns, drift.alpha, drift.correction) if profile is not None else None
    analysis = WindowAnalysis(traffic, report, max((a.shape[0] for a in inputs.tensors.values()), default=0))
    if keep_tensors:
        analysis.inputs, analysis.outputs = inputs.tensors, outputs.tensors
        analysis.output_types = outputs.datatypes
    if window.key.role == ROLE_PRIMARY:
        analysis.task = task_of(meta, outputs.datatypes)
        analysis.predictions = predictions_of(outputs, analysis.task, [e.request_id for e in logged])
    return analysis


def result_document(
    window: ClosedWindow, analysis: WindowAnalysis, worker: str, reference: str, events: list[dict[str, Any]],
    performance: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The stored window result (`gatewatch:windows`, field `result`)."""
    key, traffic, report = window.key, analysis.traffic, analysis.drift
    return {
        "endpoint": key.endpoint, "model": key.model, "version": key.version, "role": key.role,
        "start_ms": window.start_ms, "end_ms": window.end_ms, "rows": window.rows, "entries": len(window.entries),
        "closed_by": window.reason, "worker": worker, "reference": reference, "tensor_rows": analysis.tensor_rows,
        "latency_ms": {f"p{round(q * 100)}": v for q, v in traffic.latency_ms.items()},
        "error_rate": traffic.error_rate, "records_per_second": traffic.records_per_second,
        "drift": None if report is None else {
            "drifted": report.drifted, "alpha": report.alpha, "correction": report.correction,
            "features": [
                {"name": f.name, "test": f.test, "statistic": f.statistic, "p_value": f.p_value,
                 "threshold": f.threshold, "drifted": f.drifted,
                 "scores": {s.test: s.statistic for s in f.scores}}
                for f in report.features
            ],
        },
        "performance": performance,
        "events": [{"type": e["type"], "event_id": e["event_id"]} for e in events],
    }
