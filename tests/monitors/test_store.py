"""The atomic window commit (fenced by the lease, retrain cooldown), leases and the lag probe, on a real Redis."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

from gateway.records import ALERTS_STREAM, MONITOR_GROUP
from monitors.lag import LagProbe
from monitors.ownership import Ownership, fair_share
from monitors.store import STATE_KEY, WINDOWS_STREAM, Commit, LeaseLost, WindowStore
from tests.conftest import RedisServer

STREAM = "gatewatch:log:fraud"


@pytest.fixture
async def aredis(redis_server: RedisServer, redis_client: redis.Redis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def delivered(client: aioredis.Redis, count: int) -> list[bytes]:
    """Add `count` entries and read them through the group (so they are pending)."""
    await client.xgroup_create(STREAM, MONITOR_GROUP, id="0", mkstream=True)
    for i in range(count):
        await client.xadd(STREAM, {"uid": f"u{i}"})
    reply = await client.xreadgroup(MONITOR_GROUP, "w1", {STREAM: ">"}, count=count)
    return [entry_id for _, entries in reply for entry_id, _ in entries]


def commit(ids: list[bytes], retrain: bool = False) -> Commit:
    return Commit("m", "1", b'{"rows": 2}', {"alert:k": b"{}"}, [b'{"type": "drift.detected"}'],
                  b'{"type": "retrain.requested"}' if retrain else None, ids)


async def test_commit_stores_and_acknowledges_together(aredis: aioredis.Redis) -> None:
    ids = await delivered(aredis, 3)
    ownership = Ownership(aredis, "w1", lease_seconds=5)
    assert await ownership.acquire(STREAM)
    store = WindowStore(aredis, "w1", results_maxlen=1000, retrain_cooldown_seconds=60)
    assert await store.commit(STREAM, commit(ids[:2], retrain=True)) is True
    assert (await aredis.xpending(STREAM, MONITOR_GROUP))["pending"] == 1
    assert await aredis.xlen(WINDOWS_STREAM) == 1
    assert await aredis.hget(STATE_KEY.format(stream=STREAM), "alert:k") == b"{}"
    types = [json.loads(f[b"event"])["type"] for _, f in await aredis.xrange(ALERTS_STREAM)]
    assert types == ["drift.detected", "retrain.requested"]
    # The same model version asks again within its cooldown: the request is not sent.
    assert await store.commit(STREAM, commit(ids[2:], retrain=True)) is False
    types = [json.loads(f[b"event"])["type"] for _, f in await aredis.xrange(ALERTS_STREAM)]
    assert types.count("retrain.requested") == 1


async def test_commit_refused_without_the_lease(aredis: aioredis.Redis) -> None:
    ids = await delivered(aredis, 2)
    other = Ownership(aredis, "w2", lease_seconds=5)
    assert await other.acquire(STREAM)
    store = WindowStore(aredis, "w1", results_maxlen=1000, retrain_cooldown_seconds=60)
    with pytest.raises(LeaseLost):
        await store.commit(STREAM, commit(ids))
    assert (await aredis.xpending(STREAM, MONITOR_GROUP))["pending"] == 2
    assert await aredis.xlen(WINDOWS_STREAM) == 0 and await aredis.exists(ALERTS_STREAM) == 0


async def test_leases_renew_and_release_only_for_their_holder(aredis: aioredis.Redis) -> None:
    await aredis.xadd(STREAM, {"uid": "u"})
    mine, theirs = Ownership(aredis, "w1", 5), Ownership(aredis, "w2", 5)
    assert await mine.acquire(STREAM) and not await theirs.acquire(STREAM)
    assert await mine.acquire(STREAM)  # still ours: kept
    assert not await theirs.renew(STREAM)
    await theirs.release(STREAM)
    assert await theirs.holder(STREAM) == "w1"
    await mine.release(STREAM)
    assert await theirs.acquire(STREAM)
    assert await mine.discover() == [STREAM]
    assert await mine.heartbeat() == 1 and await theirs.heartbeat() == 2
    await theirs.leave()
    assert await mine.heartbeat() == 1
    assert [fair_share(5, n) for n in (0, 1, 2, 3)] == [5, 5, 3, 2]


async def test_lag_is_undelivered_plus_pending(aredis: aioredis.Redis) -> None:
    await delivered(aredis, 4)  # 4 pending
    for i in range(7):
        await aredis.xadd(STREAM, {"uid": f"later{i}"})
    assert await LagProbe(aredis, chunk=3).lag(STREAM) == 11
    assert await LagProbe(aredis, chunk=2, cap=4).lag(STREAM) == 11  # past the cap: the stream length
    reply = await aredis.xreadgroup(MONITOR_GROUP, "w1", {STREAM: ">"}, count=100)
    await aredis.xack(STREAM, MONITOR_GROUP, *[entry_id for _, entries in reply for entry_id, _ in entries])
    assert await LagProbe(aredis).lag(STREAM) == 4
