"""HDR histogram percentiles against numpy's on the same random latencies."""

from __future__ import annotations

import numpy as np
import pytest

from loadtests.histogram import CDF_PERCENTILES, LatencyHistogram


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_percentiles_match_numpy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    latencies_ns = (rng.lognormal(mean=13, sigma=1.2, size=50_000)).astype(np.int64)  # ~0.4 ms median, long tail
    histogram = LatencyHistogram.from_ns(latencies_ns)
    assert histogram.count == latencies_ns.size
    ordered = np.sort(latencies_ns) / 1e6
    for q in (1, 10, 50, 90, 99, 99.9):
        expected = float(np.percentile(latencies_ns, q, method="inverted_cdf")) / 1e6
        # 3 significant digits plus the microsecond unit (0.1 % + 1 µs), and the rank may differ by one where
        # the tail is sparse: the value must lie between the neighbouring order statistics, so widened.
        rank = int(np.ceil(q / 100 * ordered.size)) - 1
        low, high = ordered[max(rank - 1, 0)], ordered[min(rank + 1, ordered.size - 1)]
        found = histogram.percentile_ms(q)
        assert low * (1 - 2e-3) - 1e-3 <= found <= high * (1 + 2e-3) + 1e-3, (q, found, expected)


def test_cdf_is_monotonic_and_spans_min_to_max() -> None:
    values = np.arange(1, 10_001, dtype=np.int64) * 1000  # 1 µs … 10 ms
    histogram = LatencyHistogram.from_ns(values)
    cdf = histogram.percentiles_ms(CDF_PERCENTILES)
    assert cdf == sorted(cdf)
    assert cdf[0] == pytest.approx(0.001, abs=1e-3)
    assert cdf[-1] == pytest.approx(10.0, rel=2e-3)
    assert histogram.max_ms == pytest.approx(10.0, rel=2e-3)


def test_merge_adds_counts_and_empty_is_nan() -> None:
    a = LatencyHistogram.from_ns([1_000_000] * 10)
    b = LatencyHistogram.from_ns([3_000_000] * 30)
    a.merge(b)
    assert a.count == 40
    assert a.percentile_ms(50) == pytest.approx(3.0, rel=2e-3)
    assert np.isnan(LatencyHistogram().percentile_ms(50))
