"""Drift tests and the detector: finite on any input, in line with scipy, family-wise corrected decisions."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest
from scipy import stats

from monitors.drift import tests as drift_tests
from monitors.drift.detector import ReferenceProfile, correct, evaluate
from monitors.features import columns_of

SAMPLES: dict[str, np.ndarray] = {
    "empty": np.array([]),
    "one": np.array([1.5]),
    "two": np.array([0.0, 1.0]),
    "constant": np.full(50, 3.0),
    "other_constant": np.full(7, -2.0),
    "tiny": np.array([0.1, 0.2, 0.2]),
    "nan_inf": np.array([np.nan, np.inf, -np.inf, 1.0]),
    "all_nan": np.array([np.nan, np.nan]),
    "normal": np.random.default_rng(0).normal(size=500),
    "integers": np.array([1, 2, 2, 3, 3, 3]),
    "strings": np.array(["a", "b", "b"]),
    "booleans": np.array([True, False, True]),
}


def _check(result: drift_tests.FeatureResult) -> None:
    assert math.isfinite(result.statistic), result
    assert result.p_value is None or 0.0 <= result.p_value <= 1.0, result


@pytest.mark.parametrize(("reference", "current"), list(product(SAMPLES, SAMPLES)))
def test_drift_tests_finite_on_degenerate_input(reference: str, current: str) -> None:
    ref, cur = SAMPLES[reference], SAMPLES[current]
    for result in (drift_tests.ks("f", ref, cur), drift_tests.wasserstein("f", ref, cur),
                   drift_tests.psi("f", ref, cur), *drift_tests.chi2("f", ref, cur)):
        _check(result)


def test_ks_identical_constant_samples_do_not_drift() -> None:
    result = drift_tests.ks("f", np.full(100, 2.0), np.full(40, 2.0))
    assert result.statistic == 0.0
    assert result.p_value == 1.0


@pytest.mark.parametrize(("m", "n", "shift"), [(5000, 1000, 0.0), (5000, 1000, 0.12), (2000, 1000, 0.3),
                                              (60, 40, 0.5), (30, 20, 0.0)])
def test_ks_agrees_with_scipy(m: int, n: int, shift: float) -> None:
    rng = np.random.default_rng(m + n)
    ref, cur = rng.normal(size=m), rng.normal(shift, size=n)
    ours, theirs = drift_tests.ks("f", ref, cur), stats.ks_2samp(ref, cur)
    assert ours.statistic == pytest.approx(theirs.statistic, abs=1e-12)
    assert ours.p_value is not None
    # Exact for small samples; Smirnov's limit with Stephens' correction (a few percent off) for large ones.
    assert ours.p_value == pytest.approx(theirs.pvalue, rel=0.06, abs=1e-12)


def test_wasserstein_is_scipys_distance_in_reference_sds() -> None:
    rng = np.random.default_rng(3)
    ref, cur = rng.normal(0, 2, 3000), rng.normal(1, 2, 700)
    expected = stats.wasserstein_distance(ref, cur) / np.std(ref)
    assert drift_tests.wasserstein("f", ref, cur).statistic == pytest.approx(expected, rel=1e-9)


def test_chi2_agrees_with_scipy_and_matches_integral_floats() -> None:
    rng = np.random.default_rng(4)
    ref = rng.choice(4, 3000, p=[0.25, 0.25, 0.25, 0.25])
    cur = rng.choice(4, 1000, p=[0.4, 0.3, 0.2, 0.1]).astype(np.float64)  # JSON FP32 categories: 2.0 is "2"
    result, psi_result = drift_tests.chi2("f", ref, cur)
    table = np.vstack([np.bincount(ref, minlength=4), np.bincount(cur.astype(int), minlength=4)])
    statistic, p_value, _, _ = stats.chi2_contingency(table)
    assert result.statistic == pytest.approx(statistic)
    assert result.p_value == pytest.approx(p_value, rel=1e-9, abs=1e-300)
    assert psi_result.statistic > 0.1


def test_psi_zero_for_same_sample_large_for_shift() -> None:
    sample = np.random.default_rng(5).normal(size=2000)
    assert drift_tests.psi("f", sample, sample).statistic == pytest.approx(0.0, abs=1e-12)
    assert drift_tests.psi("f", sample, sample + 1.0).statistic > 0.5


def test_bonferroni_shares_alpha_equally() -> None:
    decisions = correct([0.001, 0.011, 0.02, 0.5], alpha=0.05, method="bonferroni")
    assert [d[1] for d in decisions] == [True, True, False, False]
    assert all(d[0] == pytest.approx(0.0125) for d in decisions)


def test_holm_steps_down_and_rejects_at_least_as_much() -> None:
    decisions = correct([0.02, 0.001, 0.5, 0.011], alpha=0.05, method="holm")
    assert [d[1] for d in decisions] == [True, True, False, True]
    assert [d[0] for d in decisions] == pytest.approx([0.025, 0.0125, 0.05, 0.05 / 3])


def test_holm_stops_at_the_first_miss() -> None:
    # 0.03 misses 0.05/2, so 0.04 is not rejected either, although it is under its own alpha/1.
    decisions = correct([0.001, 0.03, 0.04], alpha=0.05, method="holm")
    assert [d[1] for d in decisions] == [True, False, False]


def test_untested_features_are_not_in_the_family() -> None:
    decisions = correct([None, 0.02, None], alpha=0.05, method="bonferroni")
    assert decisions[0] == (None, False) and decisions[2] == (None, False)
    assert decisions[1] == (0.05, True)
    assert correct([None], 0.05, "holm") == [(None, False)]


def test_detector_flags_only_the_shifted_feature() -> None:
    rng = np.random.default_rng(6)
    inputs = {"X": rng.normal(size=(4000, 8))}
    outputs = {"label": rng.integers(0, 3, 4000)}
    columns, categorical = columns_of(inputs, outputs, {"label": "INT64"}, {})
    profile = ReferenceProfile.build(columns, categorical, "test", 4000)
    assert set(profile.categorical) == {"label"} and len(profile.numeric) == 8
    window = rng.normal(size=(1000, 8))
    window[:, 2] += 0.5
    live, _ = columns_of({"X": window}, {"label": rng.integers(0, 3, 1000)}, {"label": "INT64"}, {})
    report = evaluate(profile, live, alpha=0.01, correction="holm")
    assert report.drifted_features == ["X[2]"]
    assert report.tested == 9
    tests_by_feature = {f.name: {s.test for s in f.scores} for f in report.features}
    assert tests_by_feature["X[0]"] == {"ks", "wasserstein", "psi"}
    assert tests_by_feature["label"] == {"chi2", "psi"}


def test_feature_names_from_meta_and_categorical_inputs() -> None:
    rng = np.random.default_rng(7)
    meta = {"features": {"X": ["age", "colour"]}, "categorical": ["colour"]}
    inputs = {"X": np.column_stack([rng.normal(size=200), rng.integers(0, 3, 200)]), "img": np.zeros((200, 2, 2))}
    columns, categorical = columns_of(inputs, {"score": rng.random(200)}, {"score": "FP32"}, meta)
    assert set(columns) == {"age", "colour", "score"}  # rank-3 `img` is not tested per feature
    assert categorical == {"colour"}
