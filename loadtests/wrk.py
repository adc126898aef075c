"""wrk (Debian's 4.x) as a load driver: closed loop only, driven by a Lua script that dumps what we need.

wrk prints its own summary with a few percentiles; we want the whole latency distribution (to feed the same
histogram the built-in generator feeds) and responses counted by status. The Lua script below:
- sets the request (method, path, headers, body read from a file) so wrk pre-formats it once;
- counts responses per status in each thread, and stops a thread after its share of `max_requests`;
- at the end prints `gatewatch-wrk …` lines: the summary, socket errors, every status count and every distinct
  latency (microseconds) with its count, which `parse_wrk_output` reads back.

wrk "corrects" its latency table for coordinated omission before `done()` sees it (`stats_correct`: each
latency above the mean interval adds synthetic samples below it). That suits an open-loop question, not the
closed-loop one wrk actually runs, and would make its percentiles differ from the built-in generator's; so
`uncorrect` removes those samples again, exactly, and checks that what is left adds up to the request count.
"""

from __future__ import annotations

import contextlib
import math
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from loadtests.generator import PROGRESS_INTERVAL_S, Progress
from loadtests.histogram import LatencyHistogram, require_hdrh
from loadtests.result import TIMEOUT_ERROR, TRANSPORT_ERROR, LoadResult, LoadSpec
from loadtests.target import HttpTarget

PREFIX = "gatewatch-wrk"
TIMEOUT_S = 10  # wrk's per-request timeout; also the ceiling of its latency table
STOP_POLL_S = 0.02  # how soon after the request budget is spent wrk is told to stop

LUA_REPORT = """
local limit, served = 0, 0
statuses = {}  -- a global: done() reads each thread's copy through thread:get
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  limit = tonumber(args[1]) or 0
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  served = served + 1
  if limit > 0 and served == limit then
    -- wrk's main thread sleeps out the whole duration anyway: say so, and the caller interrupts it (SIGINT).
    io.write(PREFIX, " stopped\\n")
    io.stdout:flush()
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("%s summary %d %d\\n", PREFIX, summary.requests, summary.duration))
  io.write(string.format("%s errors %d %d %d %d %d\\n", PREFIX, e.connect, e.read, e.write, e.status, e.timeout))
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses") or {}) do
      io.write(string.format("%s status %d %d\\n", PREFIX, status, count))
    end
  end
  for i = 1, #latency do
    local value, count = latency(i)
    io.write(string.format("%s latency %d %d\\n", PREFIX, value, count))
  end
end
"""


def wrk_binary() -> str | None:
    return shutil.which("wrk")


def _lua_string(value: str | bytes) -> str:
    """A Lua string literal for any bytes (decimal escapes for everything but safe printable ASCII)."""
    raw = value.encode() if isinstance(value, str) else value
    safe = (chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}" for b in raw)
    return '"' + "".join(safe) + '"'


def lua_script(target: HttpTarget, body_path: Path) -> str:
    lines = [f"PREFIX = {_lua_string(PREFIX)}", f"wrk.method = {_lua_string(target.method)}",
             f"wrk.path = {_lua_string(target.path)}"]
    for name, value in target.all_headers():
        if name.lower() != "content-length":  # wrk.format adds it from the body
            lines.append(f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}")
    if target.body is not None:
        lines.append(f"do local f = assert(io.open({_lua_string(str(body_path))}, 'rb')); "
                     "wrk.body = f:read('*a'); f:close() end")
    return "\n".join(lines) + LUA_REPORT


@dataclass
class WrkReport:
    """What the Lua script printed."""

    requests: int = 0
    duration_s: float = 0.0
    socket_errors: dict[str, int] = field(default_factory=dict)  # connect, read, write, status, timeout
    statuses: dict[str, int] = field(default_factory=dict)
    latency_us: list[tuple[int, int]] = field(default_factory=list)  # (value, count), ascending


def parse_wrk_output(text: str) -> WrkReport:
    report = WrkReport()
    seen_summary = False
    for line in text.splitlines():
        prefix, _, rest = line.partition(" ")
        if prefix != PREFIX:
            continue  # wrk's own human-readable summary
        kind, *numbers = rest.split()
        values = [int(float(n)) for n in numbers]
        if kind == "summary":
            report.requests, report.duration_s = values[0], values[1] / 1e6
            seen_summary = True
        elif kind == "errors":
            report.socket_errors = dict(zip(("connect", "read", "write", "status", "timeout"), values, strict=True))
        elif kind == "status":
            report.statuses[str(values[0])] = report.statuses.get(str(values[0]), 0) + values[1]
        elif kind == "latency":
            report.latency_us.append((values[0], values[1]))
    if not seen_summary:
        raise ValueError(f"no {PREFIX} summary in wrk's output:\n{text[-2000:]}")
    return report


