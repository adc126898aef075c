"""The wrk driver: its output parser, the undoing of wrk's latency correction, and a real run when wrk exists."""

from __future__ import annotations

import numpy as np
import pytest

from loadtests.result import LoadSpec
from loadtests.servers import ManagedServer
from loadtests.target import encode_request
from loadtests.wrk import WrkReport, parse_wrk_output, run_wrk, uncorrect, wrk_binary

OUTPUT = """Running 1s test @ http://127.0.0.1:1/
  8242 requests in 1.10s, 1.25MB read
gatewatch-wrk summary 6 1100000
gatewatch-wrk errors 0 1 0 2 0
gatewatch-wrk status 200 4
gatewatch-wrk status 503 2
gatewatch-wrk latency 120 5
gatewatch-wrk latency 900 1
"""


def test_parser_reads_summary_errors_statuses_and_latencies() -> None:
    report = parse_wrk_output(OUTPUT)
    assert report.requests == 6
    assert report.duration_s == pytest.approx(1.1)
    assert report.socket_errors == {"connect": 0, "read": 1, "write": 0, "status": 2, "timeout": 0}
    assert report.statuses == {"200": 4, "503": 2}
    assert report.latency_us == [(120, 5), (900, 1)]


def test_parser_refuses_output_without_summary() -> None:
    with pytest.raises(ValueError, match="summary"):
        parse_wrk_output("Running 1s test\n")


def _wrk_correct(counts: np.ndarray, expected: int) -> np.ndarray:
    """wrk's stats_correct, as in its stats.c: each latency n >= 2e adds its count at n-e, n-2e, … (> e)."""
    corrected = counts.copy()
    for n in range(2 * expected, counts.size):
        m = n - expected
        while counts[n] and m > expected:
            corrected[m] += counts[n]
            m -= expected
    return corrected


def test_uncorrect_recovers_the_measured_latencies() -> None:
    rng = np.random.default_rng(3)
    true = np.bincount(rng.integers(50, 2000, size=5000), minlength=2001).astype(np.int64)
    requests, connections, duration_us = int(true.sum()), 4, 1_000_000
    interval = duration_us // (requests // connections)
    corrected = _wrk_correct(true, interval)
    assert corrected.sum() > requests  # the correction did add samples
    pairs = [(int(v), int(corrected[v])) for v in np.flatnonzero(corrected)]
    recovered = uncorrect(WrkReport(requests, duration_us / 1e6, {}, {}, pairs), connections)
    assert recovered == [(int(v), int(true[v])) for v in np.flatnonzero(true)]


@pytest.mark.skipif(wrk_binary() is None, reason="wrk is not installed")
def test_real_wrk_run_against_a_real_server(bare_server: ManagedServer) -> None:
    target = encode_request("127.0.0.1", bare_server.port, "/v2/models/m/infer", b'{"inputs":[]}',
                            headers={"X-Test": "1"})
    result = run_wrk(target, LoadSpec(concurrency=4, duration=1.0))
    assert result.driver == "wrk"
    assert result.requests > 100
    assert result.statuses == {"200": result.requests}
    assert result.errors == {}
    assert result.histogram.count == result.requests  # wrk's synthetic samples removed again
    assert 0 < result.p50_ms <= result.p99_ms
    assert 0.9 < result.seconds < 3


@pytest.mark.skipif(wrk_binary() is None, reason="wrk is not installed")
def test_real_wrk_stops_at_the_request_budget(bare_server: ManagedServer) -> None:
    target = encode_request("127.0.0.1", bare_server.port, "/v2/health/ready")
    result = run_wrk(target, LoadSpec(concurrency=2, duration=20.0, max_requests=300))
    assert result.requests == 300
    assert result.seconds < 5  # interrupted once the budget was spent, not after 20 s
