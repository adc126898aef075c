"""SharedVariantStats: one endpoint's per-variant statistics across every gateway process, not just the one asked.

Each process counts its own requests (`router.VariantStats`, bandit arms). With several workers or replicas,
`GET /admin/endpoints/{endpoint}/stats` would show only the share of traffic that the answering process saw. So
every process publishes a snapshot of its routes' statistics to Redis each `interval` (hash
`gatewatch:variant-stats:{endpoint}`, one field per process), and the answer merges the answering process's live
statistics with the other processes' latest snapshots. Latencies travel as log-scale histograms (buckets 5 % wide),
and merged percentiles are the nearest-rank bucket's middle; a process alone (or with only idle ones) keeps its exact
percentiles.

A snapshot counts only while it is fresh (a process that stopped publishing drops out after `stale_after`, by
Redis's clock, not the hosts') and only for the same route content: a process still on the previous route (a PUT
reaches processes a moment apart) is left out, as its statistics describe other variants or weights. Fields of
processes gone for `forget_after` are deleted by readers and, once a minute, by every publisher.
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
from gateway.routing.router import CompiledRoute, Router
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


# A snapshot as copied on the event loop (latencies as a plain list): the histograms are built from it elsewhere.
RawSnapshot = tuple[str, dict[str, dict[str, Any]]]


def raw_snapshot(compiled: CompiledRoute) -> RawSnapshot:
    variants: dict[str, dict[str, Any]] = {}
    for index, variant in enumerate(compiled.route.variants):
        stats = compiled.stats[variant.name]
        part: dict[str, Any] = {"requests": stats.requests, "errors": stats.errors, "latency": list(stats.latencies_ms)}
        if isinstance(compiled.chooser, BanditChooser):
            arm = compiled.chooser.arms[index]
            part |= {"pulls": arm.pulls, "reward_sum": arm.reward_sum, "reward_count": arm.reward_count}
        variants[variant.name] = part
    return compiled.fingerprint, variants


def build_snapshot(raw: RawSnapshot) -> dict[str, Any]:
    fingerprint, variants = raw
    return {
        "route": fingerprint,
        "variants": {name: {**part, "latency": latency_histogram(part["latency"])} for name, part in variants.items()},
    }


def _counts(compiled: CompiledRoute) -> tuple[object, ...]:
    """What changes whenever a snapshot does (requests and rewards only ever grow within one route), read without
    copying the latencies."""
    arms = compiled.chooser.arms if isinstance(compiled.chooser, BanditChooser) else []
    return (
        compiled.fingerprint,
        *(stats.requests for stats in compiled.stats.values()),
        *((arm.pulls, arm.reward_count) for arm in arms),
    )


def _has_traffic(snapshot: dict[str, Any]) -> bool:
    return any(part["requests"] or part.get("pulls") for part in snapshot["variants"].values())


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
        self._last: dict[str, tuple[tuple[object, ...], dict[str, Any]]] = {}  # endpoint -> (counts, snapshot)
        self._next_sweep = 0.0
        self._failing = False
        self._reads_failing = False

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
        compiled = self._router.get(endpoint)
        if local is None or compiled is None:
            return None
        try:
            async with asyncio.timeout(self._timeout):
                others = await self._others(endpoint, compiled.fingerprint)
        except (RedisError, OSError, TimeoutError) as exc:
            if not self._reads_failing:
                logger.warning("variant statistics of other processes unavailable (redis: %r): this one's only", exc)
            self._reads_failing = True
            return {**local, "processes": 1}
        self._reads_failing = False
        others = [snapshot for snapshot in others if _has_traffic(snapshot)]
        if not others:
            return {**local, "processes": 1}  # alone with traffic: exact percentiles
        snapshot = await asyncio.to_thread(build_snapshot, raw_snapshot(compiled))
        variants = merge_snapshots([snapshot, *others], list(local["variants"]))
        return {**local, "variants": variants, "processes": 1 + len(others)}

    async def publish(self) -> None:
        """Write this process's snapshot of every endpoint (one round trip). Histograms are rebuilt, off the event
        loop, only for endpoints whose counts moved; times are Redis's, so that hosts' clocks need not agree."""
        changed: dict[str, tuple[tuple[object, ...], RawSnapshot]] = {}
        endpoints = list(self._router.endpoints())
        for endpoint in endpoints:
            compiled = self._router.get(endpoint)
            if compiled is None:
                continue
            counts = _counts(compiled)
            last = self._last.get(endpoint)
            if last is None or last[0] != counts:
                changed[endpoint] = (counts, raw_snapshot(compiled))
        if changed:
            built = await asyncio.to_thread(lambda: {e: (c, build_snapshot(r)) for e, (c, r) in changed.items()})
            self._last.update(built)
        for gone in set(self._last) - set(endpoints):
            del self._last[gone]
        async with asyncio.timeout(self._timeout):
            now_ms = await self._redis_time_ms()
            pipe = self._redis.pipeline(transaction=False)
            for endpoint, (_, snapshot) in self._last.items():
                key = stats_key(endpoint)
                pipe.hset(key, self.process, orjson.dumps({**snapshot, "at": now_ms}))
                pipe.expire(key, math.ceil(self._forget_after))
            for gone in self._published - set(endpoints):  # routes deleted here: withdraw their snapshots
                pipe.hdel(stats_key(gone), self.process)
            await pipe.execute()
            self._published = set(endpoints)
            if time.monotonic() >= self._next_sweep:  # processes that died leave fields behind: forget them
                self._next_sweep = time.monotonic() + self._forget_after
                for endpoint in endpoints:
                    await self._others(endpoint, "")

    async def _publish_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.publish()
            except (RedisError, OSError, TimeoutError) as exc:
                if not self._failing:
                    logger.warning("variant statistics not published (redis: %r); retrying every %gs", exc,
                                   self._interval)
                self._failing = True
                continue
            self._failing = False

    async def _redis_time_ms(self) -> int:
        seconds, microseconds = await self._redis.time()
        return int(seconds) * 1000 + int(microseconds) // 1000

    async def _others(self, endpoint: str, route: str) -> list[dict[str, Any]]:
        """The other processes' fresh snapshots of `route` (all routes' are read; fields long stale are deleted)."""
        pipe = self._redis.pipeline(transaction=False)
        pipe.hgetall(stats_key(endpoint))
        pipe.time()
        raw_fields, (seconds, microseconds) = await pipe.execute()
        fields = cast(dict[bytes, bytes], raw_fields)  # a bytes client
        now_ms = int(seconds) * 1000 + int(microseconds) // 1000
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


