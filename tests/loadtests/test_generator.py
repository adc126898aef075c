"""The built-in generator against a real server (the bare uvicorn app) on a loopback port, and its schedule."""

from __future__ import annotations

import dataclasses

import numpy as np

from loadtests.generator import open_loop_schedule, run_load
from loadtests.result import LoadSpec
from loadtests.servers import ManagedServer
from loadtests.target import encode_request


def test_closed_loop_run_against_a_real_server(bare_server: ManagedServer) -> None:
    target = encode_request("127.0.0.1", bare_server.port, "/v2/models/m/infer", b'{"inputs":[]}')
    result = run_load(target, LoadSpec(concurrency=4, duration=0.5, max_requests=20_000))
    assert result.requests > 0
    assert result.errors == {}
    assert result.statuses == {"200": result.requests}
    assert result.histogram.count == result.requests
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms


def test_request_budget_bounds_the_run(bare_server: ManagedServer) -> None:
    target = encode_request("127.0.0.1", bare_server.port, "/v2/health/ready")
    result = run_load(target, LoadSpec(concurrency=8, duration=30.0, max_requests=100))
    assert result.requests == 100
    assert result.seconds < 30
    assert result.errors == {}


def test_unexpected_status_is_counted_as_error(bare_server: ManagedServer) -> None:
    target = dataclasses.replace(encode_request("127.0.0.1", bare_server.port, "/v2/health/ready"),
                                 expected_status=201)
    result = run_load(target, LoadSpec(concurrency=2, duration=5.0, max_requests=10))
    assert result.errors == {"200": 10}
    assert result.statuses == {"200": 10}


def test_open_loop_schedule_is_evenly_spaced_and_bounded() -> None:
    offsets = open_loop_schedule(rate=1000, duration=2.0, max_requests=10_000_000)
    assert offsets.size == 2000
    assert offsets[0] == 0
    np.testing.assert_array_equal(np.diff(offsets), np.full(1999, 1_000_000))
    assert open_loop_schedule(rate=1000, duration=2.0, max_requests=50).size == 50
    assert open_loop_schedule(rate=3, duration=1.0, max_requests=10)[-1] == round(2e9 / 3)


def test_open_loop_sends_the_schedule_and_measures_from_intended_time(bare_server: ManagedServer) -> None:
    target = encode_request("127.0.0.1", bare_server.port, "/v2/models/m/infer", b'{"inputs":[]}')
    result = run_load(target, LoadSpec(concurrency=4, duration=0.5, rate=400))
    assert result.requests == 200
    assert result.errors == {}
    assert 0.4 < result.seconds < 2.0  # paced by the schedule, not as fast as the server answers
    assert result.send_lag is not None and result.send_lag.count == 200
    assert result.p50_ms > 0
