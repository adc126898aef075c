"""Alert rules: the persistence state machine per window key, and the events it emits (the webhook payload).

Drift: `drift.detected` after `drift_persistence` consecutive drifted windows, `drift.resolved` after
`drift_resolve_after` consecutive clean ones; `retrain.requested` once per incident, when the incident has had
`retrain_after_windows` drifted windows (the per-version cooldown on top is applied where the event is stored).
Latency: `latency.slo_breach` after `drift_persistence` windows whose p99 is over `latency_slo_ms`,
`latency.slo_resolved` after `drift_resolve_after` windows under it. A window that could not be tested
(no reference yet, no latencies) leaves the state as it was.
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

import orjson

from monitors.drift.detector import DriftReport
from monitors.windows import WindowKey

DRIFT_DETECTED = "drift.detected"
DRIFT_RESOLVED = "drift.resolved"
SLO_BREACH = "latency.slo_breach"
SLO_RESOLVED = "latency.slo_resolved"
RETRAIN_REQUESTED = "retrain.requested"


@dataclass(frozen=True)
class AlertRules:
    persistence: int
    resolve_after: int
    retrain_after: int
    latency_slo_ms: float | None


@dataclass(frozen=True)
class AlertState:
    drift_active: bool = False
    drift_streak: int = 0
    clean_streak: int = 0
    incident_drifted: int = 0  # drifted windows since the incident began
    retrain_asked: bool = False
    slo_active: bool = False
    breach_streak: int = 0
    good_streak: int = 0

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> AlertState:
        if not raw:
            return cls()
        try:
            fields = orjson.loads(raw)
            return cls(**{k: v for k, v in fields.items() if k in cls.__dataclass_fields__})
        except (orjson.JSONDecodeError, TypeError, AttributeError):
            return cls()


def step(
    state: AlertState, drifted: bool | None, p99_ms: float | None, rules: AlertRules
) -> tuple[AlertState, list[str]]:
    """The state after one window, and the event types that window triggers (in order)."""
    events: list[str] = []
    if drifted is not None:
        state = _drift_step(state, drifted, rules, events)
    if rules.latency_slo_ms is not None and p99_ms is not None:
        state = _latency_step(state, p99_ms > rules.latency_slo_ms, rules, events)
    return state, events


def _drift_step(state: AlertState, drifted: bool, rules: AlertRules, events: list[str]) -> AlertState:
    if drifted:
        state = replace(state, drift_streak=state.drift_streak + 1, clean_streak=0,
                        incident_drifted=state.incident_drifted + 1)
        if not state.drift_active and state.drift_streak >= rules.persistence:
            state = replace(state, drift_active=True)
            events.append(DRIFT_DETECTED)
        if not state.retrain_asked and state.incident_drifted >= rules.retrain_after:
            state = replace(state, retrain_asked=True)
            events.append(RETRAIN_REQUESTED)
        return state
    state = replace(state, clean_streak=state.clean_streak + 1, drift_streak=0)
    if not state.drift_active:
        # Before detection a clean window breaks the run: scattered false alarms never add up to an incident.
        state = replace(state, incident_drifted=0)
    if state.clean_streak >= rules.resolve_after:
        if state.drift_active:
            events.append(DRIFT_RESOLVED)
        state = replace(state, drift_active=False, incident_drifted=0, retrain_asked=False)
    return state


def _latency_step(state: AlertState, breach: bool, rules: AlertRules, events: list[str]) -> AlertState:
    if breach:
        state = replace(state, breach_streak=state.breach_streak + 1, good_streak=0)
        if not state.slo_active and state.breach_streak >= rules.persistence:
            state = replace(state, slo_active=True)
            events.append(SLO_BREACH)
        return state
    state = replace(state, good_streak=state.good_streak + 1, breach_streak=0)
    if state.slo_active and state.good_streak >= rules.resolve_after:
        state = replace(state, slo_active=False)
        events.append(SLO_RESOLVED)
    return state


@dataclass(frozen=True)
class WindowFacts:
    """What an event says about the window that triggered it."""

    key: WindowKey
    start_ms: int
    end_ms: int
    rows: int
    drift: DriftReport | None
    p99_ms: float | None
    latency_slo_ms: float | None


def build_event(event_type: str, facts: WindowFacts, now: datetime | None = None) -> dict[str, Any]:
    """The webhook payload of design.md; a fresh event id (uuid4) that every retry of it reuses."""
    key = facts.key
    if event_type in (SLO_BREACH, SLO_RESOLVED):
        features = [_latency_feature(facts)]
    else:
        features = [_feature(decision) for decision in facts.drift.features] if facts.drift else []
    return {
        "event_id": str(uuid.uuid4()),
        "type": event_type,
        "endpoint": key.endpoint,
        "model": key.model,
        "version": key.version,
        "role": key.role,
        "detected_at": _iso((now or datetime.now(UTC)).timestamp() * 1000),
        "window": {"start": _iso(facts.start_ms), "end": _iso(facts.end_ms), "rows": facts.rows},
        "features": features,
        "summary": _summary(event_type, facts),
    }


def _feature(decision: Any) -> dict[str, Any]:
    return {
        "name": decision.name,
        "test": decision.test,
        "statistic": decision.statistic,
        "p_value": decision.p_value,
        "threshold": decision.threshold,
        "drifted": decision.drifted,
    }


def _latency_feature(facts: WindowFacts) -> dict[str, Any]:
    breach = facts.p99_ms is not None and facts.latency_slo_ms is not None and facts.p99_ms > facts.latency_slo_ms
    return {"name": "latency_p99_ms", "test": "p99", "statistic": facts.p99_ms, "p_value": None,
            "threshold": facts.latency_slo_ms, "drifted": breach}


def _summary(event_type: str, facts: WindowFacts) -> str:
    key = facts.key
    where = f"{key.model} v{key.version} ({key.role}) on endpoint {key.endpoint}"
    if event_type in (SLO_BREACH, SLO_RESOLVED):
        verb = "over" if event_type == SLO_BREACH else "back under"
        return f"{where}: p99 latency {facts.p99_ms:.1f} ms {verb} the {facts.latency_slo_ms:g} ms SLO"
    drift = facts.drift
    drifted = drift.drifted_features if drift else []
    tested = drift.tested if drift else 0
    if event_type == DRIFT_RESOLVED:
        return f"{where}: no drift in the last windows ({tested} features tested)"
    names = ", ".join(drifted[:10]) + (" …" if len(drifted) > 10 else "")
    action = "retraining requested: " if event_type == RETRAIN_REQUESTED else ""
    return f"{where}: {action}drift in {len(drifted)} of {tested} features: {names}"


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
