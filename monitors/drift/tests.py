"""Univariate drift tests: pure functions from (reference, current) samples to `FeatureResult`s.

Each returns finite numbers for any input, including empty, constant or tiny samples: a test that cannot be
computed says so with `p_value=None` and statistic 0 rather than NaN. The decision (with multiple-testing
correction) belongs to `detector.py`; these only measure.

The monitor compares thousands of windows with one reference, so the reference is prepared once
(`NumericReference`, `CategoricalReference`: sorted values, PSI bins, category counts) and each window costs a
merge of two sorted samples per feature instead of scipy's full re-sort. `ks`, `wasserstein`, `psi` and `chi2`
are the same computations for one-off use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

PSI_BINS = 10
_EPS = 1e-6  # floor for empty bins, so PSI stays finite
_EXACT_KS_MAX_PRODUCT = 10_000  # below this n*m, scipy's exact KS distribution is cheap and worth it


@dataclass(frozen=True)
class FeatureResult:
    feature: str
    test: str  # ks | chi2 | psi | wasserstein
    statistic: float
    p_value: float | None  # None for scores that are not tests (psi, wasserstein) or could not be computed


@dataclass(frozen=True)
class NumericReference:
    """A numeric feature's reference, prepared once: finite values sorted, PSI bin edges and shares, spread."""

    values: np.ndarray
    psi_edges: np.ndarray
    psi_shares: np.ndarray
    spread: float

    @classmethod
    def build(cls, values: np.ndarray, bins: int = PSI_BINS) -> NumericReference:
        ref = np.sort(_finite(values))
        if ref.size == 0:
            return cls(ref, np.empty(0), np.ones(1), 1.0)
        # Bins are right-closed ((-inf, e1], (e1, e2], …), so a constant reference still splits off larger values.
        edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))
        shares = np.bincount(np.searchsorted(edges, ref), minlength=edges.size + 1) / ref.size
        spread = float(np.std(ref)) or float(np.abs(ref).mean()) or 1.0
        return cls(ref, edges, shares, spread)


@dataclass(frozen=True)
class CategoricalReference:
    """A categorical feature's reference: its categories (as text, sorted) and their counts."""

    categories: np.ndarray
    counts: np.ndarray

    @classmethod
    def build(cls, values: np.ndarray) -> CategoricalReference:
        categories, counts = np.unique(as_categories(values), return_counts=True)
        return cls(categories, counts.astype(np.float64))


def numeric_tests(
    feature: str, reference: NumericReference, current: np.ndarray
) -> tuple[FeatureResult, FeatureResult, FeatureResult]:
    """KS (deciding), normalised Wasserstein and PSI of one numeric feature."""
    ref, cur = reference.values, np.sort(_finite(current))
    if ref.size == 0 or cur.size == 0:
        return (
            FeatureResult(feature, "ks", 0.0, None),
            FeatureResult(feature, "wasserstein", 0.0, None),
            FeatureResult(feature, "psi", 0.0, None),
        )
    gap, distance = _ecdf_gap(ref, cur)
    cur_shares = np.bincount(
        np.searchsorted(reference.psi_edges, cur), minlength=reference.psi_edges.size + 1
    ) / cur.size
    return (
        FeatureResult(feature, "ks", gap, _ks_p_value(ref, cur, gap)),
        FeatureResult(feature, "wasserstein", distance / reference.spread, None),
        FeatureResult(feature, "psi", _psi(reference.psi_shares, cur_shares), None),
    )


def categorical_tests(
    feature: str, reference: CategoricalReference, current: np.ndarray
) -> tuple[FeatureResult, FeatureResult]:
    """Chi-squared test of category counts (deciding) and PSI on the category shares."""
    cur_categories, cur_counts = np.unique(as_categories(current), return_counts=True)
    if reference.categories.size == 0 or cur_categories.size == 0:
        return FeatureResult(feature, "chi2", 0.0, None), FeatureResult(feature, "psi", 0.0, None)
    categories = np.union1d(reference.categories, cur_categories)
    table = np.zeros((2, categories.size))
    table[0, np.searchsorted(categories, reference.categories)] = reference.counts
    table[1, np.searchsorted(categories, cur_categories)] = cur_counts
    share = _psi(table[0] / table[0].sum(), table[1] / table[1].sum())
    if categories.size < 2:
        return FeatureResult(feature, "chi2", 0.0, 1.0), FeatureResult(feature, "psi", share, None)
    statistic, p_value = _chi2_contingency(table)
    return FeatureResult(feature, "chi2", statistic, p_value), FeatureResult(feature, "psi", share, None)


