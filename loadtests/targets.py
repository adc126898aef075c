"""The issue's performance targets, computed from the samples: each within one repetition, then the median."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import median
from typing import Literal

from loadtests.measure import Cell, Sample

Rep = dict[Cell, Sample]  # one repetition's samples by cell
Metric = Literal["rps", "p50_ms", "p99_ms"]


def _get(rep: Rep, variant: str, model: str, concurrency: int, metric: Metric) -> float | None:
    sample = rep.get(Cell(variant, model, "json", concurrency))
    return None if sample is None or sample.requests == 0 else float(getattr(sample, metric))


def ratio(a: str, b: str, model: str, concurrency: int, metric: Metric) -> Callable[[Rep], float | None]:
    def compute(rep: Rep) -> float | None:
        x, y = _get(rep, a, model, concurrency, metric), _get(rep, b, model, concurrency, metric)
        return None if x is None or y is None or y == 0 else x / y
    return compute


def difference(a: str, b: str, model: str, concurrency: int, metric: Metric) -> Callable[[Rep], float | None]:
    def compute(rep: Rep) -> float | None:
        x, y = _get(rep, a, model, concurrency, metric), _get(rep, b, model, concurrency, metric)
        return None if x is None or y is None else x - y
    return compute


def cost(a: str, baseline: str, model: str, concurrency: int, metric: Metric,
         higher_is_worse: bool) -> Callable[[Rep], float | None]:
    """Relative cost of `a` against `baseline`: the throughput lost, or the latency added, as a fraction."""
    of = ratio(a, baseline, model, concurrency, metric)

    def compute(rep: Rep) -> float | None:
        r = of(rep)
        return None if r is None else (r - 1 if higher_is_worse else 1 - r)
    return compute


@dataclass(frozen=True)
class Goal:
    """A target's wording and bound, whatever it is computed from."""

    text: str
    bound: float
    at_least: bool  # the value must be >= bound (else <= bound)
    unit: Literal["×", "ms", "%"]

    def format(self, value: float) -> str:
        if self.unit == "%":
            return f"{value:.1%}"
        return f"{value:.2f}×" if self.unit == "×" else f"{value:+.3f} ms"

    @property
    def condition(self) -> str:
        return ("≥ " if self.at_least else "≤ ") + (f"{self.bound:.0%}" if self.unit == "%" else
                                                    f"{self.bound:g}{' ms' if self.unit == 'ms' else '×'}")


@dataclass(frozen=True)
class Target(Goal):
    """A goal computed from one repetition of the sequential runs."""

    compute: Callable[[Rep], float | None]


TARGETS: tuple[Target, ...] = (
    Target("tabular, c=64, logging on: gatewatch / naive FastAPI throughput", 2.0, True, "×",
           ratio("gatewatch", "naive", "tabular", 64, "rps")),
    Target("tabular, c=64, logging on: gatewatch / bare uvicorn throughput", 0.35, True, "×",
           ratio("gatewatch", "bare", "tabular", 64, "rps")),
    Target("tabular, c=1: gatewatch p50 − naive FastAPI p50", 0.3, False, "ms",
           difference("gatewatch", "naive", "tabular", 1, "p50_ms")),
    Target("MLP, c=64: batching on / off throughput", 2.0, True, "×",
           ratio("gatewatch", "gatewatch-nobatch", "mlp", 64, "rps")),
    Target("MLP, c=64: batching on / off p99", 2.0, False, "×",
           ratio("gatewatch", "gatewatch-nobatch", "mlp", 64, "p99_ms")),
    Target("MLP, c=1: p50 batching on − off", 0.2, False, "ms",
           difference("gatewatch", "gatewatch-nobatch", "mlp", 1, "p50_ms")),
    Target("tabular, c=64: throughput lost to logging (1 − on / off)", 0.10, False, "%",
           cost("gatewatch", "gatewatch-nolog", "tabular", 64, "rps", higher_is_worse=False)),
    Target("tabular, c=64: primary's p99 cost of a 100 % shadow (shadowed / plain − 1)", 0.15, False, "%",
           cost("gatewatch-shadow", "gatewatch-plain", "tabular", 64, "p99_ms", higher_is_worse=True)),
)


@dataclass(frozen=True)
class TargetOutcome:
    target: Goal
    values: list[float]  # one per repetition that measured every cell the target needs

    @property
    def met(self) -> bool | None:
        if not self.values:
            return None
        value = median(self.values)
        return value >= self.target.bound if self.target.at_least else value <= self.target.bound

    def summary(self) -> str:
        if not self.values:
            return "not measured"
        fmt = self.target.format
        return f"{fmt(median(self.values))} ({fmt(min(self.values))} – {fmt(max(self.values))})"


def by_rep(samples: Sequence[Sample]) -> list[Rep]:
    reps: dict[int, Rep] = {}
    for sample in samples:
        reps.setdefault(sample.rep, {})[sample.cell] = sample
    return [reps[r] for r in sorted(reps)]


def evaluate(samples: Sequence[Sample]) -> list[TargetOutcome]:
    reps = by_rep(samples)
    outcomes = []
    for target in TARGETS:
        values = [v for rep in reps if (v := target.compute(rep)) is not None]
        outcomes.append(TargetOutcome(target, values))
    return outcomes
