"""Per-variant statistics across gateway processes (`gateway/routing/shared_stats.py`).

The arithmetic (log-scale latency histograms, merging) is checked against numpy on exact data; the publishing and
merging against a real Redis, with two routers standing for two processes; and the whole over HTTP, with two real
gateways sharing one Redis, each answering part of an endpoint's traffic.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from redis.asyncio import Redis

from gateway.records import PayloadPolicy
from gateway.routing import shared_stats
from gateway.routing.router import Router
from gateway.routing.shared_stats import (
    SharedVariantStats,
    histogram_percentile,
    latency_histogram,
    merge_snapshots,
    stats_key,
)
from gateway.routing.table import parse_route
from tests.conftest import GatewayProcess, RedisServer
from tests.gateway.test_routing import (  # noqa: F401  (fixtures, requested by name below)
    admin_client,
    drive,
    gateway_config,
    launch,
    redis_db,
    registry,
    variant,
)
from tests.polling import wait_for

DB_SHARED_STATS = 11
AB = {"variants": [variant("a", 1), variant("b", 2)]}


# -- histograms --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_histogram_percentiles_are_within_a_bucket_of_the_exact_ones(seed: int) -> None:
    latencies = np.random.default_rng(seed).lognormal(mean=0.0, sigma=1.5, size=5000)  # ms, over 4 decades
    histogram = latency_histogram(latencies)
    assert sum(histogram.values()) == latencies.size
    for quantile in (0.5, 0.9, 0.99):
        exact = float(np.quantile(latencies, quantile))
        estimate = histogram_percentile(histogram, quantile)
        assert estimate is not None
        assert abs(estimate / exact - 1) <= 0.05, (quantile, exact, estimate)  # buckets are 5 % wide


def test_empty_and_extreme_latencies() -> None:
    assert latency_histogram([]) == {} and histogram_percentile({}, 0.5) is None
    histogram = latency_histogram([0.0, 1e-9, 1e12])  # below the first bucket, above the last: kept, clamped
    assert sum(histogram.values()) == 3
    low, high = histogram_percentile(histogram, 0.0), histogram_percentile(histogram, 1.0)
    assert low is not None and high is not None and low < 0.02 < 1e6 < high


def test_merge_adds_counts_and_weights_rewards_by_how_many_there_were() -> None:
    one = {"variants": {"a": {"requests": 10, "errors": 1, "latency": latency_histogram([1.0] * 10),
                              "pulls": 10, "reward_sum": 2.0, "reward_count": 4}}}
    two = {"variants": {"a": {"requests": 30, "errors": 0, "latency": latency_histogram([100.0] * 30),
                              "pulls": 30, "reward_sum": 6.0, "reward_count": 6}}}
    merged = merge_snapshots([one, two], ["a"])["a"]
    assert (merged["requests"], merged["errors"], merged["pulls"]) == (40, 1, 40)
    assert merged["reward_mean"] == pytest.approx(8.0 / 10)  # not the mean of the two means (0.75)
    assert merged["p50_ms"] == pytest.approx(100.0, rel=0.05) and merged["p99_ms"] == pytest.approx(100.0, rel=0.05)


# -- publishing and merging over a real Redis ------------------------------------------------------------------


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_db(redis_server, DB_SHARED_STATS))
    yield client
    await client.aclose()


def process_with(route: dict[str, object], traffic: dict[str, list[tuple[int, float]]]) -> Router:
    """A router standing for one gateway process: `route` applied, `traffic` (status, latency) recorded."""
    router = Router(PayloadPolicy())
    router.apply("ep", parse_route("ep", route))
    compiled = router.get("ep")
    assert compiled is not None
    for name, requests in traffic.items():
        for status, latency_ms in requests:
            compiled.stats[name].record(status, latency_ms)
    return router


async def test_each_process_sees_every_process_traffic(redis_client: Redis) -> None:
    first = process_with(AB, {"a": [(200, 1.0)] * 6, "b": [(500, 2.0)] * 2})
    second = process_with(AB, {"a": [(200, 1.0)] * 4, "b": [(200, 2.0)] * 8})
    shares = [SharedVariantStats(redis_client, router, timeout=5) for router in (first, second)]
    for share in shares:
        await share.publish()
    for share in shares:
        stats = await share.stats("ep")
        assert stats is not None and stats["processes"] == 2
        counts = {name: (v["requests"], v["errors"]) for name, v in stats["variants"].items()}
        assert counts == {"a": (10, 0), "b": (10, 2)}
        assert stats["variants"]["b"]["p50_ms"] == pytest.approx(2.0, rel=0.05)
    # Leaving withdraws the snapshot: the other process is alone again, with exactly its own figures.
    await shares[1].aclose()
    alone = await shares[0].stats("ep")
    assert alone is not None and alone["processes"] == 1 and alone["variants"]["a"]["requests"] == 6
    assert alone["variants"]["a"]["p50_ms"] == 1.0  # alone: exact percentiles


async def test_processes_on_another_route_or_gone_quiet_are_left_out(redis_client: Redis) -> None:
    here = SharedVariantStats(redis_client, process_with(AB, {"a": [(200, 1.0)]}), timeout=5, interval=0.5)
    elsewhere = process_with({"variants": [variant("a", 1, 30), variant("b", 2, 70)]}, {"a": [(200, 1.0)] * 50})
    await SharedVariantStats(redis_client, elsewhere, timeout=5).publish()  # weights changed: another route
    stats = await here.stats("ep")
    assert stats is not None and stats["processes"] == 1 and stats["variants"]["a"]["requests"] == 1

    quiet = process_with(AB, {"a": [(200, 1.0)] * 7})
    await SharedVariantStats(redis_client, quiet, timeout=5).publish()
    snapshots = await redis_client.hgetall(stats_key("ep"))  # type: ignore[misc]
    aged = 0
    for process, raw in snapshots.items():  # age the quiet process's snapshot: 20 s old (stale after 5 s)
        snapshot = orjson.loads(raw)
        if snapshot["variants"]["a"]["requests"] == 7:
            snapshot["at"] -= 20_000
            await redis_client.hset(stats_key("ep"), process, orjson.dumps(snapshot))  # type: ignore[misc]
            aged += 1
    assert aged == 1
    stats = await here.stats("ep")
    assert stats is not None and stats["processes"] == 1
    forgotten_before = await redis_client.hlen(stats_key("ep"))  # type: ignore[misc]
    for process, raw in (await redis_client.hgetall(stats_key("ep"))).items():  # type: ignore[misc]
        snapshot = orjson.loads(raw)
        snapshot["at"] -= 3_600_000  # an hour: long gone, so readers delete it
        await redis_client.hset(stats_key("ep"), process, orjson.dumps(snapshot))  # type: ignore[misc]
    await here.stats("ep")
    assert forgotten_before == 2 and await redis_client.hlen(stats_key("ep")) == 0  # type: ignore[misc]


async def test_a_process_without_traffic_leaves_the_exact_figures_alone(redis_client: Redis) -> None:
    busy = SharedVariantStats(redis_client, process_with(AB, {"a": [(200, 1.0)] * 49 + [(200, 5000.0)]}), timeout=5)
    await SharedVariantStats(redis_client, process_with(AB, {}), timeout=5).publish()  # an idle worker
    stats = await busy.stats("ep")
    assert stats is not None and stats["processes"] == 1
    assert stats["variants"]["a"]["p99_ms"] == pytest.approx(float(np.percentile([1.0] * 49 + [5000.0], 99)))


async def test_publishing_rebuilds_only_what_moved_and_forgets_dead_processes(
    redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    router = process_with(AB, {"a": [(200, 1.0)] * 3})
    share = SharedVariantStats(redis_client, router, timeout=5)
    dead = {"route": "x", "variants": {}, "at": 0}  # published by a process that died long ago
    await redis_client.hset(stats_key("ep"), "dead-process", orjson.dumps(dead))  # type: ignore[misc]
    built: list[str] = []
    original = shared_stats.build_snapshot
    monkeypatch.setattr(shared_stats, "build_snapshot", lambda raw: built.append(raw[0]) or original(raw))
    await share.publish()
    assert len(built) == 1
    assert await redis_client.hkeys(stats_key("ep")) == [share.process.encode()]  # type: ignore[misc]
    await share.publish()
    assert len(built) == 1  # nothing moved: the last snapshot is sent again, with a new time
    compiled = router.get("ep")
    assert compiled is not None
    compiled.stats["b"].record(200, 2.0)
    await share.publish()
    assert len(built) == 2


async def test_redis_unreachable_answers_with_this_process_alone() -> None:
    unreachable = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    share = SharedVariantStats(unreachable, process_with(AB, {"a": [(200, 3.0)] * 3}), timeout=1)
    stats = await share.stats("ep")
    assert stats is not None and stats["processes"] == 1 and stats["variants"]["a"]["requests"] == 3
    await unreachable.aclose()


# -- two real gateways ------------------------------------------------------------------------------------------


async def test_stats_from_either_gateway_count_the_traffic_of_both(
    registry: Path,  # noqa: F811
    redis_server: RedisServer,
    tmp_path: Path,
    launch: Callable[[Path], GatewayProcess],  # noqa: F811
) -> None:
    url = redis_db(redis_server, DB_SHARED_STATS)
    one, two = await asyncio.gather(*(
        asyncio.to_thread(launch, gateway_config(tmp_path / name, registry, url, {"spread": AB}))
        for name in ("one", "two")
    ))
    served = Counter(a.variant for a in await drive(one.url, "spread", 60, concurrency=4))
    served += Counter(a.variant for a in await drive(two.url, "spread", 40, concurrency=4))
    assert sum(served.values()) == 100

    async def merged(gateway: GatewayProcess) -> Any:
        async with admin_client(gateway) as client:
            response = await client.get("/admin/endpoints/spread/stats")
        assert response.status_code == 200, response.text
        return response.json()

    async def both_counted() -> bool:
        stats = [await merged(g) for g in (one, two)]
        return all(s["processes"] == 2 and sum(v["requests"] for v in s["variants"].values()) == 100 for s in stats)

    await wait_for(both_counted, 15, "each gateway's stats to include the other's traffic")
    for gateway in (one, two):
        variants = (await merged(gateway))["variants"]
        assert {name: v["requests"] for name, v in variants.items()} == dict(served)
    async with admin_client(one) as client:
        own = (await client.get("/admin/endpoints/spread/stats", params={"scope": "process"})).json()
        wrong_scope = await client.get("/admin/endpoints/spread/stats", params={"scope": "everything"})
    assert own["processes"] == 1 and sum(v["requests"] for v in own["variants"].values()) == 60
    assert wrong_scope.status_code == 400 and "scope" in wrong_scope.json()["error"]
    async with admin_client(one, headers={}) as anonymous:  # the token is checked before anything else
        assert (await anonymous.get("/admin/endpoints/spread/stats", params={"scope": "x"})).status_code == 401
