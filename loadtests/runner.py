"""`gatewatch loadtest run`: one bounded load run at a loopback URL, with a progress bar and a percentile table."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loadtests.drivers import Driver, drive, resolve_driver
from loadtests.generator import Progress as ProgressCallback
from loadtests.result import LoadResult, LoadSpec
from loadtests.servers import ServerSpec, running_servers
from loadtests.target import HttpTarget, encode_request, parse_url

PERCENTILES = (50.0, 90.0, 99.0, 99.9, 99.99)


@dataclass(frozen=True)
class RunRequest:
    url: str
    data: str | None
    headers: list[str]
    method: str | None
    concurrency: int
    rate: float | None
    duration: float
    max_requests: int
    expect: int
    driver: str
    ceiling: bool

    def target(self) -> HttpTarget:
        host, port, path = parse_url(self.url)
        body = None
        if self.data is not None:
            body = Path(self.data[1:]).read_bytes() if self.data.startswith("@") else self.data.encode()
        return encode_request(host, port, path, body, self.method, parse_headers(self.headers), self.expect)

    def spec(self) -> LoadSpec:
        return LoadSpec(self.concurrency, self.duration, self.max_requests, self.rate)

    def driver_choice(self) -> Driver:
        if self.driver not in ("auto", "wrk", "builtin"):
            raise ValueError(f"--driver must be auto, wrk or builtin, not {self.driver!r}")
        return self.driver  # type: ignore[return-value]


def parse_headers(lines: list[str]) -> dict[str, str]:
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"a header is 'Name: value', not {line!r}")
        headers[name.strip()] = value.strip()
    return headers


def _with_bar(console: Console, label: str, spec: LoadSpec,
              run: Callable[[ProgressCallback], LoadResult]) -> LoadResult:
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[done]}"),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=spec.duration, done="")

        def update(elapsed: float, completed: int | None) -> None:
            done = f"{completed:,} responses" if completed is not None else ""
            progress.update(task, completed=min(elapsed, spec.duration), done=done)

        return run(update)


def result_table(title: str, result: LoadResult) -> Table:
    """One metric per line, so it stays readable in a narrow terminal."""
    h = result.histogram
    rows = [("requests", f"{result.requests:,} in {result.seconds:.2f} s"), ("req/s", f"{result.rps:,.0f}"),
            *((f"p{p:g}", f"{h.percentile_ms(p):.3f} ms") for p in PERCENTILES), ("max", f"{h.max_ms:.3f} ms"),
            ("statuses", ", ".join(f"{k}: {v:,}" for k, v in sorted(result.statuses.items())) or "-"),
            ("errors", ", ".join(f"{k}: {v:,}" for k, v in sorted(result.errors.items())) or "0"),
            ("generator CPU", f"{result.generator_cpu:.0%} of a core ({result.driver})")]
    table = Table(title=title, show_header=False)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in rows:
        table.add_row(name, value)
    return table


def measure_ceiling(console: Console, spec: LoadSpec, driver: Driver) -> LoadResult:
    """The same driver and load against the trivial raw server: the most this generator can measure here."""
    with tempfile.TemporaryDirectory(prefix="gatewatch-ceiling-") as tmp:
        specs = {"raw": ServerSpec([sys.executable, "-m", "loadtests.baselines", "raw"])}
        with running_servers(specs, Path(tmp), cpus=None) as servers:
            target = encode_request("127.0.0.1", servers["raw"].port, "/", b"{}")
            return _with_bar(console, "ceiling (raw server)", spec,
                             lambda update: drive(target, spec, driver, progress=update))


def run_command(request: RunRequest, console: Console | None = None) -> LoadResult:
    console = console or Console()
    target, spec, driver = request.target(), request.spec(), request.driver_choice()
    chosen = resolve_driver(driver, spec)
    mode = "closed loop" if spec.rate is None else f"open loop at {spec.rate:g} req/s"
    console.print(f"{target.method} {target.url}: {mode}, {spec.concurrency} connections, "
                  f"≤ {spec.duration:g} s and ≤ {spec.max_requests:,} requests, driver {chosen}")
    result = _with_bar(console, "load", spec, lambda update: drive(target, spec, driver, progress=update))
    console.print(result_table(f"{target.method} {target.url}", result))
    if result.send_lag is not None:
        console.print(f"open-loop send lag (actual − intended send time): p50 {result.send_lag.percentile_ms(50):.3f} "
                      f"ms, p99 {result.send_lag.percentile_ms(99):.3f} ms (latencies count from the intended time)")
    if request.ceiling:
        ceiling = measure_ceiling(console, spec, driver)
        console.print(result_table("generator ceiling: same load against a trivial raw server", ceiling))
    return result
