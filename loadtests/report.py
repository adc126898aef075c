"""The suite's Markdown report: where and how it ran, the targets (computed), results, ratios, plots."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING

from loadtests import workloads as w
from loadtests.generator import event_loop_name
from loadtests.machine import QUIET_CPU, CpuPlan, cpu_model, loadavg, source, versions
from loadtests.measure import Sample
from loadtests.paired import PairedSample, evaluate_paired, paired_lines
from loadtests.profiling import Profile, profile_lines
from loadtests.targets import evaluate
from loadtests.wrk import wrk_binary

if TYPE_CHECKING:
    from loadtests.suite import SuiteOptions

SATURATED = 0.9  # a CPU share above this means that side was the bottleneck


@dataclass(frozen=True)
class Environment:
    date: str
    command: str
    machine: str
    cpu_plan: str
    versions: str
    source: str
    driver: str
    loadavg_before: str
    loadavg_after: str
    check: str


def _driver_text(driver: str) -> str:
    if driver != "wrk":
        return f"built-in generator (raw asyncio streams on {event_loop_name()}, one keep-alive connection per client)"
    binary = wrk_binary() or "wrk"
    first = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout.splitlines()
    return f"{first[0] if first else 'wrk'}, 1 thread, Lua script dumping the full latency table"


def collect_environment(command: str, cpus: CpuPlan, driver: str, check: str, loadavg_before: str) -> Environment:
    machine = f"{cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, loopback only"
    return Environment(
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), command=command, machine=machine,
        cpu_plan=cpus.describe(), versions=versions(), source=source(), driver=_driver_text(driver),
        loadavg_before=loadavg_before, loadavg_after=loadavg(), check=check,
    )


def spread(values: Sequence[float], digits: int) -> str:
    return f"{median(values):,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def _errors(samples: Sequence[Sample]) -> str:
    total: Counter[str] = Counter()
    for sample in samples:
        total.update(sample.errors)
    return ", ".join(f"{k}: {v}" for k, v in sorted(total.items())) or "0"


def targets_table(samples: Sequence[Sample], paired: Sequence[PairedSample] = ()) -> list[str]:
    lines = ["| target | condition | measured: median (min – max) | met |", "|---|---|---|---|"]
    for outcome in [*evaluate(samples), *(evaluate_paired(paired) if paired else [])]:
        met = {True: "✅ yes", False: "❌ no", None: "— not measured"}[outcome.met]
        lines.append(f"| {outcome.target.text} | {outcome.target.condition} | {outcome.summary()} | {met} |")
    return lines


def results_table(samples: Sequence[Sample], labels: dict[str, str], order: Sequence[str]) -> list[str]:
    lines = [
        "| server | conc. | req/s | p50 ms | p99 ms | p99.9 ms | errors | server CPU µs/req | server CPU "
        "| generator CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[int, str], list[Sample]] = defaultdict(list)
    for s in samples:
        groups[(s.concurrency, s.variant)].append(s)
    for concurrency in sorted({c for c, _ in groups}):
        for variant in order:
            group = groups.get((concurrency, variant))
            if not group:
                continue
            gen = median(s.generator_cpu for s in group)
            flag = " ⚠ generator-bound" if gen > SATURATED else ""
            lines.append(
                f"| {labels[variant]} | {concurrency} | {spread([s.rps for s in group], 0)} "
                f"| {spread([s.p50_ms for s in group], 3)} | {spread([s.p99_ms for s in group], 3)} "
                f"| {spread([s.p999_ms for s in group], 3)} | {_errors(group)} "
                f"| {spread([s.server_cpu_us_per_request for s in group], 0)} "
                f"| {median(s.server_cpu for s in group):.0%} | {gen:.0%}{flag} |"
            )
    return lines


def results_sections(samples: Sequence[Sample], options: SuiteOptions) -> list[str]:
    from loadtests.suite import LABELS, VARIANT_KEYS

    lines: list[str] = []
    for model in options.models:
        for body in options.bodies:
            chosen = [s for s in samples if s.model == model and s.body == body]
            if not chosen:
                continue
            note = " (the naive app speaks JSON only, so it has no row here)" if body == "binary" else ""
            lines += [f"### {model}, {body} body{note}", "", *results_table(chosen, LABELS, VARIANT_KEYS), ""]
    return lines


def inprocess_table(results: Sequence[w.InProcessResult]) -> list[str]:
    lines = ["| model | rows per call | µs per call | calls/s | rows/s |", "|---|---:|---:|---:|---:|"]
    for r in results:
        per_call = r.median_us
        lines.append(f"| {r.model} | {r.rows} | {spread(r.per_call_us, 1)} | {1e6 / per_call:,.0f} "
                     f"| {r.rows * 1e6 / per_call:,.0f} |")
    return lines


def background_note(samples: Sequence[Sample]) -> str:
    probed = [s for s in samples if s.background_before == s.background_before]  # NaN: gate was off
    if not probed:
        return "The quiet-machine gate was off: runs started without checking the machine's background load."
    busy = [s for s in probed if s.background_before > QUIET_CPU]
    waited = sum(s.quiet_wait_s for s in probed)
    text = (f"Each run was held back (boundedly) while more than {QUIET_CPU:.0%} of a CPU was busy elsewhere; "
            f"{waited:.0f} s went to probing and waiting. ")
    if not busy:
        return text + "Every run started on a quiet machine."
    return text + f"{len(busy)} of {len(probed)} runs started with background load anyway."


def render_report(options: SuiteOptions, env: Environment, samples: Sequence[Sample],
                  inprocess: Sequence[w.InProcessResult], plots: Sequence[Path], profile: Profile | None,
                  paired: Sequence[PairedSample] = ()) -> str:
    from loadtests.suite import LABELS

    o = options
    models = "; ".join(f"**{m}**: {w.MODEL_DESCRIPTION[m]}" for m in o.models)
    lines = [
        f"# {o.title}", "",
        f"- Date: {env.date}",
        f"- Command: `{env.command}`",
        f"- Machine: {env.machine}",
        f"- CPU pinning: {env.cpu_plan}",
        f"- Load average before / after: {env.loadavg_before} / {env.loadavg_after}",
        f"- Versions: {env.versions}",
        f"- Code: {env.source}",
        f"- Load driver: {env.driver}; closed loop, per run {o.warmup:g} s warm-up then {o.duration:g} s measured "
        f"(or {o.max_requests:,} requests); {o.runs} runs per cell, servers interleaved within each run",
        f"- Models: {models}; onnxruntime CPU, 1 intra-op thread everywhere",
        "- Requests: one row, `POST /v2/models/<name>/infer`; JSON bodies, and binary bodies (V2 binary tensor "
        "extension: JSON header + raw FP32 bytes, `Inference-Header-Content-Length`, binary outputs requested). "
        "The naive FastAPI app speaks JSON only. Logging on = gatewatch's defaults (every request to a Redis "
        "stream, defaults otherwise) into one Redis server that runs beside the generator, on its CPU, as the separate "
        "service it is in production (on the server's pinned core, a saturated gateway starved it of CPU for "
        "seconds); shadow = an endpoint over tabular v1 with a `shadow:` entry to tabular v2, "
        "`sample: 1.0`, against the same endpoint without it; batching off = `GATEWATCH_MAX_BATCH_SIZE=1`.",
        f"- Sanity check: {env.check}",
        "", "## Targets (issue #7), each computed within one run, median over runs", "",
        *targets_table(samples, paired), "",
        f"## Results: median of {o.runs} runs (min–max)", "",
        *results_sections(samples, o),
        "*server CPU µs/req*: the server process's CPU time (all threads) per answered request, the figure that "
        "other load on the machine disturbs least. CPU columns are CPU-seconds per wall second (100% = one core). "
        "A generator near 100% means that row measures the generator; the raw-server row is its ceiling.", "",
        background_note(samples), "",
        *paired_lines(paired, LABELS),
        "## onnxruntime called directly (session.run in a loop, in the generator's process)", "",
        *inprocess_table(inprocess), "",
        "## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], "",
        *profile_lines(profile, o.profile_seconds > 0),
    ]
    return "\n".join(lines)
