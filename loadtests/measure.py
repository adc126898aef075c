"""One measured run of one cell (a server, a request, a concurrency), with the CPU it cost on each side."""

from __future__ import annotations

import math
from dataclasses import dataclass

from loadtests.drivers import Driver, drive
from loadtests.histogram import CDF_PERCENTILES
from loadtests.machine import QuietGate, busy_cores, cpu_times
from loadtests.result import LoadSpec
from loadtests.servers import ManagedServer
from loadtests.target import HttpTarget


@dataclass(frozen=True)
class Cell:
    """What one run measures: a row of the report (variant, model, body) at one concurrency."""

    variant: str
    model: str
    body: str
    concurrency: int


@dataclass(frozen=True)
class Sample:
    """One measured run of one cell."""

    variant: str
    model: str
    body: str
    concurrency: int
    rep: int
    driver: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    statuses: dict[str, int]
    errors: dict[str, int]
    server_cpu: float  # CPUs' worth used by the server process (all its threads)
    server_cpu_us_per_request: float  # its CPU time per answered request: barely moved by other load
    generator_cpu: float  # CPUs' worth used by the generator
    other_cpu: float  # CPUs' worth used by everything else: the server's helpers, other processes, the kernel
    background_before: float  # CPUs' worth busy on the machine just before the run (NaN: not probed)
    quiet_wait_s: float  # how long the run waited for the machine to quieten
    cdf_ms: list[float]  # latency at each of histogram.CDF_PERCENTILES

    @property
    def cell(self) -> Cell:
        return Cell(self.variant, self.model, self.body, self.concurrency)


@dataclass(frozen=True)
class RunSettings:
    duration: float
    warmup: float
    max_requests: int
    driver: Driver


def measure_once(server: ManagedServer, target: HttpTarget, cell: Cell, rep: int, settings: RunSettings,
                 gate: QuietGate | None) -> Sample:
    background, waited = gate.wait() if gate else (math.nan, 0.0)
    spec = LoadSpec(cell.concurrency, settings.duration, settings.max_requests)
    drive(target, LoadSpec(cell.concurrency, settings.warmup, settings.max_requests), settings.driver)
    process_before, machine_before = server.cpu_seconds(), cpu_times()
    result = drive(target, spec, settings.driver)
    server_cpu = (server.cpu_seconds() - process_before) / result.seconds
    other_cpu = busy_cores(machine_before, cpu_times()) - server_cpu - result.generator_cpu
    h = result.histogram
    return Sample(
        variant=cell.variant, model=cell.model, body=cell.body, concurrency=cell.concurrency, rep=rep,
        driver=result.driver, requests=result.requests, seconds=result.seconds, rps=result.rps,
        p50_ms=h.percentile_ms(50), p90_ms=h.percentile_ms(90), p99_ms=h.percentile_ms(99),
        p999_ms=h.percentile_ms(99.9), max_ms=h.max_ms, statuses=result.statuses, errors=result.errors,
        server_cpu=server_cpu, server_cpu_us_per_request=server_cpu * result.seconds / max(result.requests, 1) * 1e6,
        generator_cpu=result.generator_cpu, other_cpu=other_cpu, background_before=background,
        quiet_wait_s=waited, cdf_ms=h.percentiles_ms(CDF_PERCENTILES),
    )
