"""py-spy a server under load and say where its time goes, by layer and by frame."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtests.generator import run_load
from loadtests.result import LoadSpec
from loadtests.servers import ManagedServer
from loadtests.target import HttpTarget


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
        result = run_load(target, LoadSpec(concurrency, seconds + 1.0))  # outlasts the sampler a little
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


def profile_lines(profile: Profile | None, requested: bool) -> list[str]:
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
