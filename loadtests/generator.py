"""A closed-loop HTTP/1.1 load generator, lean enough that the server, not the generator, is what gets measured.

Design choices, each to keep the generator's own cost per request small and predictable:
- raw asyncio streams (on uvloop when installed), one keep-alive connection per concurrent client;
- the request is encoded to bytes once and written as-is every time;
- a response is read as its header block plus exactly `Content-Length` bytes (chunked bodies are understood
  too, but the servers measured here never send them); no HTTP client library in the hot loop;
- a latency is one `perf_counter_ns()` difference appended to a list, turned into a numpy array at the end.

A run stops by itself: clients stop issuing after `duration` seconds or `max_requests` requests, whichever
comes first, and a hard deadline (`duration` + `grace`) cancels whatever is still in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

T = TypeVar("T")

TRANSPORT_ERROR = "transport"  # connection refused/reset/closed mid-response: no status to count it under
TIMEOUT_ERROR = "timeout"  # still in flight at the hard deadline


@dataclass(frozen=True)
class HttpTarget:
    """Where to connect and the exact bytes to send for every request."""

    host: str
    port: int
    request: bytes
    expected_status: int = 200


def encode_request(
    host: str,
    port: int,
    path: str,
    body: bytes | None = None,
    method: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> HttpTarget:
    """Pre-encode one HTTP/1.1 keep-alive request (POST when there is a body, else GET)."""
    verb = method or ("POST" if body is not None else "GET")
    lines = [f"{verb} {path} HTTP/1.1", f"Host: {host}:{port}"]
    all_headers = dict(headers or {})
    if body is not None:
        all_headers.setdefault("Content-Type", "application/json")
        all_headers["Content-Length"] = str(len(body))
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return HttpTarget(host, port, head + (body or b""))


@dataclass(frozen=True)
class LoadResult:
    """One closed-loop run. `requests` counts completed responses, whatever their status."""

    concurrency: int
    requests: int
    seconds: float
    errors: dict[str, int]
    cpu_seconds: float  # the generator process's CPU time over the run: near `seconds` means it was the limit
    latencies_ms: npt.NDArray[np.float64] = field(repr=False)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def generator_cpu(self) -> float:
        """Fraction of one core the generator used (1.0 = saturated)."""
        return self.cpu_seconds / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        if self.latencies_ms.size == 0:
            return float("nan")
        return float(np.percentile(self.latencies_ms, q))

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(50)

    @property
    def p90_ms(self) -> float:
        return self.percentile_ms(90)

    @property
    def p99_ms(self) -> float:
        return self.percentile_ms(99)

    def summary(self) -> str:
        return (
            f"c={self.concurrency} n={self.requests} {self.rps:,.0f} req/s p50={self.p50_ms:.3f}ms "
            f"p90={self.p90_ms:.3f}ms p99={self.p99_ms:.3f}ms errors={self.errors or 0} "
            f"gen_cpu={self.generator_cpu:.0%}"
        )


class _HttpProtocolError(Exception):
    """The server's bytes were not a response we can frame (so the connection is unusable)."""


class _Budget:
    """Shared stop condition of all clients; safe without locks because everything runs on one event loop."""

    def __init__(self, duration: float, max_requests: int) -> None:
        self.stop_at = time.perf_counter() + duration
        self.remaining = max_requests

    def take(self) -> bool:
        if self.remaining <= 0 or time.perf_counter() >= self.stop_at:
            return False
        self.remaining -= 1
        return True


@dataclass
class _Tally:
    latencies_ns: list[int] = field(default_factory=list)
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


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _client(target: HttpTarget, connection: Connection, budget: _Budget, tally: _Tally) -> None:
    """One concurrent user: one connection, one request in flight at a time (closed loop)."""
    reader, writer = connection
    try:
        while budget.take():
            started = time.perf_counter_ns()
            try:
                # No drain(): at most one small request is ever unacknowledged, so the buffer never fills.
                writer.write(target.request)
                status, keep_alive = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, _HttpProtocolError):
                tally.errors[TRANSPORT_ERROR] += 1
                writer.close()
                reader, writer = await asyncio.open_connection(target.host, target.port)
                continue
            tally.latencies_ns.append(time.perf_counter_ns() - started)
            if status != target.expected_status:
                tally.errors[str(status)] += 1
            if not keep_alive:
                writer.close()
                reader, writer = await asyncio.open_connection(target.host, target.port)
    finally:
        writer.close()


async def generate(
    target: HttpTarget,
    concurrency: int,
    duration: float,
    max_requests: int = 10_000_000,
    grace: float = 10.0,
) -> LoadResult:
    """Run `concurrency` closed-loop clients against `target` until the duration or request budget is spent."""
    if concurrency < 1 or duration <= 0 or max_requests < 1:
        raise ValueError("concurrency, duration and max_requests must be positive")
    tally = _Tally()
    # Connect everyone first, so the clock and the budget cover only the steady state.
    connections = await asyncio.gather(
        *(asyncio.open_connection(target.host, target.port) for _ in range(concurrency))
    )
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    budget = _Budget(duration, max_requests)
    clients = [asyncio.create_task(_client(target, c, budget, tally)) for c in connections]
    _, stuck = await asyncio.wait(clients, timeout=duration + grace)
    for task in stuck:
        task.cancel()
        tally.errors[TIMEOUT_ERROR] += 1
    if stuck:
        await asyncio.wait(stuck)  # let the cancelled clients close their connections
    for task in clients:
        with contextlib.suppress(asyncio.CancelledError):
            if (error := task.exception()) is not None:
                raise error  # a client that could not even reconnect: the run is meaningless
    wall = time.perf_counter() - wall_start
    latencies = np.asarray(tally.latencies_ns, dtype=np.float64) / 1e6
    return LoadResult(concurrency, len(latencies), wall, dict(tally.errors), time.process_time() - cpu_start,
                      latencies)


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


def run_load(
    target: HttpTarget, concurrency: int, duration: float, max_requests: int = 10_000_000
) -> LoadResult:
    """Blocking wrapper of `generate` for scripts and the CLI."""
    return run_async(generate(target, concurrency, duration, max_requests))


def event_loop_name() -> str:
    return "uvloop" if _loop_factory() is not None else "asyncio"
