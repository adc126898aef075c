"""What one load run measured, whichever driver (wrk or the built-in generator) produced it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from loadtests.histogram import LatencyHistogram

Mode = Literal["closed", "open"]

TRANSPORT_ERROR = "transport"  # connection refused/reset/closed mid-response: no status to count it under
TIMEOUT_ERROR = "timeout"  # still in flight at the hard deadline (or past wrk's --timeout)


@dataclass(frozen=True)
class LoadSpec:
    """How to drive a target: closed loop at `concurrency`, or open loop at `rate` requests/s.

    In open loop `concurrency` is the number of connections (the most requests in flight); a request that finds
    them all busy waits, and that wait counts in its latency, which starts at its intended send time.
    """

    concurrency: int = 1
    duration: float = 5.0
    max_requests: int = 10_000_000
    rate: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.duration <= 0 or self.max_requests < 1:
            raise ValueError("concurrency, duration and max_requests must be positive")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")

    @property
    def mode(self) -> Mode:
        return "closed" if self.rate is None else "open"


@dataclass(frozen=True)
class LoadResult:
    """One run. `requests` counts completed responses whatever their status; `statuses` counts them by status.

    `errors` holds every response with another status than expected, and transport failures and timeouts.
    """

    driver: str
    spec: LoadSpec
    requests: int
    seconds: float
    statuses: dict[str, int]
    errors: dict[str, int]
    cpu_seconds: float  # the generator's CPU time over the run: near `seconds` means it was the limit
    histogram: LatencyHistogram = field(repr=False)
    send_lag: LatencyHistogram | None = field(default=None, repr=False)  # open loop: actual - intended send time

    @property
    def concurrency(self) -> int:
        return self.spec.concurrency

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def generator_cpu(self) -> float:
        """Fraction of one core the generator used (1.0 = one core saturated)."""
        return self.cpu_seconds / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return self.histogram.percentile_ms(q)

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(50)

    @property
    def p90_ms(self) -> float:
        return self.percentile_ms(90)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(99)

    def summary(self) -> str:
        load = f"c={self.concurrency}" if self.spec.rate is None else f"rate={self.spec.rate:g}/s c={self.concurrency}"
        return (
            f"{load} n={self.requests} {self.rps:,.0f} req/s p50={self.p50_ms:.3f}ms "
            f"p90={self.p90_ms:.3f}ms p99={self.p99_ms:.3f}ms errors={self.errors or 0} "
            f"gen_cpu={self.generator_cpu:.0%} ({self.driver})"
        )
