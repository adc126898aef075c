"""A few-seconds smoke run of the benchmark suite: real servers, tiny durations; the report and plots appear."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from rich.console import Console

from loadtests.paired import PairedSample
from loadtests.suite import SuiteOptions, plan, run_suite
from tests.conftest import redis_servers_running_in


def test_plan_interleaves_servers_and_limits_secondary_rows_to_key_concurrencies() -> None:
    cells = plan(SuiteOptions(concurrencies=(1, 8), key_concurrencies=(1,)))
    at_8 = {(c.variant, c.model, c.body) for c in cells if c.concurrency == 8}
    assert ("gatewatch", "tabular", "json") in at_8
    assert ("gatewatch", "tabular", "binary") not in at_8  # binary only at the key concurrencies
    assert ("gatewatch-nolog", "tabular", "json") not in at_8
    assert all(c.body == "json" for c in cells if c.variant == "naive")  # it speaks JSON only


@pytest.mark.slow
def test_suite_smoke_writes_report_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "bench" / "REPORT.md"
    options = SuiteOptions(
        duration=0.2, warmup=0.05, runs=1, concurrencies=(1, 4), key_concurrencies=(1, 4), models=("tabular",),
        bodies=("json", "binary"), variants=("gatewatch", "naive", "bare", "gatewatch-shadow", "gatewatch-plain"),
        driver="builtin", quiet_gate=False, inprocess_seconds=0.05, out=out,
    )
    outcome = run_suite(options, Console(quiet=True))
    report = out.read_text()
    for plot in ("REPORT-throughput.png", "REPORT-latency-cdf.png"):
        assert (out.parent / plot).read_bytes().startswith(b"\x89PNG")
        assert f"({plot})" in report
    assert out.with_suffix(".json").exists()
    rows = [line for line in report.splitlines() if line.startswith("| gatewatch |")]
    assert len(rows) == 4  # json and binary, c=1 and c=4
    for label in ("naive FastAPI + pydantic + onnxruntime", "bare uvicorn ASGI (HTTP ceiling)",
                  "gatewatch endpoint, 100 % shadow"):
        assert f"| {label} |" in report
    for row in rows:
        req_s = float(row.split("|")[3].split()[0].replace(",", ""))
        p50 = float(row.split("|")[4].split()[0])
        assert req_s > 0 and p50 > 0
    assert all(s.errors == {} and s.requests > 0 for s in outcome.samples)
    # Targets are computed, and those without their rows say so rather than pass.
    assert re.search(r"\| tabular, c=1: gatewatch p50 − naive FastAPI p50 \| ≤ 0.3 ms \| [+-][\d.]+ ms", report)
    assert "| MLP, c=64: batching on / off throughput | ≥ 2× | not measured | — not measured |" in report
    _check_side_by_side(outcome.paired, report)
    assert redis_servers_running_in("gatewatch-suite-") == []  # gatewatch's embedded Redis went down with it


def _check_side_by_side(paired: list[PairedSample], report: str) -> None:
    """gatewatch and naive were both chosen: that pair ran once, at once, at the highest key concurrency."""
    assert [(s.pair, s.concurrency) for s in paired] == [("naive", 4)]
    sample = paired[0]
    for side in (sample.subject, sample.baseline):
        assert side.requests > 0 and side.errors == {} and side.cpu_us_per_request > 0
    assert sample.per_core_ratio == pytest.approx(
        sample.baseline.cpu_us_per_request / sample.subject.cpu_us_per_request
    )
    row = next(line for line in report.splitlines() if line.startswith("| gatewatch vs naive FastAPI"))
    assert f"| {sample.per_core_ratio:.2f}× ({sample.per_core_ratio:.2f}× – {sample.per_core_ratio:.2f}×) |" in row
    # The pair's target is judged at c=64 only: a c=4 smoke run shows the row but does not pass or fail it.
    assert ("| side by side, tabular, c=64: gatewatch (logging on) / naive FastAPI, per-core throughput | ≥ 2× "
            "| not measured | — not measured |") in report