def wrk_argv(binary: str, target: HttpTarget, spec: LoadSpec, script: Path, threads: int) -> list[str]:
    threads = max(1, min(threads, spec.concurrency))
    per_thread = math.ceil(spec.max_requests / threads)
    host = f"[{target.host}]" if ":" in target.host else target.host
    return [binary, "-t", str(threads), "-c", str(spec.concurrency), "-d", f"{max(1, math.ceil(spec.duration))}s",
            "--timeout", f"{TIMEOUT_S}s", "-s", str(script), f"http://{host}:{target.port}/", "--", str(per_thread)]


def run_wrk(target: HttpTarget, spec: LoadSpec, threads: int = 1, progress: Progress | None = None) -> LoadResult:
    """One closed-loop run with wrk. Its duration is whole seconds (wrk's own limit), rounded up."""
    if spec.rate is not None:
        raise ValueError("wrk 4 has no rate control: use the built-in driver for open-loop runs")
    binary = wrk_binary()
    if binary is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk), use --driver builtin")
    require_hdrh()
    with tempfile.TemporaryDirectory(prefix="gatewatch-wrk-") as tmp:
        body_path, script = Path(tmp) / "body", Path(tmp) / "report.lua"
        body_path.write_bytes(target.body or b"")
        script.write_text(lua_script(target, body_path))
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        argv = wrk_argv(binary, target, spec, script, threads)
        stdout, stderr = _run_with_progress(argv, int(argv[argv.index("-t") + 1]), spec, progress)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    try:
        report = parse_wrk_output(stdout)
    except ValueError as error:  # wrk exits 0 even when it could not load the script
        raise RuntimeError(f"{error}\nwrk's stderr: {stderr}") from None
    return to_result(report, target, spec, cpu)


def _run_with_progress(argv: list[str], threads: int, spec: LoadSpec,
                       progress: Progress | None) -> tuple[str, str]:
    deadline = math.ceil(spec.duration) + TIMEOUT_S + 30
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(argv, stdout=out, stderr=err)
        started, last_progress, interrupted = time.monotonic(), 0.0, False
        try:
            while process.poll() is None:
                elapsed = time.monotonic() - started
                if elapsed > deadline:
                    raise RuntimeError(f"wrk still running after {deadline}s")
                if progress and elapsed - last_progress >= PROGRESS_INTERVAL_S:
                    progress(elapsed, None)
                    last_progress = elapsed
                if not interrupted and _stopped_threads(out) >= threads:
                    process.send_signal(signal.SIGINT)  # every thread spent its budget: wrk then reports at once
                    interrupted = True
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=STOP_POLL_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        out.seek(0)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
        if process.returncode != 0:
            raise RuntimeError(f"wrk failed ({process.returncode}): {stderr}")
        return out.read().decode(errors="replace"), stderr


def _stopped_threads(out: IO[bytes]) -> int:
    out.seek(0)
    return out.read().count(f"{PREFIX} stopped".encode())


def to_result(report: WrkReport, target: HttpTarget, spec: LoadSpec, cpu_seconds: float) -> LoadResult:
    histogram = LatencyHistogram()
    for value, count in uncorrect(report, spec.concurrency):
        histogram.record_us(value, count)
    errors = {s: n for s, n in report.statuses.items() if s != str(target.expected_status)}
    transport = sum(report.socket_errors.get(k, 0) for k in ("connect", "read", "write"))
    if transport:
        errors[TRANSPORT_ERROR] = transport
    if report.socket_errors.get("timeout"):
        errors[TIMEOUT_ERROR] = report.socket_errors["timeout"]
    return LoadResult("wrk", spec, report.requests, report.duration_s, dict(report.statuses), errors,
                      cpu_seconds, histogram)


def uncorrect(report: WrkReport, connections: int) -> list[tuple[int, int]]:
    """Undo wrk's `stats_correct`, which for every latency n >= 2e added its count at n-e, n-2e, … (> e), with
    e = runtime_us / (requests / connections) in integer arithmetic. Top-down, each count is then exact.

    Falls back to the table as wrk gave it if the result does not add up to the request count (another wrk)."""
    pairs = report.latency_us
    per_connection = report.requests // connections if connections else 0
    if not pairs or per_connection == 0:
        return pairs
    interval = round(report.duration_s * 1e6) // per_connection
    top = pairs[-1][0]
    counts = np.zeros(top + 1, dtype=np.int64)
    for value, count in pairs:
        counts[value] = count
    if interval > 0:
        added = np.zeros(top + 1 + interval, dtype=np.int64)  # added[m] = true counts at m+e, m+2e, …
        for m in range(top, interval, -1):
            counts[m] -= added[m]
            added[m - interval] = added[m] + counts[m]
    if counts.min() < 0 or int(counts.sum()) != report.requests:
        return pairs
    return [(int(v), int(counts[v])) for v in np.flatnonzero(counts)]
