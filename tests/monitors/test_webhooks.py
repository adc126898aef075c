"""Webhook delivery against a real HTTP receiver on loopback and a real Redis: signatures, retries through an
outage, the dead-letter stream, and the alerts-stream outbox. The receiver's outages are the scenario (timed);
everything else is waited for by polling."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway.records import ALERTS_STREAM, DEADLETTER_STREAM
from monitors.delivery import DELIVERY_GROUP, AlertDelivery
from monitors.metrics import MonitorMetrics
from monitors.webhooks import RetryPolicy, WebhookSender, signature, verify
from tests.conftest import RedisServer
from tests.monitors.helpers import WebhookReceiver
from tests.polling import wait_for

SECRET = b"shared-secret"


def test_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"event_id":"e1","type":"drift.detected"}'
    expected = hmac.new(SECRET, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert signature(SECRET, "1700000000", body) == f"sha256={expected}"
    assert verify(SECRET, "1700000000", body, f"sha256={expected}")
    assert not verify(SECRET, "1700000001", body, f"sha256={expected}")
    assert not verify(b"other", "1700000000", body, f"sha256={expected}")


def test_backoff_grows_with_full_jitter_and_a_cap() -> None:
    policy = RetryPolicy(attempts=8, backoff=0.5, backoff_max=4.0, timeout=1.0)
    rng = random.Random(1)
    delays = [[policy.delay(retry, rng) for _ in range(200)] for retry in range(7)]
    assert all(0 <= d <= min(4.0, 0.5 * 2**retry) for retry, ds in enumerate(delays) for d in ds)
    assert max(delays[6]) > 2.0 > max(delays[0])
    assert policy.longest == pytest.approx(8 * 1.0 + 0.5 + 1 + 2 + 4 + 4 + 4 + 4)


@pytest.fixture
async def aredis(redis_server: RedisServer, redis_client: redis.Redis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    hook = WebhookReceiver()
    hook.start()
    yield hook
    hook.stop()


def counts(registry: CollectorRegistry) -> dict[str, float]:
    return {o: registry.get_sample_value("gatewatch_webhook_deliveries_total", {"outcome": o}) or 0.0
            for o in ("delivered", "retried", "dead")}


def event(event_type: str = "drift.detected") -> bytes:
    return json.dumps({"event_id": str(uuid.uuid4()), "type": event_type, "endpoint": "fraud", "model": "m",
                       "version": "1", "role": "primary", "detected_at": "2024-01-01T00:00:00.000Z",
                       "window": {"start": "2024-01-01T00:00:00.000Z", "end": "2024-01-01T00:01:00.000Z",
                                  "rows": 1000},
                       "features": [], "summary": "test"}).encode()


async def start_delivery(
    aredis: aioredis.Redis, urls: list[str], policy: RetryPolicy, retrain_url: str | None = None
) -> tuple[AlertDelivery, asyncio.Event, asyncio.Task[None], CollectorRegistry, httpx.AsyncClient]:
    registry = CollectorRegistry()
    client = httpx.AsyncClient()
    sender = WebhookSender(client, aredis, SECRET, policy, MonitorMetrics(registry))
    delivery = AlertDelivery(aredis, sender, urls, retrain_url, "test-worker", claim_idle_ms=60_000, block_ms=100)
    await delivery.prepare()
    stop = asyncio.Event()
    return delivery, stop, asyncio.create_task(delivery.run(stop)), registry, client


async def test_alert_is_delivered_signed_from_the_outbox(aredis: aioredis.Redis, receiver: WebhookReceiver) -> None:
    retrain = f"{receiver.url}?retrain"
    delivery, stop, task, registry, client = await start_delivery(aredis, [receiver.url], RetryPolicy(), retrain)
    body = event("retrain.requested")
    await aredis.xadd(ALERTS_STREAM, {"event": body})
    await wait_for(lambda: len(receiver.delivered()) == 2, 10, "delivery to both receivers")
    paths = sorted(r.path for r in receiver.delivered())
    assert paths == ["/hook", "/hook?retrain"]
    for request in receiver.delivered():
        assert request.body == body
        assert request.headers["X-Gatewatch-Event-Id"] == json.loads(body)["event_id"]
        assert verify(SECRET, request.headers["X-Gatewatch-Timestamp"], request.body,
                      request.headers["X-Gatewatch-Signature"])
        assert abs(int(request.headers["X-Gatewatch-Timestamp"]) - time.time()) < 60
    await wait_for(lambda: _pending(aredis), 5, "the alert acknowledged")
    stop.set()
    await task
    await client.aclose()
    assert counts(registry) == {"delivered": 2, "retried": 0, "dead": 0}


async def _pending(aredis: aioredis.Redis) -> bool:
    summary = await aredis.xpending(ALERTS_STREAM, DELIVERY_GROUP)
    return bool(summary["pending"] == 0)


async def test_delivered_once_after_receiver_recovers(aredis: aioredis.Redis, receiver: WebhookReceiver) -> None:
    policy = RetryPolicy(attempts=30, backoff=0.05, backoff_max=0.3, timeout=1.0)
    _, stop, task, registry, client = await start_delivery(aredis, [receiver.url], policy)
    receiver.status = 503
    body = event()
    await aredis.xadd(ALERTS_STREAM, {"event": body})
    await wait_for(lambda: len(receiver.requests) >= 2, 10, "tries answered 503")
    receiver.stop()
    await asyncio.sleep(1.0)  # the scenario: the receiver is unreachable for a while
    assert receiver.delivered() == []
    receiver.status = 200
    receiver.start()
    await wait_for(lambda: len(receiver.delivered()) == 1, 15, "delivery after recovery")
    await wait_for(lambda: _pending(aredis), 5, "the alert acknowledged")
    stop.set()
    await task
    await client.aclose()
    event_id = json.loads(body)["event_id"]
    assert {r.headers["X-Gatewatch-Event-Id"] for r in receiver.requests} == {event_id}
    assert len(receiver.delivered()) == 1
    assert await aredis.xlen(DEADLETTER_STREAM) == 0
    outcome = counts(registry)
    assert outcome["delivered"] == 1 and outcome["dead"] == 0 and outcome["retried"] >= 3


async def test_dead_lettered_when_receiver_stays_down(aredis: aioredis.Redis, receiver: WebhookReceiver) -> None:
    receiver.stop()
    policy = RetryPolicy(attempts=3, backoff=0.05, backoff_max=0.1, timeout=0.5)
    _, stop, task, registry, client = await start_delivery(aredis, [receiver.url], policy)
    body = event()
    await aredis.xadd(ALERTS_STREAM, {"event": body})
    await wait_for(lambda: _dead_letters(aredis), 15, "the dead-letter entry")
    await wait_for(lambda: _pending(aredis), 5, "the alert acknowledged")
    stop.set()
    await task
    await client.aclose()
    [(_, fields)] = await aredis.xrange(DEADLETTER_STREAM)
    assert fields[b"event"] == body
    assert fields[b"url"].decode() == receiver.url
    assert fields[b"attempts"] == b"3"
    assert b"ConnectError" in fields[b"last_error"]
    assert counts(registry) == {"delivered": 0, "retried": 2, "dead": 1}


async def _dead_letters(aredis: aioredis.Redis) -> bool:
    return bool(await aredis.xlen(DEADLETTER_STREAM) > 0)


async def test_client_errors_are_not_retried(aredis: aioredis.Redis, receiver: WebhookReceiver) -> None:
    receiver.status = 410
    registry = CollectorRegistry()
    async with httpx.AsyncClient() as client:
        sender = WebhookSender(client, aredis, SECRET, RetryPolicy(attempts=5, backoff=0.01), MonitorMetrics(registry))
        assert not await sender.deliver("e1", event(), receiver.url)
    assert len(receiver.requests) == 1
    [(_, fields)] = await aredis.xrange(DEADLETTER_STREAM)
    assert fields[b"attempts"] == b"1" and fields[b"last_error"] == b"HTTP 410"


async def test_delivery_goes_on_after_the_alerts_stream_is_deleted(
    aredis: aioredis.Redis, receiver: WebhookReceiver
) -> None:
    """A Redis restarted empty (or a DEL) takes the stream and its delivery group away; the monitor's next alert
    re-creates the stream, and it must still reach the receivers instead of delivery stopping for good."""
    _, stop, task, registry, client = await start_delivery(aredis, [receiver.url], RetryPolicy())
    await aredis.xadd(ALERTS_STREAM, {"event": event()})
    await wait_for(lambda: len(receiver.delivered()) == 1, 10, "the first alert delivered")
    await aredis.delete(ALERTS_STREAM)
    after = event("drift.resolved")
    await aredis.xadd(ALERTS_STREAM, {"event": after})
    await wait_for(lambda: len(receiver.delivered()) == 2, 10, "the alert stored after the deletion delivered")
    assert receiver.delivered()[-1].body == after
    await wait_for(lambda: _pending(aredis), 5, "the alert acknowledged")
    stop.set()
    await task  # ends cleanly: no NOGROUP error escapes
    await client.aclose()
    assert counts(registry)["delivered"] == 2
