"""Side-by-side figures: the per-core ratio and the targets computed from paired runs."""

from __future__ import annotations

import math

import pytest

from loadtests.paired import PAIRED_TARGETS, PairedSample, Side, evaluate_paired, pairs_for


def _side(cpu_us: float, errors: dict[str, int] | None = None) -> Side:
    return Side(requests=1000, rps=1000.0, cpu_us_per_request=cpu_us, p50_ms=1.0, p99_ms=2.0, errors=errors or {})


def _sample(pair: str, subject_us: float, baseline_us: float, concurrency: int = 64, rep: int = 0,
            errors: dict[str, int] | None = None) -> PairedSample:
    return PairedSample(pair, concurrency, rep, _side(subject_us, errors), _side(baseline_us), math.nan, 0.0)


def test_per_core_ratio_is_the_inverse_of_cpu_per_request() -> None:
    assert _sample("naive", 150.0, 300.0).per_core_ratio == pytest.approx(2.0)
    assert math.isnan(_sample("naive", 0.0, 300.0).per_core_ratio)


def test_logging_cost_is_the_share_of_per_core_throughput_lost() -> None:
    outcomes = {o.target.text: o for o in evaluate_paired([
        _sample("logging", 110.0, 100.0, rep=0),  # 1 - 100/110 = 9.1 %
        _sample("logging", 125.0, 100.0, rep=1),  # 20 %
        _sample("logging", 100.0, 100.0, rep=2),  # 0 %
    ])}
    logging = outcomes["side by side, tabular, c=64: throughput lost to logging, per core"]
    assert logging.values == pytest.approx([1 - 100 / 110, 0.2, 0.0])
    assert logging.met is True  # the median, 9.1 %, is within 10 %
    assert logging.summary() == "9.1% (0.0% – 20.0%)"


def test_runs_with_errors_or_at_other_concurrencies_are_not_judged() -> None:
    outcomes = evaluate_paired([
        _sample("naive", 100.0, 300.0, errors={"503": 4}),
        _sample("naive", 100.0, 300.0, concurrency=8),
        _sample("naive", 200.0, 300.0, rep=1),
    ])
    naive = next(o for o in outcomes if o.target.pair == "naive")  # type: ignore[attr-defined]
    assert naive.values == pytest.approx([1.5])
    assert naive.met is False
    batching = next(o for o in outcomes if o.target.pair == "batching")  # type: ignore[attr-defined]
    assert batching.met is None and batching.summary() == "not measured"


def test_pairs_need_both_servers_and_the_model() -> None:
    assert [p.key for p in pairs_for(("gatewatch", "naive", "gatewatch-nolog"), ("tabular",))] == ["logging", "naive"]
    assert [p.key for p in pairs_for(("gatewatch", "gatewatch-nobatch"), ("tabular", "mlp"))] == ["batching"]
    assert pairs_for(("gatewatch",), ("tabular", "mlp")) == []
    assert {t.pair for t in PAIRED_TARGETS} == {"logging", "naive", "batching"}
