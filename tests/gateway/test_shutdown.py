"""SIGTERM is a graceful stop: every request already in flight is answered, then the process exits 0.

A dedicated gateway serves `slow`; two large requests hold both run slots while 48 small ones queue behind them,
so all 50 are provably in flight (the gateway's own gauge says so) when the signal arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from gateway.cancellation import cancel_and_wait
from tests.conftest import redis_servers_running_in, start_gateway, write_config

IN_FLIGHT = 50
RUN_SLOTS = 2  # inference_threads: requests running at once; the rest wait in the queue
SLOW_WIDTH = 512
BLOCKER_ROWS = 8192  # ~1 s of onnxruntime on one core: the 48 others arrive and queue meanwhile
GRACEFUL_SECONDS = 20


async def in_flight(client: httpx.AsyncClient) -> float:
    response = await client.get("/metrics")
    response.raise_for_status()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "gatewatch_requests_in_flight":
                return sample.value
    raise AssertionError("gatewatch_requests_in_flight missing from /metrics")


async def wait_in_flight(client: httpx.AsyncClient, at_least: int, within: float = 30) -> None:
    """Poll the gauge until it reaches `at_least`: a condition, not a sleep."""
    deadline = time.monotonic() + within
    while (value := await in_flight(client)) < at_least:
        assert time.monotonic() < deadline, f"only {value} requests in flight after {within}s, expected {at_least}"
        await asyncio.sleep(0.01)


def blocker_request() -> tuple[bytes, dict[str, str]]:
    rows = np.random.default_rng(0).normal(size=(BLOCKER_ROWS, SLOW_WIDTH)).astype("<f4")
    header = json.dumps(
        {
            "inputs": [
                {"name": "input", "shape": [BLOCKER_ROWS, SLOW_WIDTH], "datatype": "FP32",
                 "parameters": {"binary_data_size": rows.nbytes}}
            ],
            "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        }
    ).encode()
    return header + rows.tobytes(), {"inference-header-content-length": str(len(header))}


def small_request(index: int) -> dict[str, object]:
    row = np.full(SLOW_WIDTH, index / IN_FLIGHT, dtype=np.float32)
    return {"id": f"small-{index}", "inputs": [
        {"name": "input", "shape": [1, SLOW_WIDTH], "datatype": "FP32", "data": row.tolist()}
    ]}


async def test_shutdown_sigterm_answers_all_in_flight_requests(
    model_registry: Path, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "gatewatch.yaml", model_registry, inference_threads=RUN_SLOTS,
        shutdown_timeout_seconds=GRACEFUL_SECONDS,
    )
    gateway = start_gateway(config, tmp_path)
    try:
        limits = httpx.Limits(max_connections=IN_FLIGHT + 5, max_keepalive_connections=IN_FLIGHT + 5)
        async with (
            httpx.AsyncClient(base_url=gateway.url, timeout=GRACEFUL_SECONDS + 10, limits=limits) as client,
            httpx.AsyncClient(base_url=gateway.url, timeout=10) as probe,
        ):
            content, headers = blocker_request()
            blockers = [
                asyncio.create_task(client.post("/v2/models/slow/infer", content=content, headers=headers))
                for _ in range(RUN_SLOTS)
            ]
            await wait_in_flight(probe, RUN_SLOTS)
            small = [
                asyncio.create_task(client.post("/v2/models/slow/infer", json=small_request(i)))
                for i in range(IN_FLIGHT - RUN_SLOTS)
            ]
            await wait_in_flight(probe, IN_FLIGHT)
            assert not any(task.done() for task in blockers + small), "a request finished before SIGTERM"

            gateway.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            responses = await asyncio.gather(*blockers, *small, return_exceptions=True)

        failures = [r if isinstance(r, BaseException) else f"{r.status_code} {r.text[:200]}"
                    for r in responses if isinstance(r, BaseException) or r.status_code != 200]
        assert not failures, f"{len(failures)} of {IN_FLIGHT} in-flight requests not answered 200: {failures[:3]}"
        for index, response in enumerate(responses[RUN_SLOTS:]):
            assert isinstance(response, httpx.Response)
            assert response.json()["id"] == f"small-{index}"

        exit_code = await asyncio.to_thread(gateway.process.wait, GRACEFUL_SECONDS + 5)
        assert time.monotonic() - signalled < GRACEFUL_SECONDS
        assert exit_code == 0, f"gateway exited with {exit_code} after SIGTERM:\n{gateway.log()[-3000:]}"
        assert "Application shutdown complete" in gateway.log()
    finally:
        gateway.terminate()


def test_serve_on_a_busy_port_exits_with_the_error_and_stops_its_redis(model_registry: Path, tmp_path: Path) -> None:
    """uvicorn fails to bind a moment after start-up; the shutdown that follows must end (it once waited for ever
    on a route listener whose cancellation redis-py had swallowed) and take the embedded Redis down with it."""
    config = write_config(tmp_path / "gatewatch.yaml", model_registry)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        command = [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                   "--config", str(config)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode != 0
    assert "address already in use" in done.stderr + done.stdout
    assert redis_servers_running_in(str(tmp_path)) == []


def test_serve_that_fails_to_start_stops_its_redis(model_registry: Path, tmp_path: Path) -> None:
    """An invalid route in the config file stops start-up half-way (after the embedded Redis, the log writer and
    the registry sync): what did start is closed, the embedded Redis included."""
    config = write_config(tmp_path / "gatewatch.yaml", model_registry)
    with config.open("a") as handle:
        handle.write("endpoints:\n  broken: {variants: []}\n")
    command = [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", "0",
               "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode != 0
    assert "invalid route for 'broken'" in done.stderr + done.stdout
    assert "embedded redis" in done.stderr + done.stdout  # it did get that far
    assert redis_servers_running_in(str(tmp_path)) == []


async def test_cancel_and_wait_cancels_again_a_task_that_swallowed_its_cancellation() -> None:
    swallowed = asyncio.Event()

    async def swallows_once() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()  # what redis-py 8.1 can do while a pub/sub connection is being set up
        await asyncio.Event().wait()

    released = asyncio.Event()

    async def swallows_until_released() -> None:
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await released.wait()

    once = asyncio.create_task(swallows_once())
    await asyncio.sleep(0)  # let it start
    assert await cancel_and_wait([once], within=5) == set()
    assert swallowed.is_set() and once.cancelled()
    stubborn = asyncio.create_task(swallows_until_released(), name="stubborn")
    await asyncio.sleep(0)
    assert await cancel_and_wait([stubborn], within=0.3) == {stubborn}  # bounded: returned, not awaited for ever
    released.set()
    await stubborn
