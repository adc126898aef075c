"""Traffic routing over real gateway processes and a real Redis (design.md, "Admin API", "Streams", "Metrics").

Splits, sticky routing, shadows, bandits, route propagation between replicas, the admin API's 401/422 rules,
statistics, deletion and the `gatewatch routes` CLI — every claim observed from outside, over HTTP, in the log
streams or in `/metrics`.

Bulk traffic (thousands of requests) goes through aiohttp (installed with the `test` extra's
`tritonclient[http]`): on a two-core machine httpx costs ~5x more client CPU per request, which would make the
client, not the gateway, the bottleneck. Single calls (admin API, polling) use httpx.

Each gateway has its own Redis database on the session's redis-server, flushed before it starts, so no two
tests (nor other test modules on database 0) see each other's routes.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import aiohttp
import httpx
import numpy as np
import onnx
import orjson
import pytest
import redis
import yaml
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from scipy.stats import chisquare

from gateway.metrics import GatewayMetrics
from gateway.records import PayloadPolicy
from gateway.routing.router import Router
from gateway.routing.shadow import ShadowMetrics, ShadowMirror
from gateway.routing.table import Route
from gateway.runtime.manager import ModelManager
from loadtests import onnx_models as om
from tests.conftest import GatewayProcess, RedisServer, free_port, start_gateway

T = TypeVar("T")

TOKEN = "routing-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
ALPHA = 0.001  # the significance level for the split tests
CONCURRENCY = 16

# Redis databases, one per gateway group (0 belongs to the conftest's `redis_client`).
DB_SHARED, DB_SLOW_SHADOW, DB_PAIR, DB_NO_TOKEN, DB_DELETE, DB_RELAY, DB_WIPED = 1, 2, 3, 4, 5, 6, 7


# -- models, configs, gateways --------------------------------------------------------------------------


def slow32(hidden: int = 2048, depth: int = 8) -> onnx.ModelProto:
    """A deliberately slow model that takes the tabular models' input (`input` FP32 [N, 32]): ~10 ms a row."""
    rng = np.random.default_rng(0)
    w_in = rng.normal(0, 1 / np.sqrt(32), (32, hidden)).astype(np.float32)
    w = (np.eye(hidden) + rng.normal(0, 1e-3, (hidden, hidden))).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["input", "W_in"], ["h0"])]
    for step in range(depth):
        nodes.append(helper.make_node("MatMul", [f"h{step}", "W"], ["output" if step == depth - 1 else f"h{step + 1}"]))
    graph = helper.make_graph(
        nodes,
        "slow32",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", hidden])],
        [numpy_helper.from_array(w_in, "W_in"), numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", om.OPSET)])
    model.ir_version = om.IR_VERSION
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("routing-registry")
    om.write_version(root, "tabular", 1, om.tabular_classifier(seed=1), {"task": "classification"})
    om.write_version(root, "tabular", 2, om.tabular_classifier(seed=2), {"task": "classification"})
    om.write_aliases(root, "tabular", {"champion": 1, "challenger": 2})
    om.write_version(root, "slow32", 1, slow32())
    om.write_version(root, "summer", 1, om.int64_sum(width=4))
    om.write_version(root, "id_fp32", 1, om.identity("FP32"))
    return root


def redis_db(server: RedisServer, db: int) -> str:
    """URL of database `db`, emptied."""
    client = redis.Redis(port=server.port, db=db)
    client.flushdb()
    client.close()
    return f"redis://127.0.0.1:{server.port}/{db}"


def gateway_config(
    directory: Path, registry: Path, redis_url: str, endpoints: dict[str, Any], **settings: Any
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {
        "registry": str(registry),
        "data_dir": str(directory / "data"),
        "redis_url": redis_url,
        "admin_token": TOKEN,
        "max_queue_delay_ms": 1,
        "registry_poll_seconds": 60,
        "endpoints": endpoints,
    }
    document.update(settings)
    document = {key: value for key, value in document.items() if value is not None}
    path = directory / "gatewatch.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def variant(name: str, version: int | str, weight: float = 1.0, model: str = "tabular") -> dict[str, Any]:
    return {"name": name, "model": model, "version": version, "weight": weight}


AB = {"variants": [variant("a", "champion", 50), variant("b", "challenger", 50)]}
VERSION_OF = {"a": "1", "b": "2"}  # tabular: champion = 1, challenger = 2

SHARED_ENDPOINTS: dict[str, Any] = {
    "split90": {"variants": [variant("a", "champion", 90), variant("b", "challenger", 10)]},
    "split3": {"variants": [variant("a", 1, 50), variant("b", 2, 30), variant("c", "latest", 20)]},
    "sticky": AB | {"sticky": "header:x-user-id"},
    "byid": AB | {"sticky": "id"},
    "guarded": AB,
    "locked": AB,
    "statsep": AB,
    "bandit": {"strategy": "bandit", "variants": [variant("a", 1), variant("b", 2)]},
    "mirrored": {
        "variants": [variant("a", 1)],
        "shadow": [
            {"name": "s1", "model": "tabular", "version": 2, "sample": 1.0},
            {"name": "s0", "model": "tabular", "version": 1, "sample": 0.0},
        ],
    },
}


@pytest.fixture(scope="module")
def shared(
    registry: Path, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    """One gateway for the tests that only add traffic or change their own endpoint."""
    directory = tmp_path_factory.mktemp("routing-shared")
    config = gateway_config(
        directory, registry, redis_db(redis_server, DB_SHARED), SHARED_ENDPOINTS, shadow_max_in_flight=100_000
    )
    gateway = start_gateway(config, directory)
    yield gateway
    gateway.terminate()


@pytest.fixture
def launch() -> Iterator[Callable[[Path], GatewayProcess]]:
    """Start gateways (from a test's own configs); every one is stopped at the end of the test."""
    started: list[GatewayProcess] = []

    def run(config: Path) -> GatewayProcess:
        gateway = start_gateway(config, config.parent)
        started.append(gateway)
        return gateway

    yield run
    for gateway in started:
        gateway.terminate()


# -- traffic ------------------------------------------------------------------------------------------------


def infer_body(rows: np.ndarray) -> bytes:
    return orjson.dumps(
        {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}
    )


FIXED_BODY = infer_body(np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 32))
JSON = {"content-type": "application/json"}


@dataclass(frozen=True)
class Answer:
    index: int
    status: int
    variant: str | None
    request_id: str
    model_version: str | None
    latency_ms: float


AfterAnswer = Callable[[aiohttp.ClientSession, Answer], Awaitable[None]]


async def drive(
    url: str,
    endpoint: str,
    count: int,
    concurrency: int = CONCURRENCY,
    headers: Callable[[int], dict[str, str]] | None = None,
    body: Callable[[int], bytes] | None = None,
    after: AfterAnswer | None = None,
) -> list[Answer]:
    """`count` infer calls over `concurrency` keep-alive connections; the answers in completion order."""
    answers: list[Answer] = []
    indexes = iter(range(count))  # shared by the workers: each index is taken exactly once
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def worker() -> None:
            for index in indexes:
                request_headers = JSON | (headers(index) if headers else {})
                started = time.perf_counter()
                async with session.post(
                    f"/v2/models/{endpoint}/infer", data=body(index) if body else FIXED_BODY, headers=request_headers
                ) as response:
                    payload = orjson.loads(await response.read())
                answer = Answer(
                    index,
                    response.status,
                    response.headers.get("x-gatewatch-variant"),
                    response.headers["x-request-id"],
                    payload.get("model_version"),
                    (time.perf_counter() - started) * 1000,
                )
                if after is not None:
                    await after(session, answer)
                answers.append(answer)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


def assert_served_by(answers: list[Answer], versions: dict[str, str]) -> Counter[str]:
    """Every answer is a 200 from one of `versions`' variants, with that variant's model version."""
    assert all(a.status == 200 for a in answers), Counter(a.status for a in answers)
    for answer in answers:
        assert answer.variant in versions, answer
        assert answer.model_version == versions[answer.variant], answer
    return Counter(a.variant for a in answers if a.variant is not None)


def split_p_value(counts: Counter[str], weights: dict[str, float]) -> float:
    n = sum(counts.values())
    total = sum(weights.values())
    observed = [counts.get(name, 0) for name in weights]
    expected = [n * w / total for w in weights.values()]
    return float(chisquare(observed, expected).pvalue)


def p99(answers: list[Answer]) -> float:
    return float(np.percentile([a.latency_ms for a in answers], 99))


async def metric(client: httpx.AsyncClient, sample_name: str, **labels: str) -> float:
    """Sum of `sample_name` over the samples whose labels include `labels` (0 when there is none)."""
    response = await client.get("/metrics")
    response.raise_for_status()
    total = 0.0
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def eventually(condition: Callable[[], Awaitable[T | None]], within: float, what: str) -> T:
    """Poll `condition` until it returns something truthy; fail after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = await condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {within}s"
        await asyncio.sleep(0.02)


def admin_client(gateway: GatewayProcess, **kwargs: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gateway.url, timeout=30, **({"headers": AUTH} | kwargs))


def log_entries(client: redis.Redis, name: str) -> list[dict[str, str]]:
    raw: Any = client.xrange(f"gatewatch:log:{name}")
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in raw]


# -- splits -------------------------------------------------------------------------------------------------


async def test_weighted_90_10_split_over_10000_requests(shared: GatewayProcess) -> None:
    started = time.monotonic()
    answers = await drive(shared.url, "split90", 10_000)
    seconds = time.monotonic() - started
    counts = assert_served_by(answers, VERSION_OF)
    p_value = split_p_value(counts, {"a": 90, "b": 10})
    print(f"\n90/10 over HTTP: {dict(counts)} in {seconds:.1f}s, chi-squared p = {p_value:.4f}")
    assert len(answers) == 10_000
    assert p_value > ALPHA
    assert split_p_value(counts, {"a": 80, "b": 20}) < 1e-6  # control: the test can tell 90/10 from 80/20
    async with admin_client(shared) as client:
        for name, count in counts.items():
            labels = {"endpoint": "split90", "variant": name, "model": "tabular", "version": VERSION_OF[name]}
            assert await metric(client, "gatewatch_requests_total", code="200", **labels) == count
        stats = (await client.get("/admin/endpoints/split90/stats")).json()
    assert {name: v["requests"] for name, v in stats["variants"].items()} == dict(counts)


async def test_three_way_50_30_20_split(shared: GatewayProcess) -> None:
    answers = await drive(shared.url, "split3", 3000)
    counts = assert_served_by(answers, {"a": "1", "b": "2", "c": "2"})  # c: tabular latest = 2
    p_value = split_p_value(counts, {"a": 50, "b": 30, "c": 20})
    print(f"\n50/30/20 over HTTP: {dict(counts)}, chi-squared p = {p_value:.4f}")
    assert p_value > ALPHA
    assert split_p_value(counts, {"a": 1, "b": 1, "c": 1}) < 1e-6


# -- sticky -------------------------------------------------------------------------------------------------

USERS = 1000


def user_of(index: int) -> str:
    return f"user-{index % USERS}"


def assignments(answers: list[Answer]) -> dict[str, str]:
    """user -> its variant, after checking each user got exactly one variant."""
    seen: dict[str, set[str]] = defaultdict(set)
    for answer in answers:
        assert answer.variant is not None
        seen[user_of(answer.index)].add(answer.variant)
    split = {user: names for user, names in seen.items() if len(names) > 1}
    assert not split, f"{len(split)} users were served by several variants, e.g. {list(split.items())[:3]}"
    return {user: names.pop() for user, names in seen.items()}


async def test_sticky_keys_stay_put_and_weight_change_moves_few(shared: GatewayProcess) -> None:
    def by_user(index: int) -> dict[str, str]:
        return {"x-user-id": user_of(index)}

    before_answers = await drive(shared.url, "sticky", USERS * 5, headers=by_user)
    assert_served_by(before_answers, VERSION_OF)
    before = assignments(before_answers)
    assert len(before) == USERS
    assert split_p_value(Counter(before.values()), {"a": 50, "b": 50}) > ALPHA

    async with admin_client(shared) as client:
        route = {
            "variants": [variant("a", "champion", 60), variant("b", "challenger", 40)],
            "sticky": "header:x-user-id",
        }
        response = await client.put("/admin/endpoints/sticky", json=route)
        assert response.status_code == 200, response.text
        assert (await client.get("/admin/endpoints/sticky")).json()["variants"][0]["weight"] == 60

    after_answers = await drive(shared.url, "sticky", USERS * 2, headers=by_user)
    assert_served_by(after_answers, VERSION_OF)
    after = assignments(after_answers)
    moved = {user: (before[user], after[user]) for user in before if before[user] != after[user]}
    share = len(moved) / USERS
    print(f"\nsticky over HTTP, 50/50 -> 60/40: {share:.1%} of {USERS} users moved")
    assert share <= 0.15
    assert share >= 0.04  # the new weights did take effect (about 10 % must move)
    assert set(moved.values()) == {("b", "a")}  # only keys that b gave up move, and only to a


async def test_sticky_by_request_id(shared: GatewayProcess) -> None:
    answers = await drive(shared.url, "byid", 200, headers=lambda i: {"x-request-id": f"req-{i % 40}"})
    assert_served_by(answers, VERSION_OF)
    per_id: dict[str, set[str | None]] = defaultdict(set)
    for answer in answers:
        assert answer.request_id == f"req-{answer.index % 40}"
        per_id[answer.request_id].add(answer.variant)
    assert all(len(names) == 1 for names in per_id.values()), per_id
    assert {n for names in per_id.values() for n in names} == {"a", "b"}


async def test_sticky_by_request_id_uses_the_body_id_without_the_header(shared: GatewayProcess) -> None:
    """tritonclient's `request_id=` sets the body's `id`, not `x-request-id`: that id is the key then, so one id
    keeps one variant (the generated `x-request-id` of each request would scatter it)."""
    row = np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 32)

    def with_id(index: int) -> bytes:
        payload = orjson.loads(infer_body(row))
        payload["id"] = f"body-{index % 40}"
        return orjson.dumps(payload)

    answers = await drive(shared.url, "byid", 200, body=with_id)
    per_id: dict[str, set[str | None]] = defaultdict(set)
    for answer in answers:
        per_id[f"body-{answer.index % 40}"].add(answer.variant)
    assert all(len(names) == 1 for names in per_id.values()), per_id
    assert {n for names in per_id.values() for n in names} == {"a", "b"}
    assert len({answer.request_id for answer in answers}) == 200  # the x-request-id is still generated per request
    # An empty x-request-id header is no header (it is not the request id either): the body's id still keys.
    empty_header = await drive(shared.url, "byid", 40, headers=lambda i: {"x-request-id": ""}, body=with_id)
    for answer in empty_header:
        assert answer.variant in per_id[f"body-{answer.index % 40}"]


# -- shadows ------------------------------------------------------------------------------------------------


async def test_shadow_never_answers_and_logs_one_record_per_request(
    shared: GatewayProcess, redis_server: RedisServer
) -> None:
    rows = np.random.default_rng(17).normal(size=(300, 1, 32)).astype(np.float32)
    answers = await drive(
        shared.url, "mirrored", 300, concurrency=8,
        headers=lambda i: {"x-request-id": f"mirror-{i}"}, body=lambda i: infer_body(rows[i]),
    )
    assert assert_served_by(answers, {"a": "1"}) == Counter({"a": 300})  # never s1 (version 2) nor s0
    ids = {f"mirror-{i}" for i in range(300)}

    store = redis.Redis(port=redis_server.port, db=DB_SHARED)

    async def settled() -> list[dict[str, str]] | None:
        entries = log_entries(store, "mirrored")
        shadows = [e for e in entries if e["role"] == "shadow"]
        return entries if len(shadows) >= 300 and len(entries) >= 600 else None

    entries = await eventually(settled, 20, "one shadow record per request in gatewatch:log:mirrored")
    primary = {e["id"]: e for e in entries if e["role"] == "primary"}
    shadow = {e["id"]: e for e in entries if e["role"] == "shadow"}
    assert len(entries) == 600
    assert set(primary) == ids and set(shadow) == ids  # one each, sharing the request id
    for request_id, record in shadow.items():
        assert (record["variant"], record["model"], record["version"]) == ("s1", "tabular", "2")
        assert record["status"] == "200"
        assert record["endpoint"] == "mirrored"
        assert record["inputs"] == primary[request_id]["inputs"]
        assert (primary[request_id]["variant"], primary[request_id]["version"]) == ("a", "1")

    def label(record: dict[str, str]) -> list[int]:
        return next(t["data"] for t in orjson.loads(record["outputs"]) if t["name"] == "label")

    disagreeing = sum(label(primary[i]) != label(shadow[i]) for i in ids)
    async with admin_client(shared) as client:
        assert await metric(client, "gatewatch_shadow_requests_total", endpoint="mirrored", variant="s1") == 300
        assert await metric(client, "gatewatch_shadow_requests_total", endpoint="mirrored", variant="s0") == 0
        assert await metric(client, "gatewatch_shadow_skipped_total", endpoint="mirrored") == 0
        measured = await metric(client, "gatewatch_shadow_disagreements_total", endpoint="mirrored", variant="s1")
    print(f"\nshadow s1 (tabular v2) disagreed with the primary on {disagreeing} of 300 requests")
    assert 0 < disagreeing < 300  # two different models on random rows: some of each
    assert measured == disagreeing
    store.close()


async def test_slow_shadow_is_skipped_not_queued(
    registry: Path, redis_server: RedisServer, tmp_path: Path, launch: Callable[[Path], GatewayProcess]
) -> None:
    route: dict[str, Any] = {"variants": [variant("a", 1)]}
    config = gateway_config(
        tmp_path / "slow", registry, redis_db(redis_server, DB_SLOW_SHADOW), {"slowshadow": route},
        shadow_max_in_flight=2,
    )
    gateway = await asyncio.to_thread(launch, config)
    async with admin_client(gateway) as client:
        await drive(gateway.url, "slowshadow", 50, concurrency=8)  # warm-up
        route = {"variants": [variant("a", 1, 2)]}  # another route: fresh statistics, warm-up excluded
        response = await client.put("/admin/endpoints/slowshadow", json=route)
        assert response.status_code == 200, response.text
        without = await drive(gateway.url, "slowshadow", 400, concurrency=8)
        stats_without = (await client.get("/admin/endpoints/slowshadow/stats")).json()["variants"]["a"]

        shadowed = route | {"shadow": [{"name": "slow", "model": "slow32", "version": 1, "sample": 1.0}]}
        response = await client.put("/admin/endpoints/slowshadow", json=shadowed)
        assert response.status_code == 200, response.text
        with_shadow = await drive(gateway.url, "slowshadow", 400, concurrency=8)
        stats_with = (await client.get("/admin/endpoints/slowshadow/stats")).json()["variants"]["a"]

        assert assert_served_by(without, {"a": "1"}) == Counter({"a": 400})
        assert assert_served_by(with_shadow, {"a": "1"}) == Counter({"a": 400})  # every primary answered, 200
        print(
            f"\nprimary p99 without shadow: {p99(without):.2f} ms (client), {stats_without['p99_ms']:.2f} ms (gateway);"
            f" with slow shadow (max 2 in flight): {p99(with_shadow):.2f} ms (client),"
            f" {stats_with['p99_ms']:.2f} ms (gateway)"
        )
        labels = {"endpoint": "slowshadow", "variant": "slow"}
        assert await metric(client, "gatewatch_shadow_requests_total", **labels) == 400
        skipped = await metric(client, "gatewatch_shadow_skipped_total", **labels)
        print(f"slow shadow: {skipped:.0f} of 400 skipped")
        assert skipped > 0

        store = redis.Redis(port=redis_server.port, db=DB_SLOW_SHADOW)

        async def shadows_accounted() -> list[dict[str, str]] | None:
            # Each sampled shadow is either skipped before it starts or runs and is logged (one refused by a
            # full queue is both), so the sum reaches the number sampled once the last one is done.
            records = [e for e in log_entries(store, "slowshadow") if e["role"] == "shadow"]
            done = len(records) + await metric(client, "gatewatch_shadow_skipped_total", **labels)
            return records if done >= 400 else None

        records = await eventually(shadows_accounted, 30, "every slow shadow logged or counted as skipped")
        store.close()
    primary_ids = {a.request_id for a in with_shadow}
    assert 0 < len(records) < 400
    assert len({r["id"] for r in records}) == len(records)
    assert {r["id"] for r in records} <= primary_ids
    assert {(r["variant"], r["model"], r["version"]) for r in records} == {("slow", "slow32", "1")}


# -- bandit -------------------------------------------------------------------------------------------------


async def test_bandit_learns_from_feedback_rewards(shared: GatewayProcess, redis_server: RedisServer) -> None:
    success = {"a": 0.1, "b": 0.9}  # the second variant is the better one
    rng = random.Random(20240501)
    feedback_statuses: Counter[int] = Counter()

    async def reward(session: aiohttp.ClientSession, answer: Answer) -> None:
        assert answer.variant is not None
        value = 1.0 if rng.random() < success[answer.variant] else 0.0
        async with session.post(
            "/v2/models/bandit/feedback", json={"id": answer.request_id, "reward": value}
        ) as response:
            feedback_statuses[response.status] += 1
            assert await response.json() == {"accepted": True}

    answers = await drive(shared.url, "bandit", 2000, concurrency=4, after=reward)
    counts = assert_served_by(answers, VERSION_OF)
    assert feedback_statuses == Counter({200: 2000})
    share = Counter(a.variant for a in answers[-500:])["b"] / 500
    print(f"\nbandit over HTTP: {dict(counts)}; better variant's share of the last 500: {share:.1%}")
    assert share > 0.8
    async with admin_client(shared) as client:
        stats = (await client.get("/admin/endpoints/bandit/stats")).json()
    assert stats["strategy"] == "bandit"
    for name, values in stats["variants"].items():
        assert set(values) == {"requests", "errors", "p50_ms", "p99_ms", "reward_mean", "pulls"}
        assert values["pulls"] == values["requests"] == counts[name]
        assert values["errors"] == 0
        assert values["reward_mean"] == pytest.approx(success[name], abs=0.1)
    store = redis.Redis(port=redis_server.port, db=DB_SHARED)
    assert store.xlen("gatewatch:feedback:bandit") == 2000
    store.close()


# -- replicas ----------------------------------------------------------------------------------------------


async def test_two_gateways_share_routes_through_redis(
    registry: Path, redis_server: RedisServer, tmp_path: Path, launch: Callable[[Path], GatewayProcess]
) -> None:
    url = redis_db(redis_server, DB_PAIR)
    # Only pub/sub can deliver the change within the budget: the periodic resync is far away.
    configs = [
        gateway_config(tmp_path / name, registry, url, {"pair": AB}, route_resync_seconds=300)
        for name in ("one", "two")
    ]
    one, two = await asyncio.gather(*(asyncio.to_thread(launch, config) for config in configs))
    new_route = {"variants": [variant("c", "challenger")]}
    async with admin_client(one) as first, admin_client(two) as second:
        for client in (first, second):
            assert (await client.get("/admin/endpoints/pair")).json()["variants"][0]["name"] == "a"

        started = time.monotonic()
        response = await first.put("/admin/endpoints/pair", json=new_route)
        assert response.status_code == 200, response.text
        stored = response.json()

        async def second_serves_new_route() -> bool:
            if (await second.get("/admin/endpoints/pair")).json() != stored:
                return False
            answer = await second.post("/v2/models/pair/infer", content=FIXED_BODY, headers=JSON)
            return answer.headers["x-gatewatch-variant"] == "c"

        await eventually(second_serves_new_route, 1.0, "the other gateway serving the new route")
        print(f"\nroute change seen and served by the other gateway after {time.monotonic() - started:.3f}s")
    served = await drive(two.url, "pair", 50)
    assert assert_served_by(served, {"c": "2"}) == Counter({"c": 50})

    await asyncio.to_thread(two.terminate)
    restarted = await asyncio.to_thread(launch, configs[1])  # its config file still says a/b
    async with admin_client(restarted) as client:
        assert (await client.get("/admin/endpoints/pair")).json() == stored
        assert (await client.get("/admin/endpoints")).json() == {"endpoints": {"pair": stored}}
    served = await drive(restarted.url, "pair", 50)
    assert assert_served_by(served, {"c": "2"}) == Counter({"c": 50})


async def test_feedback_sent_to_another_gateway_reaches_the_bandit_that_answered(
    registry: Path, redis_server: RedisServer, tmp_path: Path, launch: Callable[[Path], GatewayProcess]
) -> None:
    """Replicas behind a load balancer: the request goes to one, its feedback to another. The one that answered
    (and remembers which variant did) gets the reward through Redis."""
    url = redis_db(redis_server, DB_RELAY)
    bandit = {"strategy": "bandit", "variants": [variant("a", 1), variant("b", 2)]}
    one, two = await asyncio.gather(*(
        asyncio.to_thread(launch, gateway_config(tmp_path / name, registry, url, {"relayed": bandit}))
        for name in ("one", "two")
    ))
    answers = await drive(one.url, "relayed", 60, concurrency=4)
    rewards = {"a": 0.0, "b": 1.0}
    async with httpx.AsyncClient(base_url=two.url, timeout=30) as other:
        for answer in answers:
            assert answer.variant is not None
            sent = await other.post("/v2/models/relayed/feedback",
                                    json={"id": answer.request_id, "reward": rewards[answer.variant]})
            assert sent.status_code == 200, sent.text
    served = Counter(answer.variant for answer in answers)

    async def rewards_arrived() -> bool:
        async with admin_client(one) as client:
            stats = (await client.get("/admin/endpoints/relayed/stats")).json()["variants"]
        return all(stats[name]["reward_mean"] is not None for name in served)

    await eventually(rewards_arrived, 10.0, "every relayed reward credited on the gateway that answered")
    async with admin_client(one) as client:
        stats = (await client.get("/admin/endpoints/relayed/stats")).json()["variants"]
    for name in served:
        assert stats[name]["pulls"] == served[name]
        assert stats[name]["reward_mean"] == pytest.approx(rewards[name])
    async with admin_client(two) as client:  # the other gateway's own bandit answered nothing and learned nothing
        idle = (await client.get("/admin/endpoints/relayed/stats", params={"scope": "process"})).json()["variants"]
    assert all(values["pulls"] == 0 and values["reward_mean"] is None for values in idle.values())


# -- admin API: 401 and 422 ---------------------------------------------------------------------------------

ADMIN_CALLS: list[tuple[str, str]] = [
    ("GET", "/admin/endpoints"),
    ("GET", "/admin/endpoints/locked"),
    ("PUT", "/admin/endpoints/locked"),
    ("DELETE", "/admin/endpoints/locked"),
    ("GET", "/admin/endpoints/locked/stats"),
]
HIJACK = {"variants": [variant("x", "challenger")]}


async def assert_old_route_serves(gateway: GatewayProcess, endpoint: str, route: dict[str, Any]) -> None:
    async with admin_client(gateway) as client:
        got = await client.get(f"/admin/endpoints/{endpoint}")
    assert got.status_code == 200 and got.json()["variants"] == route["variants"]
    answers = await drive(gateway.url, endpoint, 20, concurrency=4)
    assert set(assert_served_by(answers, VERSION_OF)) <= {"a", "b"}


async def test_admin_api_needs_the_bearer_token(shared: GatewayProcess) -> None:
    wrong_headers: dict[str, dict[str, str]] = {
        "no token": {},
        "wrong token": {"authorization": "Bearer not-the-token"},
        "token prefix": {"authorization": f"Bearer {TOKEN[:-1]}"},
        "token with suffix": {"authorization": f"Bearer {TOKEN}x"},
        "basic scheme": {"authorization": f"Basic {TOKEN}"},
        "bare token": {"authorization": TOKEN},
    }
    async with httpx.AsyncClient(base_url=shared.url, timeout=30) as client:
        for case, headers in wrong_headers.items():
            for method, path in ADMIN_CALLS:
                response = await client.request(method, path, headers=headers, json=HIJACK)
                assert response.status_code == 401, (case, method, path, response.text)
                assert "error" in response.json()
                assert response.headers["www-authenticate"] == "Bearer"
        right = await client.get("/admin/endpoints/locked", headers=AUTH)
        assert right.status_code == 200
    await assert_old_route_serves(shared, "locked", AB)


async def test_admin_api_without_admin_token_refuses_everything(
    registry: Path, redis_server: RedisServer, tmp_path: Path, launch: Callable[[Path], GatewayProcess]
) -> None:
    config = gateway_config(
        tmp_path / "notoken", registry, redis_db(redis_server, DB_NO_TOKEN), {"locked": AB}, admin_token=None
    )
    assert "admin_token" not in config.read_text()
    gateway = await asyncio.to_thread(launch, config)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
        for headers in ({}, AUTH, {"authorization": "Bearer"}, {"authorization": "Bearer None"}):
            for method, path in ADMIN_CALLS:
                response = await client.request(method, path, headers=headers, json=HIJACK)
                assert response.status_code == 401, (headers, method, path, response.text)
                assert "admin_token" in response.json()["error"]
    answers = await drive(gateway.url, "locked", 20, concurrency=4)
    assert set(assert_served_by(answers, VERSION_OF)) <= {"a", "b"}


def json_body(route: object) -> tuple[bytes, str]:
    return orjson.dumps(route), "application/json"


INVALID_PUTS: dict[str, tuple[bytes, str, str]] = {
    # case: (body, content type, a word the error message must contain)
    "no variants": (*json_body({"variants": []}), "variants"),
    "zero weight": (*json_body({"variants": [variant("x", 1, 0)]}), "weight"),
    "negative weight": (*json_body({"variants": [variant("x", 1, -2)]}), "weight"),
    "infinite weight": (
        b"variants: [{name: x, model: tabular, version: 1, weight: .inf}]", "application/yaml", "weight"
    ),
    "unknown model": (*json_body({"variants": [variant("x", 1, model="no-such-model")]}), "no-such-model"),
    "unknown version": (*json_body({"variants": [variant("x", 9)]}), "9"),
    "unknown alias": (*json_body({"variants": [variant("x", "staging")]}), "staging"),
    "duplicate variant names": (*json_body({"variants": [variant("x", 1), variant("x", 2)]}), "duplicate"),
    "bad sticky syntax": (*json_body({"variants": [variant("x", 1)], "sticky": "cookie:sid"}), "sticky"),
    "weight as a boolean": (*json_body({"variants": [{"name": "x", "model": "tabular", "weight": True}]}), "boolean"),
    "version as a boolean": (*json_body({"variants": [{"name": "x", "model": "tabular", "version": True}]}), "boolean"),
    "sample as a boolean": (
        *json_body({"variants": [variant("x", 1)], "shadow": [{"name": "s", "model": "tabular", "sample": True}]}),
        "boolean",
    ),
    "shadow with other input names": (
        *json_body({"variants": [variant("x", 1)], "shadow": [{"name": "s", "model": "id_fp32", "version": 1}]}),
        "inputs",
    ),
    "shadow with other input types": (
        *json_body({"variants": [variant("x", 1)], "shadow": [{"name": "s", "model": "summer", "version": 1}]}),
        "inputs",
    ),
    "variants with other inputs": (  # a request cannot suit both: part of the traffic would fail with 400
        *json_body({"variants": [variant("x", 1), variant("y", 1, model="id_fp32")]}), "inputs differ",
    ),
    "bandit of one variant": (*json_body({"variants": [variant("x", 1)], "strategy": "bandit"}), "two variants"),
    "sticky bandit": (
        *json_body({"variants": [variant("x", 1), variant("y", 2)], "strategy": "bandit", "sticky": "id"}), "sticky",
    ),
    "unknown field": (*json_body({"variants": [variant("x", 1)], "mirror": []}), "mirror"),
    "invalid JSON": (b'{"variants": [', "application/json", "JSON"),
    "JSON that is not a route": (b"[1, 2]", "application/json", "route"),
    "invalid YAML": (b"variants: [unclosed", "application/yaml", "YAML"),
}


@pytest.mark.parametrize("case", list(INVALID_PUTS))
async def test_invalid_route_is_refused_with_422_and_old_route_kept(shared: GatewayProcess, case: str) -> None:
    body, content_type, mentioned = INVALID_PUTS[case]
    async with admin_client(shared) as client:
        response = await client.put("/admin/endpoints/guarded", content=body, headers={"content-type": content_type})
    assert response.status_code == 422, response.text
    assert mentioned in response.json()["error"]
    await assert_old_route_serves(shared, "guarded", AB)


async def test_invalid_endpoint_name_is_refused(shared: GatewayProcess) -> None:
    async with admin_client(shared) as client:
        response = await client.put("/admin/endpoints/-dash-first", json=HIJACK)
        assert response.status_code == 422
        assert (await client.get("/admin/endpoints/-dash-first")).status_code == 404
        assert "-dash-first" not in (await client.get("/admin/endpoints")).json()["endpoints"]


async def test_yaml_route_body_is_accepted(shared: GatewayProcess) -> None:
    yaml_route = (
        b"variants:\n"
        b"  - {name: y1, model: tabular, version: challenger, weight: 3}\n"
        b"  - {name: y2, model: tabular, version: 1, weight: 1}\n"
        b"sticky: header:x-user-id\n"
    )
    async with admin_client(shared) as client:
        response = await client.put(
            "/admin/endpoints/yamled", content=yaml_route, headers={"content-type": "application/yaml"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["variants"] == [variant("y1", "challenger", 3), variant("y2", 1, 1)]
        assert (await client.get("/admin/endpoints/yamled")).json() == response.json()
    answers = await drive(shared.url, "yamled", 200, headers=lambda i: {"x-user-id": f"u{i % 20}"})
    counts = assert_served_by(answers, {"y1": "2", "y2": "1"})
    assert set(counts) == {"y1", "y2"}


# -- statistics ---------------------------------------------------------------------------------------------


async def test_stats_and_request_metric_per_variant(shared: GatewayProcess) -> None:
    good = await drive(shared.url, "statsep", 300)
    bad_row = orjson.dumps({"inputs": [{"name": "input", "shape": [1, 32], "datatype": "FP32", "data": [1.0] * 31}]})
    bad = await drive(shared.url, "statsep", 20, concurrency=4, body=lambda i: bad_row)
    counts = assert_served_by(good, VERSION_OF)
    assert [a.status for a in bad] == [400] * 20
    async with admin_client(shared) as client:
        stats = (await client.get("/admin/endpoints/statsep/stats")).json()
        assert stats["endpoint"] == "statsep" and stats["strategy"] == "weighted"
        variants = stats["variants"]
        assert set(variants) == {"a", "b"}
        for name, values in variants.items():
            assert set(values) == {"requests", "errors", "p50_ms", "p99_ms"}
            assert values["requests"] - values["errors"] == counts[name]
            assert 0 < values["p50_ms"] <= values["p99_ms"]
            labels = {"endpoint": "statsep", "variant": name, "model": "tabular", "version": VERSION_OF[name]}
            assert await metric(client, "gatewatch_requests_total", code="200", **labels) == counts[name]
            assert await metric(client, "gatewatch_requests_total", code="400", **labels) == values["errors"]
        assert sum(v["errors"] for v in variants.values()) == 20
        assert sum(v["requests"] for v in variants.values()) == 320
        assert (await client.get("/admin/endpoints/no-such-endpoint/stats")).status_code == 404


# -- deletion -----------------------------------------------------------------------------------------------


async def test_delete_removes_endpoint_and_restart_does_not_resurrect_it(
    registry: Path, redis_server: RedisServer, tmp_path: Path, launch: Callable[[Path], GatewayProcess]
) -> None:
    endpoints = {"fraud": AB, "tabular": {"variants": [variant("new", "challenger")]}}  # "tabular" is also a model
    config = gateway_config(tmp_path / "delete", registry, redis_db(redis_server, DB_DELETE), endpoints)
    gateway = await asyncio.to_thread(launch, config)
    assert set(assert_served_by(await drive(gateway.url, "fraud", 20, 4), VERSION_OF)) <= {"a", "b"}
    assert assert_served_by(await drive(gateway.url, "tabular", 10, 4), {"new": "2"}) == Counter({"new": 10})

    async with admin_client(gateway) as client:
        for endpoint in ("fraud", "tabular"):
            response = await client.delete(f"/admin/endpoints/{endpoint}")
            assert response.status_code == 200 and response.json() == {"deleted": endpoint}
        assert (await client.delete("/admin/endpoints/fraud")).status_code == 404
        assert (await client.get("/admin/endpoints/fraud")).status_code == 404
        assert (await client.get("/admin/endpoints")).json() == {"endpoints": {}}

    async def check_deleted(gateway: GatewayProcess) -> None:
        gone = await drive(gateway.url, "fraud", 5, 1)
        assert [a.status for a in gone] == [404] * 5
        fallback = await drive(gateway.url, "tabular", 10, 4)  # the model of that name, by its champion
        assert assert_served_by(fallback, {"default": "1"}) == Counter({"default": 10})

    await check_deleted(gateway)
    await asyncio.to_thread(gateway.terminate)
    restarted = await asyncio.to_thread(launch, config)  # the config file still has both endpoints
    await check_deleted(restarted)
    async with admin_client(restarted) as client:
        assert (await client.get("/admin/endpoints")).json() == {"endpoints": {}}
        assert (await client.put("/admin/endpoints/fraud", json=AB)).status_code == 200  # can be re-created
    assert set(assert_served_by(await drive(restarted.url, "fraud", 20, 4), VERSION_OF)) <= {"a", "b"}


async def test_a_redis_that_lost_its_data_gets_the_served_routes_back(
    registry: Path, redis_server: RedisServer, tmp_path: Path, launch: Callable[[Path], GatewayProcess]
) -> None:
    """Redis restarted without persistence: the gateway keeps serving what it served (the admin's latest routes,
    not the config file's, and not what the admin deleted) and writes it back for the other replicas."""
    url = redis_db(redis_server, DB_WIPED)
    endpoints = {"kept": AB, "dropped": AB}
    gateway = await asyncio.to_thread(
        launch, gateway_config(tmp_path / "wiped", registry, url, endpoints, route_resync_seconds=0.2)
    )
    changed = {"variants": [variant("only", "challenger")]}
    async with admin_client(gateway) as client:
        assert (await client.put("/admin/endpoints/kept", json=changed)).status_code == 200
        assert (await client.delete("/admin/endpoints/dropped")).status_code == 200
    wiped = redis.Redis.from_url(url)
    wiped.flushdb()

    async def routes_written_back() -> bool:
        return wiped.hkeys("gatewatch:routes") == [b"kept"]

    await eventually(routes_written_back, 10.0, "the served routes written back to the emptied redis")
    assert orjson.loads(wiped.hget("gatewatch:routes", "kept") or b"{}")["variants"][0]["name"] == "only"
    wiped.close()
    served = await drive(gateway.url, "kept", 10, 2)
    assert assert_served_by(served, {"only": "2"}) == Counter({"only": 10})
    assert [a.status for a in await drive(gateway.url, "dropped", 3, 1)] == [404] * 3


# -- CLI ----------------------------------------------------------------------------------------------------


def cli(*args: str, token: str | None = TOKEN, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GATEWATCH_ADMIN_TOKEN"}
    if token is not None:
        env["GATEWATCH_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "routes", *args], capture_output=True, text=True, env=env, timeout=60,
        input=stdin,
    )


def test_cli_routes_set_and_get(shared: GatewayProcess, tmp_path: Path) -> None:
    route_file = tmp_path / "route.yaml"
    route_file.write_text(
        "variants:\n"
        "  - {name: blue, model: tabular, version: champion, weight: 1}\n"
        "  - {name: green, model: tabular, version: challenger, weight: 1}\n"
        "sticky: header:x-user-id\n"
    )
    done = cli("set", "clinew", "--file", str(route_file), "--url", shared.url)
    assert done.returncode == 0, done.stderr
    assert "applied" in done.stderr
    printed = yaml.safe_load(done.stdout)
    assert printed["variants"] == [variant("blue", "champion"), variant("green", "challenger")]
    assert printed["sticky"] == "header:x-user-id"

    with httpx.Client(base_url=shared.url, timeout=30) as client:
        assert client.get("/admin/endpoints/clinew", headers=AUTH).json() == printed
        served: Counter[str] = Counter()
        for user in range(30):
            headers = JSON | {"x-user-id": f"user-{user}"}
            response = client.post("/v2/models/clinew/infer", content=FIXED_BODY, headers=headers)
            assert response.status_code == 200
            served[response.headers["x-gatewatch-variant"]] += 1
        assert set(served) == {"blue", "green"}

    got = cli("get", "clinew", "--url", shared.url)
    assert got.returncode == 0, got.stderr
    assert yaml.safe_load(got.stdout) == printed
    everything = cli("get", "--url", shared.url)
    assert everything.returncode == 0, everything.stderr
    assert yaml.safe_load(everything.stdout)["endpoints"]["clinew"] == printed

    json_file = tmp_path / "route.json"
    json_file.write_bytes(orjson.dumps({"variants": [variant("teal", 2)]}))
    assert cli("set", "clinew", str(json_file), "--url", shared.url).returncode == 0  # the file as an argument
    assert yaml.safe_load(cli("get", "clinew", "--url", shared.url).stdout)["variants"] == [variant("teal", 2)]
    piped = cli("set", "clinew", "-", "--url", shared.url, stdin="variants: [{name: navy, model: tabular, version: 1}]")
    assert piped.returncode == 0, piped.stderr
    assert yaml.safe_load(piped.stdout)["variants"] == [variant("navy", 1)]
    tabbed_json = '{\n\t"variants": [{"name": "cyan", "model": "tabular", "version": 1}]\n}'  # not YAML: tabs
    piped_json = cli("set", "clinew", "-", "--url", shared.url, stdin=tabbed_json)
    assert piped_json.returncode == 0, piped_json.stderr
    assert yaml.safe_load(piped_json.stdout)["variants"] == [variant("cyan", 1)]
    assert cli("set", "clinew", str(json_file), "--url", shared.url).returncode == 0
    no_file = cli("set", "clinew", "--url", shared.url)
    assert no_file.returncode == 2 and "route file" in no_file.stderr

    refused = cli("get", "clinew", "--url", shared.url, token=None)
    assert refused.returncode == 1 and "401" in refused.stderr
    wrong = cli("set", "clinew", "--file", str(route_file), "--url", shared.url, token="wrong")
    assert wrong.returncode == 1 and "401" in wrong.stderr
    invalid_file = tmp_path / "invalid.yaml"
    invalid_file.write_text("variants:\n  - {name: x, model: no-such-model}\n")
    invalid = cli("set", "clinew", "--file", str(invalid_file), "--url", shared.url)
    assert invalid.returncode == 1 and "422" in invalid.stderr
    assert yaml.safe_load(cli("get", "clinew", "--url", shared.url).stdout)["variants"] == [variant("teal", 2)]


def test_a_routes_shadow_series_exist_at_zero_before_any_shadow_runs() -> None:
    """Dashboards divide skipped or disagreeing shadows by shadow requests: 'no data' until the first one hides
    that a shadow is configured at all."""
    metrics = GatewayMetrics(CollectorRegistry())
    mirror = ShadowMirror(
        cast(ModelManager, None), ShadowMetrics(metrics.shadow_requests, metrics.shadow_skipped,
                                                 metrics.shadow_disagreements), max_in_flight=1
    )
    router = Router(PayloadPolicy(), on_apply=mirror.announce)
    route = Route.model_validate({"variants": [variant("a", 1)], "shadow": [{"name": "s", "model": "tabular"}]})
    router.apply("mirrored", route)
    for name in ("requests", "skipped", "disagreements"):
        value = metrics.registry.get_sample_value(f"gatewatch_shadow_{name}_total", {"endpoint": "mirrored",
                                                                                     "variant": "s"})
        assert value == 0.0, name


def test_yaml_numbers_without_a_decimal_point_are_numbers() -> None:
    """YAML 1.1 reads `1e-6` (design.md's own tolerance default) as a string: it must still parse as a number,
    in an admin PUT and in the config file's `endpoints:` alike."""
    document = yaml.safe_load(
        "variants: [{name: a, model: tabular, weight: 1e2}]\n"
        "shadow: [{name: s, model: tabular, tolerance: 1e-6, sample: 5e-1}]\n"
    )
    assert isinstance(document["shadow"][0]["tolerance"], str)  # what makes this case different
    route = Route.model_validate(document)
    assert route.variants[0].weight == 100.0
    assert (route.shadow[0].tolerance, route.shadow[0].sample) == (1e-6, 0.5)


async def test_admin_change_redis_did_not_confirm_says_whether_it_may_still_apply(
    registry: Path, tmp_path: Path, launch: Callable[[Path], GatewayProcess]
) -> None:
    """A timeout is not a refusal: a PUT sent to a Redis that is stalled (DEBUG SLEEP) may still be applied when
    it wakes, so the client is told the outcome is unknown; with Redis down, nothing changed and the old route
    serves on."""
    (tmp_path / "redis").mkdir()
    own = RedisServer(free_port(), tmp_path / "redis")
    own.start()
    try:
        config = gateway_config(tmp_path / "gw", registry, own.url, {"ep": AB}, redis_timeout_seconds=0.5)
        gateway = await asyncio.to_thread(launch, config)
        changed = {"variants": [variant("only", "challenger")]}
        async with admin_client(gateway) as client:
            sleeper = asyncio.create_task(asyncio.to_thread(own.client().execute_command, "DEBUG", "SLEEP", "2"))
            await asyncio.sleep(0.2)  # the scenario: Redis stalls while the PUT is under way
            stalled = await client.put("/admin/endpoints/ep", json=changed)
            assert stalled.status_code == 503, stalled.text
            assert "may still take effect" in stalled.json()["error"]
            await sleeper

            async def applied() -> bool:
                return (await client.get("/admin/endpoints/ep")).json()["variants"][0]["name"] == "only"

            await eventually(applied, 10.0, "the change Redis ran once awake, seen by the gateway")
            await asyncio.to_thread(own.stop)
            down = await client.put("/admin/endpoints/ep", json=AB)
            assert down.status_code == 503 and "nothing changed" in down.json()["error"]
            assert (await client.get("/admin/endpoints/ep")).json()["variants"][0]["name"] == "only"
    finally:
        own.stop()
