"""Reference vs window, feature by feature, with one family-wise significance level across the features.

`ReferenceProfile` holds each feature's prepared reference and its kind (numeric: KS decides, Wasserstein and PSI
are reported; categorical: chi-squared decides, PSI is reported). `evaluate` runs the tests of `tests.py` and
`correct` shares `alpha` between the deciding p-values (Holm's step-down, or Bonferroni), so a window is flagged
with probability at most `alpha` when nothing changed, however many features the model has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from monitors.drift.tests import (
    CategoricalReference,
    FeatureResult,
    NumericReference,
    categorical_tests,
    numeric_tests,
)

Correction = Literal["holm", "bonferroni"]


@dataclass(frozen=True)
class FeatureDecision:
    """One feature in one window: the deciding test, the threshold its p-value met or missed, all scores."""

    name: str
    test: str  # the deciding test: ks | chi2
    statistic: float
    p_value: float | None
    threshold: float | None  # the corrected level this p-value was compared with; None when untested
    drifted: bool
    scores: tuple[FeatureResult, ...]  # every test and score of the feature (deciding one first)


@dataclass(frozen=True)
class DriftReport:
    features: tuple[FeatureDecision, ...]
    alpha: float
    correction: Correction

    @property
    def drifted(self) -> bool:
        return any(feature.drifted for feature in self.features)

    @property
    def drifted_features(self) -> list[str]:
        return [feature.name for feature in self.features if feature.drifted]

    @property
    def tested(self) -> int:
        return sum(feature.p_value is not None for feature in self.features)


@dataclass(frozen=True)
class ReferenceProfile:
    """The prepared references of a model version's features (inputs and outputs), by feature name."""

    numeric: Mapping[str, NumericReference] = field(default_factory=dict)
    categorical: Mapping[str, CategoricalReference] = field(default_factory=dict)
    source: str = ""  # where it came from, for the logs and the window results
    rows: int = 0

    @classmethod
    def build(
        cls, columns: Mapping[str, np.ndarray], categorical: set[str], source: str, rows: int
    ) -> ReferenceProfile:
        numeric: dict[str, NumericReference] = {}
        categories: dict[str, CategoricalReference] = {}
        for name, values in columns.items():
            if name in categorical or np.asarray(values).dtype.kind not in "iuf":
                categories[name] = CategoricalReference.build(values)
            else:
                numeric[name] = NumericReference.build(values)
        return cls(numeric, categories, source, rows)

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical]


def evaluate(
    profile: ReferenceProfile, columns: Mapping[str, np.ndarray], alpha: float, correction: Correction
) -> DriftReport:
    """Test every feature the reference knows and the window holds, then decide with the corrected level."""
    measured: list[tuple[FeatureResult, tuple[FeatureResult, ...]]] = []
    for name, reference in profile.numeric.items():
        if name in columns:
            results = numeric_tests(name, reference, columns[name])
            measured.append((results[0], results))
    for name, categorical in profile.categorical.items():
        if name in columns:
            chi2_results = categorical_tests(name, categorical, columns[name])
            measured.append((chi2_results[0], chi2_results))
    decisions = correct([deciding.p_value for deciding, _ in measured], alpha, correction)
    features = tuple(
        FeatureDecision(
            deciding.feature, deciding.test, deciding.statistic, deciding.p_value, threshold, rejected, scores
        )
        for (deciding, scores), (threshold, rejected) in zip(measured, decisions, strict=True)
    )
    return DriftReport(features, alpha, correction)


def correct(
    p_values: Sequence[float | None], alpha: float, method: Correction
) -> list[tuple[float | None, bool]]:
    """(threshold, rejected) per p-value, family-wise at `alpha`; a None p-value is not part of the family.

    Bonferroni compares every p-value with alpha/m. Holm sorts them and compares the k-th smallest (from 0) with
    alpha/(m-k), stopping at the first that misses: never fewer rejections than Bonferroni, same guarantee.
    """
    tested = [i for i, p in enumerate(p_values) if p is not None]
    m = len(tested)
    result: list[tuple[float | None, bool]] = [(None, False)] * len(p_values)
    if m == 0:
        return result
    if method == "bonferroni":
        for i in tested:
            result[i] = (alpha / m, _p(p_values[i]) <= alpha / m)
        return result
    still_rejecting = True
    for rank, i in enumerate(sorted(tested, key=lambda j: _p(p_values[j]))):
        threshold = alpha / (m - rank)
        still_rejecting = still_rejecting and _p(p_values[i]) <= threshold
        result[i] = (threshold, still_rejecting)
    return result


def _p(value: float | None) -> float:
    return 1.0 if value is None else value
