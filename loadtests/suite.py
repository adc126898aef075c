"""`gatewatch loadtest suite`: every server started here on free loopback ports, measured side by side.

Rows (variants) × models × bodies × concurrencies, repeated `runs` times. Within a repetition every server is
measured back to back for the same model, body and concurrency, so slow drift of the machine spreads over all
of them, and ratios are taken inside one repetition. Writes a Markdown report, its raw numbers as JSON, and
PNG plots beside it.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from loadtests import workloads as w
from loadtests.drivers import Driver, resolve_driver
from loadtests.machine import QuietGate, loadavg, plan_cpus
from loadtests.measure import Cell, RunSettings, Sample, measure_once
from loadtests.paired import PairedSample, PairRun, measure_pair, pairs_for
from loadtests.plots import require_matplotlib, write_plots
from loadtests.profiling import Profile, profile_under_load
from loadtests.report import Environment, collect_environment, render_report
from loadtests.result import LoadSpec
from loadtests.servers import ManagedServer, redis_service, running_servers
from loadtests.target import HttpTarget, encode_request


@dataclass(frozen=True)
class Variant:
    """A row of the report: which server, for which models and bodies, over which concurrencies."""

    key: str
    label: str
    server: str
    models: tuple[str, ...]
    bodies: tuple[w.Body, ...]
    sweep: bool  # JSON bodies over every concurrency (for the throughput plot), else only the key ones
    endpoint: str | None = None  # call this endpoint instead of the model by name


BOTH_MODELS = (w.TABULAR, w.MLP)
VARIANTS: tuple[Variant, ...] = (
    Variant("raw", "raw asyncio server (generator ceiling)", w.RAW, (w.TABULAR,), ("json",), True),
    Variant("bare", "bare uvicorn ASGI (HTTP ceiling)", w.BARE, BOTH_MODELS, ("json", "binary"), True),
    Variant("naive", "naive FastAPI + pydantic + onnxruntime", w.NAIVE, BOTH_MODELS, ("json",), True),
    Variant("gatewatch", "gatewatch", w.GATEWATCH, BOTH_MODELS, ("json", "binary"), True),
    Variant("gatewatch-nolog", "gatewatch, logging off", w.GATEWATCH_NOLOG, (w.TABULAR,), ("json",), False),
    Variant("gatewatch-plain", "gatewatch endpoint, no shadow", w.GATEWATCH, (w.TABULAR,), ("json",), False,
            w.PLAIN_ENDPOINT),
    Variant("gatewatch-shadow", "gatewatch endpoint, 100 % shadow", w.GATEWATCH, (w.TABULAR,), ("json",), False,
            w.SHADOWED_ENDPOINT),
    Variant("gatewatch-nobatch", "gatewatch, batching off", w.GATEWATCH_NOBATCH, (w.MLP,), ("json",), True),
)
VARIANT_KEYS = tuple(v.key for v in VARIANTS)
LABELS = {v.key: v.label for v in VARIANTS}


@dataclass(frozen=True)
class SuiteOptions:
    duration: float = 5.0
    warmup: float = 1.0
    runs: int = 3
    concurrencies: tuple[int, ...] = (1, 8, 64, 128)
    key_concurrencies: tuple[int, ...] = (1, 64)  # where every variant is measured (the targets' points)
    models: tuple[str, ...] = BOTH_MODELS
    bodies: tuple[w.Body, ...] = ("json", "binary")
    variants: tuple[str, ...] = VARIANT_KEYS
    driver: Driver = "auto"
    pin: bool = True
    quiet_gate: bool = True
    inprocess_seconds: float = 1.0
    profile_seconds: float = 0.0  # > 0: py-spy gatewatch at the highest concurrency after the measurements
    paired: bool = True  # also measure the key comparisons side by side (paired.py), at the highest key concurrency
    max_requests: int = 2_000_000  # a second bound besides `duration`, far above what one core can serve
    out: Path = Path("bench/REPORT.md")
    title: str = "gatewatch benchmark suite"
    command: str = "gatewatch loadtest suite"

    def __post_init__(self) -> None:
        unknown = set(self.variants) - set(VARIANT_KEYS)
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANT_KEYS)}")
        if self.runs < 1 or self.duration <= 0 or self.warmup <= 0:
            raise ValueError("runs, duration and warmup must be positive")


@dataclass
class SuiteOutcome:
    report: str
    samples: list[Sample]
    inprocess: list[w.InProcessResult]
    plots: list[Path]
    profile: Profile | None = field(default=None)
    paired: list[PairedSample] = field(default_factory=list)


def plan(options: SuiteOptions) -> list[Cell]:
    """The cells of one repetition, servers interleaved within each (model, body, concurrency)."""
    cells = []
    chosen = [v for v in VARIANTS if v.key in options.variants]
    for model in options.models:
        for body in options.bodies:
            for concurrency in sorted(set(options.concurrencies) | set(options.key_concurrencies)):
                for v in chosen:
                    sweep = v.sweep and body == "json" and concurrency in options.concurrencies
                    if model in v.models and body in v.bodies and (sweep or concurrency in options.key_concurrencies):
                        cells.append(Cell(v.key, model, body, concurrency))
    return cells


def _variant(key: str) -> Variant:
    return next(v for v in VARIANTS if v.key == key)


def targets_for(cells: list[Cell], servers: dict[str, ManagedServer]) -> dict[tuple[str, str, str], HttpTarget]:
    """One pre-encoded request per (variant, model, body)."""
    targets = {}
    for key, model, body in {(c.variant, c.model, c.body) for c in cells}:
        variant = _variant(key)
        payload, headers = w.request_for(model, body)
        path = w.infer_path(variant.endpoint or model)
        targets[(key, model, body)] = encode_request("127.0.0.1", servers[variant.server].port, path, payload,
                                                     headers=headers)
    return targets


def smoke_check(targets: dict[tuple[str, str, str], HttpTarget]) -> None:
    """Every request must succeed once before anything is timed, or the numbers would measure errors."""
    from loadtests.generator import run_load

    for key, target in sorted(targets.items()):
        result = run_load(target, LoadSpec(1, 30.0, max_requests=1))
        if result.errors or result.requests != 1:
            raise RuntimeError(f"{key}: {target.method} {target.url} failed: {result.statuses or result.errors}")


Tick = Callable[[str], None]


def measure_matrix(servers: dict[str, ManagedServer], cells: list[Cell], options: SuiteOptions,
                   tick: Tick, gate: QuietGate | None) -> list[Sample]:
    targets = targets_for(cells, servers)
    smoke_check(targets)
    settings = RunSettings(options.duration, options.warmup, options.max_requests, options.driver)
    samples = []
    for rep in range(options.runs):
        for cell in cells:
            server = servers[_variant(cell.variant).server]
            sample = measure_once(server, targets[(cell.variant, cell.model, cell.body)], cell, rep, settings, gate)
            samples.append(sample)
            tick(f"run {rep + 1} {cell.variant} {cell.model} {cell.body} c={cell.concurrency}: "
                 f"{sample.rps:,.0f} req/s p50 {sample.p50_ms:.3f} ms p99 {sample.p99_ms:.3f} ms")
    return samples


def paired_runs(servers: dict[str, ManagedServer], options: SuiteOptions) -> list[PairRun]:
    if not options.paired:
        return []
    concurrency = max(options.key_concurrencies)
    runs = []
    for pair in pairs_for(options.variants, options.models):
        cells = [Cell(key, pair.model, "json", concurrency) for key in (pair.subject, pair.baseline)]
        targets = targets_for(cells, servers)
        subject, baseline = ((servers[_variant(c.variant).server], targets[(c.variant, c.model, c.body)])
                             for c in cells)
        runs.append(PairRun(pair, subject, baseline))
    return runs


def measure_paired(runs: list[PairRun], options: SuiteOptions, tick: Tick, gate: QuietGate | None
                   ) -> list[PairedSample]:
    concurrency = max(options.key_concurrencies)
    samples = []
    for rep in range(options.runs):
        for run in runs:
            sample = measure_pair(run, concurrency, rep, options.duration, options.warmup, options.max_requests,
                                  options.driver, gate)
            samples.append(sample)
            tick(f"run {rep + 1} side by side {run.pair.key} c={concurrency}: "
                 f"{sample.subject.cpu_us_per_request:,.1f} vs {sample.baseline.cpu_us_per_request:,.1f} µs/req, "
                 f"per-core ratio {sample.per_core_ratio:.2f}×")
    return samples


def measure_inprocess(models: dict[str, Path], options: SuiteOptions) -> list[w.InProcessResult]:
    return [w.measure_inprocess(model, models[model], rows, options.inprocess_seconds, options.runs)
            for model in options.models for rows in (1, 32)]


@contextmanager
def pinned(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run this process (the generator, wrk, in-process onnxruntime) on its own CPUs for the duration."""
    original = os.sched_getaffinity(0)
    try:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        yield
    finally:
        os.sched_setaffinity(0, original)