def ks(feature: str, reference: np.ndarray, current: np.ndarray) -> FeatureResult:
    """Two-sample Kolmogorov–Smirnov: the deciding test for numeric features."""
    return numeric_tests(feature, NumericReference.build(reference), current)[0]


def wasserstein(feature: str, reference: np.ndarray, current: np.ndarray) -> FeatureResult:
    """Earth mover's distance in units of the reference's standard deviation (so features compare)."""
    return numeric_tests(feature, NumericReference.build(reference), current)[1]


def psi(feature: str, reference: np.ndarray, current: np.ndarray, bins: int = PSI_BINS) -> FeatureResult:
    """Population stability index on the reference's quantile bins."""
    return numeric_tests(feature, NumericReference.build(reference, bins), current)[2]


def chi2(feature: str, reference: np.ndarray, current: np.ndarray) -> tuple[FeatureResult, FeatureResult]:
    """Chi-squared test of category counts (deciding test for categorical features), and PSI on the shares."""
    return categorical_tests(feature, CategoricalReference.build(reference), current)


def as_categories(values: np.ndarray) -> np.ndarray:
    """Values as category labels (text), the same whether they arrive as 3, 3.0 (JSON FP32) or "3"."""
    array: np.ndarray = np.asarray(values).reshape(-1)
    if array.dtype.kind in "biu":
        return array.astype(np.int64).astype(str)
    if array.dtype.kind == "f":
        array = array[np.isfinite(array)]
        if array.size and np.all(array == np.round(array)) and np.all(np.abs(array) < 2**53):
            return array.astype(np.int64).astype(str)
    return array.astype(str)


def _finite(values: np.ndarray) -> np.ndarray:
    array: np.ndarray = np.asarray(values).reshape(-1)
    if array.dtype.kind not in "biuf":
        return np.empty(0)
    numbers: np.ndarray = array.astype(np.float64, copy=False)
    finite: np.ndarray = numbers[np.isfinite(numbers)]
    return finite


def _ecdf_gap(ref: np.ndarray, cur: np.ndarray) -> tuple[float, float]:
    """KS statistic (largest ECDF gap) and Wasserstein-1 distance (area between ECDFs) of two sorted samples."""
    m, n = ref.size, cur.size
    merged = np.concatenate((ref, cur))
    order = np.argsort(merged, kind="stable")  # timsort: a linear merge of the two sorted runs
    values = merged[order]
    # (F_ref - F_cur) * m * n just after each value, in integers so equal samples give exactly 0.
    gap = np.abs(np.cumsum(np.where(order < m, n, -m)))
    # With ties, both ECDFs are only settled after the last of the equal values.
    settled = np.append(values[1:] != values[:-1], True)
    statistic = float(gap[settled].max()) / (m * n)
    distance = float(np.dot(gap[:-1], np.diff(values))) / (m * n)
    return statistic, distance


def _ks_p_value(ref: np.ndarray, cur: np.ndarray, statistic: float) -> float | None:
    m, n = ref.size, cur.size
    if m < 2 or n < 2:
        return None
    if m * n <= _EXACT_KS_MAX_PRODUCT:
        return _clean_p(stats.ks_2samp(ref, cur, method="exact").pvalue)
    # Smirnov's asymptotic distribution with Stephens' small-sample correction: within a few percent of
    # scipy's exact-n `kstwo` at these sizes, and a ufunc call instead of a Python loop per feature.
    root = math.sqrt(m * n / (m + n))
    return _clean_p(float(special.kolmogorov((root + 0.12 + 0.11 / root) * statistic)))


def _chi2_contingency(table: np.ndarray) -> tuple[float, float]:
    """Pearson's chi-squared on a 2 x k table, with Yates' correction at one degree of freedom (as scipy)."""
    expected = np.outer(table.sum(axis=1), table.sum(axis=0)) / table.sum()
    dof = table.shape[1] - 1
    observed = table
    if dof == 1:
        diff = expected - observed
        observed = observed + np.sign(diff) * np.minimum(0.5, np.abs(diff))
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    return statistic, _clean_p(float(special.chdtrc(dof, statistic)))


def _psi(expected: np.ndarray, actual: np.ndarray) -> float:
    expected = np.clip(expected, _EPS, None)
    actual = np.clip(actual, _EPS, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _clean_p(p_value: float) -> float:
    p = float(p_value)
    return 1.0 if math.isnan(p) else min(max(p, 0.0), 1.0)
