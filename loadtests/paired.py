"""Side-by-side runs: two servers on the same core, loaded at the same time, compared by CPU per request.

Sequential runs compare a server measured now with another measured seconds later; on a shared VM the
machine's speed drifts by ±25 % between them, more than some of the differences we want to see. Here both
servers of a pair share the server core and are loaded together by two generators, so they see the same
noise, the same clock and the same cache pressure. Each is CPU-bound, so the figure that compares them is the
CPU time each spent per answered request; a server's throughput on a core of its own is the inverse of it.
Absolute figures are higher than in the sequential runs (two processes take turns on one core); the ratios
are what these runs are for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from statistics import median
from typing import Literal

from loadtests import workloads as w
from loadtests.drivers import Driver, drive
from loadtests.machine import QuietGate
from loadtests.result import LoadResult, LoadSpec
from loadtests.servers import ManagedServer
from loadtests.target import HttpTarget
from loadtests.targets import Goal, TargetOutcome


@dataclass(frozen=True)
class Pair:
    """Two rows of the report (suite variant keys) measured at once on one model's JSON request."""

    key: str
    label: str
    subject: str
    baseline: str
    model: str


PAIRS: tuple[Pair, ...] = (
    Pair("logging", "gatewatch, logging on vs off", w.GATEWATCH, w.GATEWATCH_NOLOG, w.TABULAR),
    Pair("naive", "gatewatch (logging on) vs naive FastAPI", w.GATEWATCH, w.NAIVE, w.TABULAR),
    Pair("batching", "gatewatch, batching on vs off", w.GATEWATCH, w.GATEWATCH_NOBATCH, w.MLP),
)


@dataclass(frozen=True)
class Side:
    """What one server of a pair did during the shared run."""

    requests: int
    rps: float
    cpu_us_per_request: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]


@dataclass(frozen=True)
class PairedSample:
    pair: str
    concurrency: int
    rep: int
    subject: Side
    baseline: Side
    background_before: float
    quiet_wait_s: float

    @property
    def per_core_ratio(self) -> float:
        """Subject's throughput on a core of its own relative to the baseline's (inverse CPU per request)."""
        if self.subject.cpu_us_per_request <= 0:
            return math.nan
        return self.baseline.cpu_us_per_request / self.subject.cpu_us_per_request


Measure = Literal["ratio", "cost"]


@dataclass(frozen=True)
class PairedTarget(Goal):
    pair: str
    measure: Measure  # ratio: per-core throughput subject / baseline; cost: 1 − that ratio
    concurrency: int = 64  # the targets are at c=64; runs at other concurrencies are shown, not judged

    def value(self, sample: PairedSample) -> float:
        return sample.per_core_ratio if self.measure == "ratio" else 1 - sample.per_core_ratio


PAIRED_TARGETS: tuple[PairedTarget, ...] = (
    PairedTarget("side by side, tabular, c=64: gatewatch (logging on) / naive FastAPI, per-core throughput", 2.0,
                 True, "×", "naive", "ratio"),
    PairedTarget("side by side, tabular, c=64: throughput lost to logging, per core", 0.10, False, "%",
                 "logging", "cost"),
    PairedTarget("side by side, MLP, c=64: batching on / off, per-core throughput", 2.0, True, "×",
                 "batching", "ratio"),
)


def evaluate_paired(samples: Sequence[PairedSample]) -> list[TargetOutcome]:
    outcomes = []
    for target in PAIRED_TARGETS:
        values = [target.value(s) for s in samples
                  if s.pair == target.pair and s.concurrency == target.concurrency and _clean(s)]
        outcomes.append(TargetOutcome(target, [v for v in values if not math.isnan(v)]))
    return outcomes


def _clean(sample: PairedSample) -> bool:
    """A run with errors measured error paths, not the servers: it counts in the table, not in the targets."""
    return not sample.subject.errors and not sample.baseline.errors


def pairs_for(variants: Sequence[str], models: Sequence[str]) -> list[Pair]:
    return [p for p in PAIRS if p.subject in variants and p.baseline in variants and p.model in models]


@dataclass(frozen=True)
class PairRun:
    pair: Pair
    subject: tuple[ManagedServer, HttpTarget]
    baseline: tuple[ManagedServer, HttpTarget]


def measure_pair(run: PairRun, concurrency: int, rep: int, duration: float, warmup: float, max_requests: int,
                 driver: Driver, gate: QuietGate | None) -> PairedSample:
    """Warm both servers up together, then load both for `duration` and read each one's CPU time."""
    background, waited = gate.wait() if gate else (math.nan, 0.0)
    sides = (run.subject, run.baseline)
    _together(sides, LoadSpec(concurrency, warmup, max_requests), driver)
    before = [server.cpu_seconds() for server, _ in sides]
    results = _together(sides, LoadSpec(concurrency, duration, max_requests), driver)
    after = [server.cpu_seconds() for server, _ in sides]
    subject, baseline = (_side(result, end - start) for result, start, end in zip(results, before, after,
                                                                                   strict=True))
    return PairedSample(run.pair.key, concurrency, rep, subject, baseline, background, waited)


def _together(sides: Sequence[tuple[ManagedServer, HttpTarget]], spec: LoadSpec, driver: Driver) -> list[LoadResult]:
    """One generator per server, started at the same moment; waits for both."""
    with ThreadPoolExecutor(len(sides), thread_name_prefix="paired-load") as pool:
        futures = [pool.submit(drive, target, spec, driver) for _, target in sides]
        return [future.result() for future in futures]


def _side(result: LoadResult, cpu_seconds: float) -> Side:
    per_request = cpu_seconds / result.requests * 1e6 if result.requests else math.nan
    return Side(result.requests, result.rps, per_request, result.p50_ms, result.p99_ms, dict(result.errors))


def paired_lines(samples: Sequence[PairedSample], labels: dict[str, str]) -> list[str]:
    if not samples:
        return []
    lines = [
        "## Side by side: two servers sharing the server core, loaded at once", "",
        "Both servers of a pair run on the same pinned core and are loaded together by one generator each, so "
        "both see the same machine noise; each is CPU-bound, and the per-core ratio is the baseline's CPU time "
        "per request over the subject's. Absolute figures are higher than above (two processes share one core "
        "and its caches); the ratios are the point.", "",
        "| pair | conc. | subject req/s | baseline req/s | subject CPU µs/req | baseline CPU µs/req "
        "| per-core throughput, subject / baseline | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for pair in PAIRS:
        for concurrency in sorted({s.concurrency for s in samples if s.pair == pair.key}):
            group = [s for s in samples if s.pair == pair.key and s.concurrency == concurrency]
            errors = sum(sum(s.subject.errors.values()) + sum(s.baseline.errors.values()) for s in group)
            lines.append(
                f"| {labels.get(pair.subject, pair.subject)} vs {labels.get(pair.baseline, pair.baseline)} "
                f"({pair.model}) | {concurrency} | {_spread([s.subject.rps for s in group], '{:,.0f}')} "
                f"| {_spread([s.baseline.rps for s in group], '{:,.0f}')} "
                f"| {_spread([s.subject.cpu_us_per_request for s in group], '{:,.1f}')} "
                f"| {_spread([s.baseline.cpu_us_per_request for s in group], '{:,.1f}')} "
                f"| {_spread([s.per_core_ratio for s in group], '{:.2f}×')} | {errors} |"
            )
    return [*lines, ""]


def _spread(values: Sequence[float], fmt: str) -> str:
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return "—"
    return f"{fmt.format(median(kept))} ({fmt.format(min(kept))} – {fmt.format(max(kept))})"
