"""Latency histogram: HdrHistogram (the `hdrhistogram` package) in microseconds, 3 significant digits.

Both load drivers feed it: the built-in generator its raw latencies (compressed with `np.unique` first, since
`record_value` is pure Python and a run has up to millions of samples but only thousands of distinct
microsecond values), wrk the (value, count) pairs its Lua script dumps. Percentiles and the CDF then come
from the same code whichever driver measured.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

try:
    from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped,import-not-found,unused-ignore]
except ImportError:  # an optional dependency: only the load-test commands need it
    HdrHistogram = None

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # one hour: nothing a bounded run can exceed
SIGNIFICANT_DIGITS = 3
INSTALL_HINT = "pip install 'gatewatch[bench]'"

# Quantiles (in %) at which a run's CDF is kept: dense in the tail, where servers differ.
CDF_PERCENTILES: tuple[float, ...] = (
    0.0, 1, 5, 10, 20, 30, 40, 50, 60, 70, 75, 80, 85, 90, 92.5, 95, 96, 97, 98, 99, 99.5, 99.9, 99.95, 99.99, 100.0,
)


def require_hdrh() -> None:
    if HdrHistogram is None:
        raise RuntimeError(f"the load generator needs the `hdrhistogram` package: {INSTALL_HINT}")


class LatencyHistogram:
    """Latencies recorded in whole microseconds (at least 1); read back in milliseconds."""

    def __init__(self) -> None:
        require_hdrh()
        assert HdrHistogram is not None
        self._hdr = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)

    @classmethod
    def from_ns(cls, latencies_ns: Sequence[int] | npt.NDArray[np.int64]) -> LatencyHistogram:
        histogram = cls()
        histogram.record_us_array(np.asarray(latencies_ns, dtype=np.int64) // 1000)
        return histogram

    def record_us_array(self, latencies_us: npt.NDArray[np.int64]) -> None:
        values, counts = np.unique(np.clip(latencies_us, LOWEST_US, HIGHEST_US), return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            self._hdr.record_value(value, count)

    def record_us(self, value: int, count: int = 1) -> None:
        self._hdr.record_value(min(max(value, LOWEST_US), HIGHEST_US), count)

    def merge(self, other: LatencyHistogram) -> None:
        self._hdr.add(other._hdr)

    @property
    def count(self) -> int:
        return int(self._hdr.get_total_count())

    def percentile_ms(self, percentile: float) -> float:
        if self.count == 0:
            return float("nan")
        return float(self._hdr.get_value_at_percentile(percentile)) / 1000

    def percentiles_ms(self, percentiles: Sequence[float] = CDF_PERCENTILES) -> list[float]:
        return [self.percentile_ms(p) for p in percentiles]

    @property
    def max_ms(self) -> float:
        return float(self._hdr.get_max_value()) / 1000 if self.count else float("nan")

    @property
    def mean_ms(self) -> float:
        return float(self._hdr.get_mean_value()) / 1000 if self.count else float("nan")
