"""Univariate drift tests: pure functions from (reference, current) samples to a `FeatureResult`.

Each returns finite numbers for any input, including empty, constant or tiny samples: a test that cannot be
computed says so with `p_value=None` and statistic 0 rather than NaN. The decision (with multiple-testing
correction) belongs to `detector.py`; these only measure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

PSI_BINS = 10
_EPS = 1e-6  # floor for empty bins, so PSI stays finite


@dataclass(frozen=True)
class FeatureResult:
    feature: str
    test: str  # ks | chi2 | psi | wasserstein
    statistic: float
    p_value: float | None  # None for scores that are not tests (psi, wasserstein)


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    return values[np.isfinite(values)]


def ks(feature: str, reference: np.ndarray, current: np.ndarray) -> FeatureResult:
    """Two-sample Kolmogorov–Smirnov: the deciding test for numeric features."""
    ref, cur = _finite(reference), _finite(current)
    if ref.size < 2 or cur.size < 2:
        return FeatureResult(feature, "ks", 0.0, None)
    result = stats.ks_2samp(ref, cur)
    return FeatureResult(feature, "ks", float(result.statistic), _clean_p(result.pvalue))


def wasserstein(feature: str, reference: np.ndarray, current: np.ndarray) -> FeatureResult:
    """Earth mover's distance in units of the reference's standard deviation (so features compare)."""
    ref, cur = _finite(reference), _finite(current)
    if ref.size == 0 or cur.size == 0:
        return FeatureResult(feature, "wasserstein", 0.0, None)
    spread = float(np.std(ref)) or float(np.abs(ref).mean()) or 1.0
    return FeatureResult(feature, "wasserstein", float(stats.wasserstein_distance(ref, cur)) / spread, None)


def psi(feature: str, reference: np.ndarray, current: np.ndarray, bins: int = PSI_BINS) -> FeatureResult:
    """Population stability index on the reference's quantile bins."""
    ref, cur = _finite(reference), _finite(current)
    if ref.size == 0 or cur.size == 0:
        return FeatureResult(feature, "psi", 0.0, None)
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
    ref_share = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1) / ref.size
    cur_share = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=edges.size + 1) / cur.size
    return FeatureResult(feature, "psi", _psi(ref_share, cur_share), None)


def chi2(feature: str, reference: np.ndarray, current: np.ndarray) -> tuple[FeatureResult, FeatureResult]:
    """Chi-squared test of category counts (deciding test for categorical features), and PSI on the shares."""
    ref = np.asarray(reference).reshape(-1).astype(str)
    cur = np.asarray(current).reshape(-1).astype(str)
    if ref.size == 0 or cur.size == 0:
        return FeatureResult(feature, "chi2", 0.0, None), FeatureResult(feature, "psi", 0.0, None)
    categories = np.union1d(ref, cur)
    ref_counts = np.array([np.count_nonzero(ref == c) for c in categories], dtype=np.float64)
    cur_counts = np.array([np.count_nonzero(cur == c) for c in categories], dtype=np.float64)
    share = _psi(ref_counts / ref.size, cur_counts / cur.size)
    if categories.size < 2:
        return FeatureResult(feature, "chi2", 0.0, 1.0), FeatureResult(feature, "psi", share, None)
    statistic, p_value, _, _ = stats.chi2_contingency(np.vstack([ref_counts, cur_counts]))
    return (
        FeatureResult(feature, "chi2", float(statistic), _clean_p(p_value)),
        FeatureResult(feature, "psi", share, None),
    )


def _psi(expected: np.ndarray, actual: np.ndarray) -> float:
    expected = np.clip(expected, _EPS, None)
    actual = np.clip(actual, _EPS, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _clean_p(p_value: float) -> float:
    p = float(p_value)
    return 1.0 if math.isnan(p) else min(max(p, 0.0), 1.0)
