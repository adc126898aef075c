"""Serving benchmark: gatewatch vs a hand-written FastAPI app vs bare uvicorn vs onnxruntime in-process.

`python -m loadtests.bench [--duration S] [--runs N] [--out bench/REPORT-serving.md]` builds a 32-feature
tabular classifier, starts every server as a subprocess on a free loopback port, and measures them all in one
run with the same pre-encoded V2 request. Servers are interleaved within each repetition, so slow drift of the
machine (other processes, thermal, noisy neighbours) spreads over all of them instead of biasing one.
It writes a Markdown report and, beside it, the raw numbers of every run as JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from statistics import median

import httpx
import numpy as np

from loadtests import onnx_models as om
from loadtests.baselines import load_session
from loadtests.generator import HttpTarget, encode_request, event_loop_name, run_load

FEATURES = 32
MODEL = "tabular"
INFER_PATH = f"/v2/models/{MODEL}/infer"
READY_PATH = "/v2/health/ready"
GATEWATCH, NAIVE, BARE, RAW = "gatewatch", "naive", "bare", "raw"
SERVER_ORDER = (RAW, BARE, NAIVE, GATEWATCH)
SERVER_LABELS = {
    RAW: "raw asyncio server (generator ceiling)",
    BARE: "bare uvicorn ASGI, fixed JSON (HTTP ceiling)",
    NAIVE: "naive FastAPI + pydantic + onnxruntime",
    GATEWATCH: "gatewatch serve",
}
SATURATED = 0.9  # a CPU share above this means that side was the bottleneck
QUIET_CPU = 0.3  # background load (CPUs' worth) under which a run may start
QUIET_PROBE_S = 0.5
QUIET_MAX_WAIT_S = 20.0  # per run: after this the run starts anyway, and the report says so
QUIET_TOTAL_WAIT_S = 90.0  # per benchmark, so a machine that never quietens cannot stretch it much
REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BenchOptions:
    duration: float = 5.0
    runs: int = 3
    warmup: float = 1.0
    concurrencies: tuple[int, ...] = (1, 64)
    out: Path = Path("bench/REPORT-serving.md")
    pin: bool = True
    profile_seconds: float = 0.0  # > 0: py-spy the gateway at the highest concurrency after the measurements
    max_requests: int = 2_000_000  # a second bound besides `duration`, far above what one core can serve
    command: str = "python -m loadtests.bench"


# -- CPUs -----------------------------------------------------------------------------------------------


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


# -- servers --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ManagedServer:
    """A server subprocess on a loopback port, started by us and always stopped by us (by PID)."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, path: str = READY_PATH, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling the server's readiness, not waiting for time to pass
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log()}")

    def cpu_seconds(self) -> float:
        """User + system CPU of the process, all its threads included."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "; fields[0] is the state
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # graceful: lets gatewatch close what it opened
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)


def start_server(name: str, argv: list[str], log_path: Path, cpus: frozenset[int] | None = None,
                 port: int | None = None) -> ManagedServer:
    port = port or free_port()

    def pin_child() -> None:
        # Set in the child before exec, so every thread and subprocess it creates inherits the pinning.
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    with log_path.open("wb") as log:
        process = subprocess.Popen([*argv, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                   cwd=REPO_ROOT, preexec_fn=pin_child)
    return ManagedServer(name, port, process, log_path)


def server_commands(workdir: Path, registry: Path, model: Path) -> dict[str, list[str]]:
    config = workdir / "gatewatch.yaml"
    config.write_text(f"registry: {registry}\ndata_dir: {workdir / 'data'}\n")
    baseline = [sys.executable, "-m", "loadtests.baselines"]
    return {
        RAW: [*baseline, RAW],
        BARE: [*baseline, BARE],
        NAIVE: [*baseline, NAIVE, "--model", str(model)],
        # The way users start it, with every setting at its default.
        GATEWATCH: [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--config", str(config),
                    "--log-level", "warning"],
    }


@contextmanager
def running_servers(commands: dict[str, list[str]], workdir: Path,
                    cpus: frozenset[int] | None) -> Iterator[dict[str, ManagedServer]]:
    """Start every server, wait until each is ready, and terminate all of them on the way out, whatever happens."""
    with ExitStack() as stack:
        servers: dict[str, ManagedServer] = {}
        for name, argv in commands.items():
            server = start_server(name, argv, workdir / f"{name}.log", cpus)
            stack.callback(server.stop)
            servers[name] = server
        for server in servers.values():
            server.wait_ready()
        yield servers


# -- model, request, sanity check -----------------------------------------------------------------------


def build_registry(root: Path) -> Path:
    om.write_version(root, MODEL, 1, om.tabular_classifier(features=FEATURES), {"task": "classification"})
    return root / MODEL / "1" / "model.onnx"


def infer_body(seed: int = 7) -> bytes:
    row = [round(float(x), 6) for x in np.random.default_rng(seed).normal(size=FEATURES)]
    tensor = {"name": "input", "shape": [1, FEATURES], "datatype": "FP32", "data": row}
    return json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode()


def check_answers(servers: dict[str, ManagedServer], body: bytes) -> str:
    """gatewatch and the naive app must give the same answer to the same request, or nothing here compares."""
    answers = {}
    for name in (GATEWATCH, NAIVE):
        response = httpx.post(servers[name].url + INFER_PATH, content=body, timeout=10,
                              headers={"content-type": "application/json"})
        response.raise_for_status()
        answers[name] = {o["name"]: o["data"] for o in response.json()["outputs"]}
    if not np.allclose(answers[GATEWATCH]["probabilities"], answers[NAIVE]["probabilities"], atol=1e-6):
        raise RuntimeError(f"gatewatch and naive disagree: {answers}")
    found = answers[GATEWATCH]
    return f"gatewatch and naive both answer probabilities={found['probabilities']}, label={found['label']}"


# -- measurements ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InProcessResult:
    rows: int
    per_call_us: list[float]

    @property
    def median_us(self) -> float:
        return median(self.per_call_us)


def measure_inprocess(model: Path, rows: int, seconds: float, runs: int) -> InProcessResult:
    """session.run on `rows` rows in a tight loop: the floor that no server can beat."""
    session = load_session(model)
    feeds = {"input": np.random.default_rng(0).normal(size=(rows, FEATURES)).astype(np.float32)}
    for _ in range(1000):
        session.run(None, feeds)  # warm-up: the first calls allocate
    per_call_us = []
    for _ in range(runs):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            for _ in range(200):  # amortise the clock read over many calls
                session.run(None, feeds)
            calls += 200
        per_call_us.append(elapsed / calls * 1e6)
    return InProcessResult(rows, per_call_us)


@dataclass(frozen=True)
class Sample:
    """One measured run of one server at one concurrency."""

    server: str
    concurrency: int
    rep: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: dict[str, int]
    server_cpu: float  # CPUs' worth used by the server process (all its threads)
    server_cpu_us_per_request: float  # its CPU time per answered request: barely moved by other load
    generator_cpu: float  # CPUs' worth used by the generator process
    other_cpu: float  # CPUs' worth used by everything else: the server's helpers, other processes, the kernel
    background_before: float  # CPUs' worth busy on the machine just before the run (servers idle)
    quiet_wait_s: float  # how long the run waited for the machine to quieten


def measure_once(server: ManagedServer, target: HttpTarget, concurrency: int, options: BenchOptions,
                 rep: int, gate: QuietGate) -> Sample:
    background, waited = gate.wait()
    run_load(target, concurrency, options.warmup, options.max_requests)  # open connections, warm caches
    process_before, machine_before = server.cpu_seconds(), cpu_times()
    result = run_load(target, concurrency, options.duration, options.max_requests)
    server_cpu = (server.cpu_seconds() - process_before) / result.seconds
    other_cpu = busy_cores(machine_before, cpu_times()) - server_cpu - result.generator_cpu
    print(f"  run {rep + 1} {server.name:9s} {result.summary()} server_cpu={server_cpu:.0%} "
          f"other_cpu={other_cpu:.0%} background_before={background:.0%}", flush=True)
    return Sample(
        server=server.name, concurrency=concurrency, rep=rep, requests=result.requests,
        seconds=result.seconds, rps=result.rps, p50_ms=result.p50_ms, p90_ms=result.p90_ms,
        p99_ms=result.p99_ms, errors=result.errors, server_cpu=server_cpu,
        server_cpu_us_per_request=server_cpu * result.seconds / max(result.requests, 1) * 1e6,
        generator_cpu=result.generator_cpu, other_cpu=other_cpu, background_before=background,
        quiet_wait_s=waited,
    )


def run_matrix(servers: dict[str, ManagedServer], body: bytes, options: BenchOptions) -> list[Sample]:
    targets = {name: encode_request("127.0.0.1", s.port, INFER_PATH, body) for name, s in servers.items()}
    samples = []
    gate = QuietGate()
    for rep in range(options.runs):
        for concurrency in options.concurrencies:
            for name in SERVER_ORDER:
                samples.append(measure_once(servers[name], targets[name], concurrency, options, rep, gate))
    return samples


# -- profiling ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    samples: int  # on-CPU samples kept (idle thread-pool workers removed)
    idle_dropped: int
    components: list[tuple[str, float]]  # (layer, share of samples), see COMPONENTS
    self_top: list[tuple[str, float]]  # (frame, share) where the frame itself was running
    gateway_inclusive: list[tuple[str, float]]  # gatewatch's own functions, callees included
    under_load: str  # the generator's summary while profiling (slowed by the sampler)


# A sample is charged to the innermost frame that matches one of these (first match wins for that frame);
# stdlib, numpy, orjson and the like are not listed, so their time goes to whoever called them.
COMPONENTS: tuple[tuple[str, str], ...] = (
    ("onnxruntime/", "onnxruntime session.run"),
    ("redis/", "redis client (prediction log)"),
    ("gateway/payload_log/", "prediction log writer"),
    ("gateway/records.py", "prediction log records"),
    ("prometheus_client/", "Prometheus metrics"),
    ("gateway/metrics.py", "Prometheus metrics"),
    ("gateway/runtime/batcher.py", "batcher"),
    ("gateway/runtime/", "runner / model manager"),
    ("gateway/protocol/", "V2 decode / encode"),
    ("gateway/routing/", "routing"),
    ("gateway/", "gatewatch API + dataplane"),
    ("fastapi/", "FastAPI / Starlette"),
    ("starlette/", "FastAPI / Starlette"),
    ("uvicorn/", "uvicorn + httptools"),
)
EVENT_LOOP = "event loop (uvloop, native) and other"
LOOP_ROOT = "Runner.run (asyncio/runners.py)"
# py-spy's idle detection misses thread-pool workers blocked on their queue in this environment: a sample whose
# innermost frame is the worker loop itself is a worker waiting for work.
IDLE_LEAVES = ("_worker (concurrent/futures/thread.py)",)


def py_spy() -> str | None:
    beside_python = Path(sys.executable).parent / "py-spy"
    return str(beside_python) if beside_python.exists() else shutil.which("py-spy")


def profile_under_load(server: ManagedServer, target: HttpTarget, concurrency: int, seconds: float,
                       workdir: Path) -> Profile | None:
    """Sample the server with py-spy while the generator keeps it busy; None when py-spy is not installed."""
    binary = py_spy()
    if binary is None:
        return None
    output = workdir / "gatewatch.pyspy.txt"
    argv = [binary, "record", "--pid", str(server.pid), "--duration", str(max(1, round(seconds))),
            "--rate", "250", "--format", "raw", "--output", str(output)]
    sampler = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        result = run_load(target, concurrency, seconds + 1.0)  # outlasts the sampler a little
        sampler.wait(timeout=seconds + 30)
    finally:
        if sampler.poll() is None:
            sampler.kill()
            sampler.wait()
    if not output.exists():
        return None
    return summarize_stacks(output.read_text(), result.summary())


def _frame(raw: str) -> str:
    """`func (path/file.py:123)` -> `func (path/file.py)`: aggregate a function over its lines."""
    name, _, where = raw.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else raw


def component_of(frames: Sequence[str]) -> str:
    # Frames up to the event loop's runner are the process's entry point (cli, uvicorn.run), under every sample
    # of the loop thread: they say nothing about where the time goes, so matching starts below them.
    roots = [i for i, frame in enumerate(frames) if frame == LOOP_ROOT]
    below_root = frames[roots[-1] + 1 :] if roots else frames
    for frame in reversed(below_root):
        for marker, component in COMPONENTS:
            if f"({marker}" in frame:
                return component
    return EVENT_LOOP


def _parse_collapsed(collapsed: str) -> Iterator[tuple[list[str], int]]:
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if stack and count_text.isdigit():
            yield [_frame(f) for f in stack.split(";")], int(count_text)


def summarize_stacks(collapsed: str, under_load: str, top: int = 15) -> Profile:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    components: Counter[str] = Counter()
    idle = 0
    for frames, count in _parse_collapsed(collapsed):
        if frames[-1] in IDLE_LEAVES:
            idle += count
            continue
        own[frames[-1]] += count
        components[component_of(frames)] += count
        for frame in set(frames):
            inclusive[frame] += count
    total = sum(own.values())
    share = 1 / total if total else 0.0

    def shares(counter: Counter[str], keep: Callable[[str], bool] = lambda _: True) -> list[tuple[str, float]]:
        return [(name, count * share) for name, count in counter.most_common() if keep(name)][:top]

    own_code = shares(inclusive, lambda f: "(gateway/" in f and "(gateway/cli.py)" not in f)
    return Profile(total, idle, shares(components), shares(own), own_code, under_load)


# -- report ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Environment:
    date: str
    command: str
    machine: str
    cpu_plan: str
    versions: str
    source: str
    loadavg_before: str
    loadavg_after: str
    check: str
    request_bytes: int
    options: BenchOptions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _versions() -> str:
    names = ["onnxruntime", "fastapi", "starlette", "pydantic", "uvicorn", "uvloop", "httptools", "numpy", "orjson"]
    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (absent)")
    return f"Python {platform.python_version()}; " + ", ".join(found)


def _source() -> str:
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


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def collect_environment(options: BenchOptions, cpus: CpuPlan, check: str, request_bytes: int,
                        loadavg_before: str) -> Environment:
    machine = (f"{_cpu_model()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
               f"loopback only")
    return Environment(
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), command=options.command, machine=machine,
        cpu_plan=cpus.describe(), versions=_versions(), source=_source(), loadavg_before=loadavg_before,
        loadavg_after=_loadavg(), check=check, request_bytes=request_bytes, options=options,
    )


def _spread(values: Sequence[float], digits: int) -> str:
    return f"{median(values):,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def _errors(samples: Sequence[Sample]) -> str:
    total: Counter[str] = Counter()
    for sample in samples:
        total.update(sample.errors)
    return ", ".join(f"{k}: {v}" for k, v in sorted(total.items())) or "0"


def _grouped(samples: Sequence[Sample]) -> dict[tuple[int, str], list[Sample]]:
    groups: dict[tuple[int, str], list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[(sample.concurrency, sample.server)].append(sample)
    return groups


def results_table(samples: Sequence[Sample], concurrencies: Sequence[int]) -> list[str]:
    lines = [
        "| server | conc. | req/s | p50 ms | p99 ms | errors | server CPU µs/req | server CPU | generator CPU "
        "| other CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups = _grouped(samples)
    for concurrency in concurrencies:
        for name in SERVER_ORDER:
            group = groups[(concurrency, name)]
            if not group:
                continue
            gen = median(s.generator_cpu for s in group)
            flag = " ⚠ generator-bound" if gen > SATURATED else ""
            lines.append(
                f"| {SERVER_LABELS[name]} | {concurrency} | {_spread([s.rps for s in group], 0)} "
                f"| {_spread([s.p50_ms for s in group], 3)} | {_spread([s.p99_ms for s in group], 3)} "
                f"| {_errors(group)} | {_spread([s.server_cpu_us_per_request for s in group], 0)} "
                f"| {median(s.server_cpu for s in group):.0%} | {gen:.0%}{flag} "
                f"| {median(s.other_cpu for s in group):.0%} |"
            )
    return lines


def ratio_table(samples: Sequence[Sample], concurrencies: Sequence[int]) -> list[str]:
    """Ratios taken inside each repetition (servers measured back to back), then summarized."""
    by_key = {(s.rep, s.concurrency, s.server): s for s in samples}
    reps = sorted({s.rep for s in samples})
    lines = ["| conc. | gatewatch / naive req/s | gatewatch / bare req/s | gatewatch / naive p50 "
             "| gatewatch / bare p50 |", "|---:|---:|---:|---:|---:|"]
    for concurrency in concurrencies:
        cells = []
        for other in (NAIVE, BARE):
            cells.append(_spread([by_key[(r, concurrency, GATEWATCH)].rps / by_key[(r, concurrency, other)].rps
                                  for r in reps], 2) + "×")
        for other in (NAIVE, BARE):
            cells.append(_spread([by_key[(r, concurrency, GATEWATCH)].p50_ms
                                  / by_key[(r, concurrency, other)].p50_ms for r in reps], 2) + "×")
        lines.append(f"| {concurrency} | " + " | ".join(cells) + " |")
    return lines


def background_note(samples: Sequence[Sample]) -> str:
    busy = [s for s in samples if s.background_before > QUIET_CPU]
    waited = sum(s.quiet_wait_s for s in samples)
    text = (f"Before each run the machine was probed for {QUIET_PROBE_S:g} s and the run held back (at most "
            f"{QUIET_MAX_WAIT_S:g} s per run, {QUIET_TOTAL_WAIT_S:g} s in all) while more than {QUIET_CPU:.0%} "
            "of a CPU was busy elsewhere; "
            f"{waited:.0f} s went to probing and waiting in total. ")
    if not busy:
        return text + "Every run started on a quiet machine."
    which = ", ".join(f"{s.server} c={s.concurrency} run {s.rep + 1} ({s.background_before:.0%})" for s in busy)
    return text + f"{len(busy)} of {len(samples)} runs started with background load anyway: {which}."


def inprocess_table(results: Sequence[InProcessResult]) -> list[str]:
    lines = ["| rows per call | µs per call | calls/s | rows/s |", "|---:|---:|---:|---:|"]
    for r in results:
        per_call = r.median_us
        lines.append(f"| {r.rows} | {_spread(r.per_call_us, 1)} | {1e6 / per_call:,.0f} "
                     f"| {r.rows * 1e6 / per_call:,.0f} |")
    return lines


def profile_section(profile: Profile | None, requested: bool) -> list[str]:
    if not requested:
        return []
    if profile is None:
        return ["## Profile of gatewatch", "", "py-spy was asked for but is not installed (`pip install py-spy`).", ""]
    lines = [
        "## Profile of gatewatch (py-spy record, all threads, at the highest concurrency)", "",
        f"{profile.samples} on-CPU samples at 250 Hz ({profile.idle_dropped} samples of idle thread-pool workers "
        f"dropped). Load while sampling: `{profile.under_load}`; py-spy pauses the process at each sample, so "
        "this is slower than the table above.", "",
        "Where the time goes (each sample charged to the innermost frame of a known layer; stdlib and numpy "
        "are charged to their caller):", "", "| share | layer |", "|---:|---|",
        *[f"| {share:.1%} | {name} |" for name, share in profile.components], "",
        "Top frames by self time:", "", "| share | frame |", "|---:|---|",
        *[f"| {share:.1%} | `{frame}` |" for frame, share in profile.self_top], "",
        "gatewatch's own functions, time including what they call:", "", "| share | function |", "|---:|---|",
        *[f"| {share:.1%} | `{frame}` |" for frame, share in profile.gateway_inclusive],
    ]
    return [*lines, ""]


def render_report(env: Environment, samples: Sequence[Sample], inprocess: Sequence[InProcessResult],
                  profile: Profile | None) -> str:
    o = env.options
    lines = [
        "# Serving benchmark: gatewatch vs naive FastAPI vs bare uvicorn vs onnxruntime in-process", "",
        f"- Date: {env.date}",
        f"- Command: `{env.command}`",
        f"- Machine: {env.machine}",
        f"- CPU pinning: {env.cpu_plan}",
        f"- Load average before / after: {env.loadavg_before} / {env.loadavg_after}",
        f"- Versions: {env.versions}",
        f"- Code: {env.source}",
        f"- Model: logistic-regression tabular classifier, input FP32 [N, {FEATURES}], outputs probabilities "
        f"FP32 [N, 2] and label INT64 [N]; onnxruntime CPU, 1 intra-op thread everywhere",
        f"- Request: `POST {INFER_PATH}`, V2 JSON, 1 row, {env.request_bytes} bytes, identical for every server",
        f"- Sanity check: {env.check}",
        f"- Generator: closed loop, one keep-alive HTTP/1.1 connection per concurrent client, raw asyncio "
        f"streams on {event_loop_name()}; per run {o.warmup:g} s warm-up then {o.duration:g} s measured "
        f"(or {o.max_requests:,} requests, whichever first); {o.runs} runs per cell, servers interleaved",
        "", f"## Results: median of {o.runs} runs (min–max)", "",
        *results_table(samples, o.concurrencies), "",
        "*server CPU µs/req*: the server process's CPU time (all threads) per answered request, the cost of a "
        "request that other load on the machine disturbs least. "
        "Other CPU columns are CPU-seconds per wall second (100% = one core busy; the machine has "
        f"{os.cpu_count()}): *server* = the server process, all threads; *generator* = the load generator's "
        "process (near 100% means that row measures the generator, not the server); *other* = everything "
        "else on the machine: helpers the server started (gatewatch's embedded redis-server, which inherits "
        "the server's pinning), the kernel's network work done outside either process, and unrelated "
        "processes.", "", background_note(samples), "",
        "## Ratios within each run (median, min–max)", "", *ratio_table(samples, o.concurrencies), "",
        f"## onnxruntime called directly (session.run in a loop, same process as the generator; median of "
        f"{o.runs} × 1 s)", "", *inprocess_table(inprocess), "",
        *profile_section(profile, o.profile_seconds > 0),
    ]
    return "\n".join(lines)


# -- orchestration --------------------------------------------------------------------------------------


@dataclass
class BenchOutcome:
    report: str
    samples: list[Sample]
    inprocess: list[InProcessResult]
    profile: Profile | None = field(default=None)


def measure_all(servers: dict[str, ManagedServer], model: Path, body: bytes, options: BenchOptions,
                cpus: CpuPlan, workdir: Path) -> tuple[list[InProcessResult], list[Sample], Profile | None]:
    original = os.sched_getaffinity(0)
    try:
        if cpus.generator is not None:
            os.sched_setaffinity(0, cpus.generator)  # this thread runs the generator and onnxruntime in-process
        inprocess = [measure_inprocess(model, rows, 1.0, options.runs) for rows in (1, 32)]
        samples = run_matrix(servers, body, options)
        profile = None
        if options.profile_seconds > 0:
            target = encode_request("127.0.0.1", servers[GATEWATCH].port, INFER_PATH, body)
            profile = profile_under_load(servers[GATEWATCH], target, max(options.concurrencies),
                                         options.profile_seconds, workdir)
        return inprocess, samples, profile
    finally:
        os.sched_setaffinity(0, original)


def run_benchmark(options: BenchOptions) -> BenchOutcome:
    cpus = plan_cpus(options.pin)
    loadavg_before = _loadavg()
    with tempfile.TemporaryDirectory(prefix="gatewatch-bench-") as tmp:
        workdir = Path(tmp)
        model = build_registry(workdir / "models")
        body = infer_body()
        commands = server_commands(workdir, workdir / "models", model)
        with running_servers(commands, workdir, cpus.server) as servers:
            check = check_answers(servers, body)
            inprocess, samples, profile = measure_all(servers, model, body, options, cpus, workdir)
    env = collect_environment(options, cpus, check, len(body), loadavg_before)
    report = render_report(env, samples, inprocess, profile)
    write_outputs(options.out, report, samples, inprocess, profile)
    return BenchOutcome(report, samples, inprocess, profile)


def write_outputs(out: Path, report: str, samples: Sequence[Sample], inprocess: Sequence[InProcessResult],
                  profile: Profile | None) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    raw = {"samples": [asdict(s) for s in samples], "inprocess": [asdict(r) for r in inprocess],
           "profile": asdict(profile) if profile else None}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> BenchOptions:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured run [5]")
    parser.add_argument("--runs", type=int, default=3, help="runs per server and concurrency [3]")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each run [1]")
    parser.add_argument("--out", type=Path, default=Path("bench/REPORT-serving.md"))
    parser.add_argument("--no-pin", action="store_true", help="do not pin servers and generator to CPUs")
    parser.add_argument("--profile", type=float, default=0.0, metavar="S",
                        help="then py-spy the gateway for S seconds at the highest concurrency [off]")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.duration <= 0 or args.warmup <= 0:
        parser.error("--runs, --duration and --warmup must be positive")
    given = list(sys.argv[1:] if argv is None else argv)
    return BenchOptions(duration=args.duration, runs=args.runs, warmup=args.warmup, out=args.out,
                        pin=not args.no_pin, profile_seconds=args.profile,
                        command=" ".join(["python -m loadtests.bench", shlex.join(given)]).strip())


def main(argv: Sequence[str] | None = None) -> None:
    print(run_benchmark(parse_args(argv)).report)


if __name__ == "__main__":
    main()