def _profile(servers: dict[str, ManagedServer], options: SuiteOptions, workdir: Path) -> Profile | None:
    if options.profile_seconds <= 0 or w.GATEWATCH not in servers:
        return None
    model = options.models[0]
    payload, headers = w.request_for(model, "json")
    target = encode_request("127.0.0.1", servers[w.GATEWATCH].port, w.infer_path(model), payload, headers=headers)
    concurrency = max(options.key_concurrencies)
    return profile_under_load(servers[w.GATEWATCH], target, concurrency, options.profile_seconds, workdir)


@contextmanager
def terminate_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C (finally blocks run, so every server we started is stopped)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_now(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_suite(options: SuiteOptions, console: Console | None = None) -> SuiteOutcome:
    with terminate_as_exit():
        return _run_suite(options, console)


def _run_suite(options: SuiteOptions, console: Console | None) -> SuiteOutcome:
    require_matplotlib()  # before minutes of measurements, not after
    console = console or Console(stderr=True)
    cells = plan(options)
    if not cells:
        raise ValueError("nothing to measure: no variant serves the chosen models and bodies")
    cpus = plan_cpus(options.pin)
    driver = resolve_driver(options.driver, LoadSpec())
    loadavg_before = loadavg()
    with tempfile.TemporaryDirectory(prefix="gatewatch-suite-") as tmp:
        workdir = Path(tmp)
        models = w.build_registry(workdir / "models")
        names = {_variant(c.variant).server for c in cells}
        with redis_service(workdir, cpus.generator) as redis_url:
            specs = w.server_specs(names, workdir, workdir / "models", models, redis_url)
            with running_servers(specs, workdir, cpus.server) as servers, pinned(cpus.generator):
                checks, inprocess, samples, paired, profile = _measure(servers, models, cells, options, console,
                                                                       workdir)
    env = collect_environment(options.command, cpus, driver, "; ".join(checks), loadavg_before)
    return write_outputs(options, env, samples, inprocess, profile, paired)


def _measure(servers: dict[str, ManagedServer], models: dict[str, Path], cells: list[Cell], options: SuiteOptions,
             console: Console, workdir: Path
             ) -> tuple[list[str], list[w.InProcessResult], list[Sample], list[PairedSample], Profile | None]:
    checks = [w.check_answers(servers, model) for model in options.models]
    inprocess = measure_inprocess(models, options)
    pairs = paired_runs(servers, options)
    gate = QuietGate() if options.quiet_gate else None
    with _progress(console) as progress:
        task = progress.add_task("suite", total=(len(cells) + len(pairs)) * options.runs)

        def tick(line: str) -> None:
            progress.console.print(line, highlight=False)
            progress.advance(task)

        samples = measure_matrix(servers, cells, options, tick, gate)
        paired = measure_paired(pairs, options, tick, gate)
    return checks, inprocess, samples, paired, _profile(servers, options, workdir)


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True)


def write_outputs(options: SuiteOptions, env: Environment, samples: list[Sample],
                  inprocess: list[w.InProcessResult], profile: Profile | None,
                  paired: list[PairedSample]) -> SuiteOutcome:
    out = options.out
    out.parent.mkdir(parents=True, exist_ok=True)
    plots = write_plots(samples, options, out.parent, out.stem)
    report = render_report(options, env, samples, inprocess, plots, profile, paired)
    out.write_text(report)
    raw = {"options": {k: str(v) for k, v in asdict(options).items()}, "environment": asdict(env),
           "samples": [asdict(s) for s in samples], "paired": [asdict(s) for s in paired],
           "inprocess": [asdict(r) for r in inprocess], "profile": asdict(profile) if profile else None}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    return SuiteOutcome(report, samples, inprocess, plots, profile, paired)
