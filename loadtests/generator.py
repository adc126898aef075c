"""The built-in load generator: HTTP/1.1 over raw asyncio streams, lean enough to measure the server, not itself.

Design choices, each to keep the generator's own cost per request small and predictable:
- raw asyncio streams (on uvloop when installed), one keep-alive connection per concurrent client;
- the request is encoded to bytes once (`HttpTarget.request`) and written as-is every time;
- a response is read as its header block plus exactly `Content-Length` bytes (chunked bodies are understood
  too); no HTTP client library in the hot loop;
- a latency is one `perf_counter_ns()` difference appended to a list; the histogram is built at the end.

Closed loop: each client sends its next request when the previous answer arrives. Open loop: requests are due
on a fixed schedule (`rate` per second) and a latency is measured from the *intended* send time, so a server
that stalls is charged for the requests that queued behind the stall (no coordinated omission).

A run stops by itself: after `duration` seconds or `max_requests` requests, whichever comes first, and a hard
deadline (`duration` + `grace`) cancels whatever is still in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from loadtests.histogram import LatencyHistogram, require_hdrh
from loadtests.result import TIMEOUT_ERROR, TRANSPORT_ERROR, LoadResult, LoadSpec
from loadtests.target import HttpTarget

T = TypeVar("T")
Progress = Callable[[float, int | None], None]  # (seconds elapsed, requests completed if known), a few times/s

PROGRESS_INTERVAL_S = 0.2
SPIN_S = 0.001  # open loop: the last stretch before a send is spun (yielding), as timers are ~1 ms coarse


class _HttpProtocolError(Exception):
    """The server's bytes were not a response we can frame (so the connection is unusable)."""


@dataclass
class _Tally:
    latencies_ns: list[int] = field(default_factory=list)
    lags_ns: list[int] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one full response; return its status and whether the server will keep the connection open."""
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1."):
        raise _HttpProtocolError(f"not an HTTP response: {head[:40]!r}")
    status = int(head[9:12])
    lower = head.lower()
    keep_alive = b"\r\nconnection: close" not in lower
    length = _header_int(lower, b"\r\ncontent-length:")
    if length is not None:
        await reader.readexactly(length)
    elif b"\r\ntransfer-encoding: chunked" in lower:
        await _skip_chunked(reader)
    elif status not in (204, 304) and not 100 <= status < 200:
        raise _HttpProtocolError("response without Content-Length or chunked body")
    return status, keep_alive


def _header_int(lower_head: bytes, name: bytes) -> int | None:
    start = lower_head.find(name)
    if start < 0:
        return None
    end = lower_head.find(b"\r\n", start + len(name))
    return int(lower_head[start + len(name) : end])


async def _skip_chunked(reader: asyncio.StreamReader) -> None:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)  # chunk data and its CRLF
        if size == 0:
            return


class _Connection:
    """One keep-alive connection that re-opens itself after a transport error or `Connection: close`."""

    def __init__(self, target: HttpTarget, streams: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        self.target = target
        self.reader, self.writer = streams

    async def exchange(self, tally: _Tally) -> bool:
        """Send the request and read the answer; False (counted as a transport error) if that failed."""
        try:
            # No drain(): at most one small request is ever unacknowledged, so the buffer never fills.
            self.writer.write(self.target.request)
            status, keep_alive = await _read_response(self.reader)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, _HttpProtocolError):
            tally.errors[TRANSPORT_ERROR] += 1
            await self.reopen()
            return False
        tally.statuses[str(status)] += 1
        if status != self.target.expected_status:
            tally.errors[str(status)] += 1
        if not keep_alive:
            await self.reopen()
        return True

    async def reopen(self) -> None:
        self.writer.close()
        self.reader, self.writer = await asyncio.open_connection(self.target.host, self.target.port)

    def close(self) -> None:
        self.writer.close()


class _Budget:
    """Closed loop's shared stop condition; safe without locks because everything runs on one event loop."""

    def __init__(self, duration: float, max_requests: int) -> None:
        self.stop_at = time.perf_counter() + duration
        self.remaining = max_requests

    def take(self) -> bool:
        if self.remaining <= 0 or time.perf_counter() >= self.stop_at:
            return False
        self.remaining -= 1
        return True


def open_loop_schedule(rate: float, duration: float, max_requests: int) -> npt.NDArray[np.int64]:
    """Intended send times, in ns from the start: evenly spaced at `rate`, within `duration` and the budget."""
    count = max(1, min(max_requests, int(rate * duration)))
    return np.round(np.arange(count, dtype=np.float64) * (1e9 / rate)).astype(np.int64)


