"""The persistence state machine and the events it emits."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import orjson

from monitors.alerts import (
    DRIFT_DETECTED,
    DRIFT_RESOLVED,
    RETRAIN_REQUESTED,
    SLO_BREACH,
    SLO_RESOLVED,
    AlertRules,
    AlertState,
    WindowFacts,
    build_event,
    step,
)
from monitors.drift.detector import DriftReport, FeatureDecision
from monitors.drift.tests import FeatureResult
from monitors.windows import WindowKey

DEFAULTS = AlertRules(persistence=2, resolve_after=3, retrain_after=2, latency_slo_ms=None)
KEY = WindowKey("fraud", "tabular", "3", "primary")


def run(windows: Sequence[bool | None], rules: AlertRules = DEFAULTS) -> list[list[str]]:
    state, fired = AlertState(), []
    for drifted in windows:
        state, events = step(state, drifted, None, rules)
        fired.append(events)
    return fired


def test_detected_after_persistence_consecutive_drifted_windows() -> None:
    assert run([True, True, True]) == [[], [DRIFT_DETECTED, RETRAIN_REQUESTED], []]


def test_scattered_drifted_windows_never_alert() -> None:
    fired = run([True, False, True, False, True, False, False, True])
    assert all(events == [] for events in fired)


def test_resolved_after_clean_windows_and_a_new_incident_asks_again() -> None:
    fired = run([True, True, False, False, True, False, False, False, True, True])
    assert fired[1] == [DRIFT_DETECTED, RETRAIN_REQUESTED]
    assert fired[4] == []  # still the same incident: a clean run of 2 < 3 did not resolve it
    assert fired[7] == [DRIFT_RESOLVED]
    assert fired[9] == [DRIFT_DETECTED, RETRAIN_REQUESTED]
    assert sum(events.count(RETRAIN_REQUESTED) for events in fired) == 2


def test_retrain_requested_once_per_incident() -> None:
    fired = run([True] * 10, AlertRules(2, 3, retrain_after=4, latency_slo_ms=None))
    assert [i for i, events in enumerate(fired) if RETRAIN_REQUESTED in events] == [3]
    assert [i for i, events in enumerate(fired) if DRIFT_DETECTED in events] == [1]


def test_untested_windows_leave_the_state_alone() -> None:
    assert run([True, None, None, True]) == [[], [], [], [DRIFT_DETECTED, RETRAIN_REQUESTED]]
    assert run([True, True, False, None, False, None, False])[6] == [DRIFT_RESOLVED]


def test_latency_breach_and_resolution() -> None:
    rules = AlertRules(2, 3, 2, latency_slo_ms=100.0)
    state, fired = AlertState(), []
    for p99 in [150.0, 90.0, 150.0, 200.0, 300.0, 50.0, 60.0, None, 70.0, 80.0]:
        state, events = step(state, None, p99, rules)
        fired.append(events)
    assert [i for i, e in enumerate(fired) if e == [SLO_BREACH]] == [3]
    assert [i for i, e in enumerate(fired) if e == [SLO_RESOLVED]] == [8]


def test_no_latency_rule_without_an_slo() -> None:
    state, events = step(AlertState(), None, 10_000.0, DEFAULTS)
    assert events == [] and state == AlertState()


def test_state_round_trips_through_json() -> None:
    state = AlertState(drift_active=True, drift_streak=4, incident_drifted=5, retrain_asked=True, breach_streak=1)
    assert AlertState.from_json(state.to_json()) == state
    assert AlertState.from_json(None) == AlertState()
    assert AlertState.from_json(b"not json") == AlertState()


def test_event_payload_has_the_design_fields() -> None:
    decision = FeatureDecision("X[3]", "ks", 0.31, 1e-30, 0.01 / 35, True,
                               (FeatureResult("X[3]", "ks", 0.31, 1e-30), FeatureResult("X[3]", "psi", 0.8, None)))
    report = DriftReport((decision,), 0.01, "holm")
    facts = WindowFacts(KEY, 1_700_000_000_000, 1_700_000_060_000, 1000, report, 12.5, None)
    event = build_event(DRIFT_DETECTED, facts)
    assert set(event) == {"event_id", "type", "endpoint", "model", "version", "role", "detected_at", "window",
                          "features", "summary"}
    assert uuid.UUID(event["event_id"]).version == 4
    assert event["window"] == {"start": "2023-11-14T22:13:20.000Z", "end": "2023-11-14T22:14:20.000Z", "rows": 1000}
    assert event["features"] == [{"name": "X[3]", "test": "ks", "statistic": 0.31, "p_value": 1e-30,
                                  "threshold": 0.01 / 35, "drifted": True}]
    assert "X[3]" in event["summary"]
    assert build_event(DRIFT_DETECTED, facts)["event_id"] != event["event_id"]
    orjson.dumps(event)  # serialisable as it is
