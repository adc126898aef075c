"""Pick the load driver: wrk when it is installed and can do the job (closed loop), else the built-in one."""

from __future__ import annotations

from typing import Literal

from loadtests.generator import Progress, run_load
from loadtests.result import LoadResult, LoadSpec
from loadtests.target import HttpTarget
from loadtests.wrk import run_wrk, wrk_binary

Driver = Literal["auto", "wrk", "builtin"]


def resolve_driver(driver: Driver, spec: LoadSpec) -> Literal["wrk", "builtin"]:
    if driver == "builtin":
        return "builtin"
    if driver == "wrk":
        if spec.rate is not None:
            raise ValueError("wrk 4 has no rate control: open-loop runs need --driver builtin (or auto)")
        if wrk_binary() is None:
            raise ValueError("wrk is not installed (apt-get install wrk); use --driver builtin")
        return "wrk"
    return "wrk" if spec.rate is None and wrk_binary() is not None else "builtin"


def drive(target: HttpTarget, spec: LoadSpec, driver: Driver = "auto", threads: int = 1,
          progress: Progress | None = None) -> LoadResult:
    """One bounded run against a loopback target with the chosen driver."""
    if resolve_driver(driver, spec) == "wrk":
        return run_wrk(target, spec, threads, progress)
    return run_load(target, spec, progress)
