"""The machine a benchmark runs on: CPU pinning, how busy it is, and what to say about it in a report."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

QUIET_CPU = 0.3  # background load (CPUs' worth) under which a run may start
QUIET_PROBE_S = 0.5
QUIET_MAX_WAIT_S = 20.0  # per run: after this the run starts anyway, and the report says so
QUIET_TOTAL_WAIT_S = 90.0  # per benchmark, so a machine that never quietens cannot stretch it much
REPO_ROOT = Path(__file__).resolve().parent.parent

@dataclass(frozen=True)
class CpuPlan:
    """Which CPUs the servers and the generator use; None = not pinned (fewer than 2 CPUs, or --no-pin)."""

    server: frozenset[int] | None
    generator: frozenset[int] | None

    def describe(self) -> str:
        if self.server is None or self.generator is None:
            return "not pinned (servers and generator share all CPUs)"
        return (f"servers (and everything they spawn) pinned to CPU {sorted(self.server)}, "
                f"load generator and in-process onnxruntime to CPU {sorted(self.generator)}")


def plan_cpus(pin: bool) -> CpuPlan:
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return CpuPlan(None, None)
    # One core each: neither side can steal the other's core, so "server saturated" and "generator
    # saturated" show separately in the report's CPU columns instead of blurring into each other.
    return CpuPlan(frozenset({cpus[0]}), frozenset({cpus[1]}))


def cpu_times() -> dict[str, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies from /proc/stat; empty where /proc is missing."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return {}
    times = {}
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            numbers = [int(v) for v in values[:8]]
            idle = numbers[3] + numbers[4]  # idle + iowait
            times[name] = (sum(numbers) - idle, sum(numbers))
    return times


def busy_cores(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> float:
    """How many CPUs' worth of time the whole machine was busy between two `cpu_times()` readings."""
    busy = sum(after[cpu][0] - before[cpu][0] for cpu in after if cpu in before)
    per_cpu_total = max((after[cpu][1] - before[cpu][1] for cpu in after if cpu in before), default=0)
    return busy / per_cpu_total if per_cpu_total > 0 else float("nan")


class QuietGate:
    """Holds each run back (boundedly) until the rest of the machine is nearly idle.

    Other sessions share this machine; starting runs in a lull keeps their load out of most measurements,
    and what could not be avoided is reported rather than hidden.
    """

    def __init__(self, total_wait: float = QUIET_TOTAL_WAIT_S) -> None:
        self.remaining = total_wait

    def wait(self) -> tuple[float, float]:
        """Return (background CPUs' worth in the last probe, seconds waited)."""
        limit = min(QUIET_MAX_WAIT_S, self.remaining)
        started = time.monotonic()
        while True:
            before = cpu_times()
            time.sleep(QUIET_PROBE_S)  # the probe window itself
            background = busy_cores(before, cpu_times())
            waited = time.monotonic() - started
            if not background > QUIET_CPU or waited >= limit:
                self.remaining = max(0.0, self.remaining - waited)
                return background, waited



def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def versions() -> str:
    names = ["onnxruntime", "fastapi", "starlette", "pydantic", "uvicorn", "uvloop", "httptools", "numpy", "orjson",
             "hdrhistogram", "matplotlib"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (absent)")
    return f"Python {platform.python_version()}; " + ", ".join(found)


def source() -> str:
    """The commit measured, and whether gateway code differed from it (others edit the same tree)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "gateway", "registry_client").splitlines()
    if not dirty:
        return f"commit {commit}, gateway/ and registry_client/ clean"
    # A digest of the uncommitted state, so two reports can at least tell whether they measured the same code.
    digest = hashlib.sha256(git("diff", "HEAD", "--", "gateway", "registry_client").encode())
    for line in dirty:
        if line.startswith("??"):
            digest.update(_tree_bytes(REPO_ROOT / line[3:]))
    return (f"commit {commit} + {len(dirty)} uncommitted changes under gateway/ and registry_client/ "
            f"(working tree digest {digest.hexdigest()[:12]}; other sessions edit this tree)")


def _tree_bytes(path: Path) -> bytes:
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return b"".join(f.read_bytes() for f in files if f.is_file())


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"