class _Schedule:
    """Hands out the open-loop slots in order to whichever connection is free."""

    def __init__(self, offsets_ns: npt.NDArray[np.int64], start_ns: int) -> None:
        self._due = (offsets_ns + start_ns).tolist()
        self._next = 0

    def take(self) -> int | None:
        if self._next >= len(self._due):
            return None
        due: int = self._due[self._next]
        self._next += 1
        return due


async def _sleep_until(due_ns: int) -> None:
    delay = (due_ns - time.perf_counter_ns()) / 1e9
    if delay > SPIN_S:
        await asyncio.sleep(delay - SPIN_S)
    # Spinning (yielding to the other clients) is deliberate: no timer is precise enough for the last stretch.
    while time.perf_counter_ns() < due_ns:  # noqa: ASYNC110
        await asyncio.sleep(0)


async def _closed_client(connection: _Connection, budget: _Budget, tally: _Tally) -> None:
    try:
        while budget.take():
            started = time.perf_counter_ns()
            if await connection.exchange(tally):
                tally.latencies_ns.append(time.perf_counter_ns() - started)
    finally:
        connection.close()


async def _open_client(connection: _Connection, schedule: _Schedule, tally: _Tally) -> None:
    try:
        while (due := schedule.take()) is not None:
            await _sleep_until(due)
            sent = time.perf_counter_ns()
            if await connection.exchange(tally):
                tally.latencies_ns.append(time.perf_counter_ns() - due)
                tally.lags_ns.append(sent - due)
    finally:
        connection.close()


async def _report_progress(tally: _Tally, progress: Progress) -> None:
    started = time.perf_counter()
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL_S)
        progress(time.perf_counter() - started, len(tally.latencies_ns))


async def generate(target: HttpTarget, spec: LoadSpec, progress: Progress | None = None,
                   grace: float = 10.0) -> LoadResult:
    """Drive `target` as `spec` says until its duration or request budget is spent."""
    require_hdrh()
    tally = _Tally()
    # Connect everyone first, so the clock and the budget cover only the steady state.
    streams = await asyncio.gather(
        *(asyncio.open_connection(target.host, target.port) for _ in range(spec.concurrency))
    )
    connections = [_Connection(target, s) for s in streams]
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    if spec.rate is None:
        budget = _Budget(spec.duration, spec.max_requests)
        clients = [asyncio.create_task(_closed_client(c, budget, tally)) for c in connections]
        deadline = spec.duration + grace
    else:
        offsets = open_loop_schedule(spec.rate, spec.duration, spec.max_requests)
        schedule = _Schedule(offsets, time.perf_counter_ns())
        clients = [asyncio.create_task(_open_client(c, schedule, tally)) for c in connections]
        deadline = offsets[-1] / 1e9 + grace
    ticker = asyncio.create_task(_report_progress(tally, progress)) if progress else None
    try:
        await _wait_clients(clients, deadline, tally)
    finally:
        if ticker is not None:
            ticker.cancel()
    wall = time.perf_counter() - wall_start
    if progress:
        progress(wall, len(tally.latencies_ns))
    lag = LatencyHistogram.from_ns(tally.lags_ns) if spec.rate is not None else None
    return LoadResult("builtin", spec, len(tally.latencies_ns), wall, dict(tally.statuses), dict(tally.errors),
                      time.process_time() - cpu_start, LatencyHistogram.from_ns(tally.latencies_ns), lag)


async def _wait_clients(clients: list[asyncio.Task[None]], deadline: float, tally: _Tally) -> None:
    _, stuck = await asyncio.wait(clients, timeout=deadline)
    for task in stuck:
        task.cancel()
        tally.errors[TIMEOUT_ERROR] += 1
    if stuck:
        await asyncio.wait(stuck)  # let the cancelled clients close their connections
    for task in clients:
        with contextlib.suppress(asyncio.CancelledError):
            if (error := task.exception()) is not None:
                raise error  # a client that could not even reconnect: the run is meaningless


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on a fresh event loop: uvloop's when installed, since its streams cost less per request."""
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(coro)


def run_load(target: HttpTarget, spec: LoadSpec, progress: Progress | None = None) -> LoadResult:
    """Blocking wrapper of `generate` for scripts and the CLI."""
    return run_async(generate(target, spec, progress))


def event_loop_name() -> str:
    return "uvloop" if _loop_factory() is not None else "asyncio"
