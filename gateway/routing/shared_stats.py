"""SharedVariantStats: one endpoint's per-variant statistics across every gateway process, not just the one asked.

Each process counts its own requests (`router.VariantStats`, bandit arms). With several workers or replicas,
`GET /admin/endpoints/{endpoint}/stats` would show only the share of traffic that the answering process saw. So
every process publishes a snapshot of its routes' statistics to Redis each `interval` (hash
`gatewatch:variant-stats:{endpoint}`, one field per process), and the answer merges the answering process's live
statistics with the other processes' latest snapshots. Latencies travel as log-scale histograms (buckets 5 % wide),
so merged percentiles are within a bucket of the exact ones; a process alone keeps its exact percentiles.

A snapshot counts only while it is fresh (a process that stopped publishing drops out after `stale_after`) and
only for the same route: a process still on the previous route (a PUT reaches processes a moment apart) is left
out, as its statistics describe other variants or weights.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

import numpy as np
import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.cancellation import cancel_and_wait
from gateway.routing.router import Router
from gateway.routing.strategies import BanditChooser

logger = logging.getLogger(__name__)

KEY_PREFIX = "gatewatch:variant-stats:"
SMALLEST_MS = 0.01  # the first latency bucket's lower edge; anything faster lands in it
BUCKET_RATIO = 1.05  # each bucket is 5 % wider than the one before
_LOG_RATIO = math.log(BUCKET_RATIO)
_LAST_BUCKET = 400  # 0.01 ms * 1.05**400 ~ 3 days: anything slower lands in the last bucket


def stats_key(endpoint: str) -> str:
    return f"{KEY_PREFIX}{endpoint}"


def latency_histogram(latencies_ms: Iterable[float]) -> dict[str, int]:
    """Sparse log-scale histogram: bucket index (as a JSON key) -> count."""
    values = np.fromiter(latencies_ms, float)
    if not values.size:
        return {}
    indices = np.floor(np.log(np.maximum(values, SMALLEST_MS) / SMALLEST_MS) / _LOG_RATIO).astype(np.int64)
    counts = np.bincount(np.minimum(indices, _LAST_BUCKET))
    return {str(i): int(n) for i, n in enumerate(counts) if n}


def histogram_percentile(histogram: Mapping[str, int], quantile: float) -> float | None:
    """The latency (ms) at `quantile` (0..1): the geometric middle of the bucket the quantile falls in."""
    total = sum(histogram.values())
    if not total:
        return None
    rank = quantile * (total - 1)
    seen = 0
    for index in sorted(histogram, key=int):
        seen += histogram[index]
        if seen > rank:
            return _bucket_middle(int(index))
    return _bucket_middle(max(int(i) for i in histogram))


def _bucket_middle(index: int) -> float:
    return float(SMALLEST_MS * BUCKET_RATIO ** (index + 0.5))


def snapshot_of(router: Router, endpoint: str) -> dict[str, Any] | None:
    """What this process publishes of one endpoint: its route's fingerprint and per-variant counts."""
    compiled = router.get(endpoint)
    if compiled is None:
        return None
    variants: dict[str, Any] = {}
    for index, variant in enumerate(compiled.route.variants):
        stats = compiled.stats[variant.name]
        part: dict[str, Any] = {
            "requests": stats.requests, "errors": stats.errors, "latency": latency_histogram(stats.latencies_ms)
        }
        if isinstance(compiled.chooser, BanditChooser):
            arm = compiled.chooser.arms[index]
            part |= {"pulls": arm.pulls, "reward_sum": arm.reward_sum, "reward_count": arm.reward_count}
        variants[variant.name] = part
    return {"route": compiled.fingerprint, "variants": variants}


def merge_snapshots(snapshots: list[dict[str, Any]], variant_names: list[str]) -> dict[str, dict[str, Any]]:
    """Per-variant summaries over several processes' snapshots of the same route."""
    merged: dict[str, dict[str, Any]] = {}
    for name in variant_names:
        parts = [s["variants"][name] for s in snapshots if name in s["variants"]]
        histogram: dict[str, int] = {}
        for part in parts:
            for index, count in part["latency"].items():
                histogram[index] = histogram.get(index, 0) + count
        summary: dict[str, Any] = {
            "requests": sum(p["requests"] for p in parts),
            "errors": sum(p["errors"] for p in parts),
            "p50_ms": histogram_percentile(histogram, 0.50),
            "p99_ms": histogram_percentile(histogram, 0.99),
        }
        if any("pulls" in p for p in parts):
            reward_count = sum(p.get("reward_count", 0) for p in parts)
            reward_sum = sum(p.get("reward_sum", 0.0) for p in parts)
            summary["reward_mean"] = reward_sum / reward_count if reward_count else None
            summary["pulls"] = sum(p.get("pulls", 0) for p in parts)
        merged[name] = summary
    return merged


