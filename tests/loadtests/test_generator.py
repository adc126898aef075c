"""Smoke test of the load generator against a real server (the bare uvicorn app) on a loopback port."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.bench import ManagedServer, start_server
from loadtests.generator import encode_request, run_load


@pytest.fixture(scope="module")
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    log = tmp_path_factory.mktemp("bare") / "bare.log"
    server = start_server("bare", [sys.executable, "-m", "loadtests.baselines", "bare"], Path(log))
    try:
        server.wait_ready(timeout=30)
        yield server
    finally:
        server.stop()


def test_closed_loop_run_against_a_real_server(bare_server: ManagedServer) -> None:
    target = encode_request("127.0.0.1", bare_server.port, "/v2/models/m/infer", b'{"inputs":[]}')
    result = run_load(target, concurrency=4, duration=1.0, max_requests=20_000)
    assert result.requests > 0
    assert result.errors == {}
    assert result.latencies_ms.size == result.requests
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms


def test_request_budget_bounds_the_run(bare_server: ManagedServer) -> None:
    target = encode_request("127.0.0.1", bare_server.port, "/v2/health/ready")
    result = run_load(target, concurrency=8, duration=30.0, max_requests=100)
    assert result.requests == 100
    assert result.errors == {}


def test_unexpected_status_is_counted_as_error(bare_server: ManagedServer) -> None:
    target = encode_request("127.0.0.1", bare_server.port, "/v2/health/ready")
    wrong = dataclasses.replace(target, expected_status=201)
    result = run_load(wrong, concurrency=2, duration=5.0, max_requests=10)
    assert result.errors == {"200": 10}