class SharedVariantStats:
    def __init__(self, redis: Redis, router: Router, timeout: float, interval: float = 1.0) -> None:
        self._redis = redis
        self._router = router
        self._timeout = timeout
        self._interval = interval
        self._stale_after = 10 * interval
        self._forget_after = 60 * interval  # fields of processes gone this long are deleted by readers
        self.process = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self._task: asyncio.Task[None] | None = None
        self._published: set[str] = set()
        self._failing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._publish_forever(), name="variant stats publisher")

    async def aclose(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
        if self._published:  # leave at once rather than linger as a stale snapshot
            try:
                async with asyncio.timeout(self._timeout):
                    pipe = self._redis.pipeline(transaction=False)
                    for endpoint in self._published:
                        pipe.hdel(stats_key(endpoint), self.process)
                    await pipe.execute()
            except (RedisError, OSError, TimeoutError) as exc:
                logger.warning("variant statistics of this process not withdrawn from redis: %s", exc)

    async def stats(self, endpoint: str) -> dict[str, Any] | None:
        """This process's live statistics of `endpoint`, merged with every other live process's latest."""
        local = self._router.stats(endpoint)
        snapshot = snapshot_of(self._router, endpoint)
        if local is None or snapshot is None:
            return None
        try:
            async with asyncio.timeout(self._timeout):
                others = await self._others(endpoint, snapshot["route"])
        except (RedisError, OSError, TimeoutError) as exc:
            logger.warning("variant statistics of other processes unavailable (redis: %s): this one's only", exc)
            return {**local, "processes": 1}
        if not others:
            return {**local, "processes": 1}
        variants = merge_snapshots([snapshot, *others], list(local["variants"]))
        return {**local, "variants": variants, "processes": 1 + len(others)}

    async def publish(self) -> None:
        """Write this process's snapshot of every endpoint (one round trip)."""
        now_ms = _now_ms()
        pipe = self._redis.pipeline(transaction=False)
        endpoints = list(self._router.endpoints())
        for endpoint in endpoints:
            snapshot = snapshot_of(self._router, endpoint)
            if snapshot is None:
                continue
            key = stats_key(endpoint)
            pipe.hset(key, self.process, orjson.dumps({**snapshot, "at": now_ms}))
            pipe.expire(key, math.ceil(self._forget_after))
        for gone in self._published - set(endpoints):  # routes deleted here: withdraw their snapshots
            pipe.hdel(stats_key(gone), self.process)
        async with asyncio.timeout(self._timeout):
            await pipe.execute()
        self._published = set(endpoints)

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.publish()
            except (RedisError, OSError, TimeoutError) as exc:
                if not self._failing:
                    logger.warning("variant statistics not published (redis: %s); retrying every %gs", exc,
                                   self._interval)
                self._failing = True
                continue
            self._failing = False

    async def _others(self, endpoint: str, route: str) -> list[dict[str, Any]]:
        fields = cast(dict[bytes, bytes], await self._redis.hgetall(stats_key(endpoint)))  # a bytes client
        now_ms = _now_ms()
        fresh: list[dict[str, Any]] = []
        forgotten: list[bytes] = []
        for process, raw in fields.items():
            if process == self.process.encode():
                continue
            try:
                snapshot = orjson.loads(raw)
                age_ms = now_ms - int(snapshot["at"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                forgotten.append(process)
                continue
            if age_ms > self._forget_after * 1000:
                forgotten.append(process)
            elif age_ms <= self._stale_after * 1000 and snapshot.get("route") == route:
                fresh.append(snapshot)
        if forgotten:
            await self._redis.hdel(stats_key(endpoint), *forgotten)
        return fresh


def _now_ms() -> int:
    return int(time.time() * 1000)
