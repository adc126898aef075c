"""`gatewatch monitor`: the composition root of one monitor worker process.

Opens (and closes, in reverse order) Redis, the registry, the thread pool, the httpx client and the /metrics
server; builds the worker; stops it on SIGTERM/SIGINT: consumers stop, leases are released (other workers take the
streams over at once, re-reading what was pending), webhook deliveries in flight get a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
from prometheus_client import CollectorRegistry, disable_created_metrics, start_http_server
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.redis_connection import open_redis, tls_hint
from gateway.settings import Settings
from monitors.alerts import AlertRules
from monitors.analysis import DriftSettings
from monitors.consumer import ConsumerContext
from monitors.delivery import AlertDelivery
from monitors.lag import LagProbe
from monitors.metrics import MonitorMetrics
from monitors.ownership import Ownership
from monitors.reference import ReferenceStore
from monitors.store import WindowStore
from monitors.webhooks import RetryPolicy, WebhookSender
from monitors.windows import WindowSpec
from monitors.worker import MonitorWorker
from registry_client.base import Registry
from registry_client.factory import open_registry

logger = logging.getLogger(__name__)

# Each window decodes its tensors into tens of thousands of short-lived containers (orjson lists and dicts), and
# with the default thresholds (700, 10, 10) the cyclic collector runs dozens of times per window, now and then over
# every live object: it cost more than the decoding itself. The monitor makes no reference cycles worth hunting
# often, so young collections wait for many more allocations, and what start-up created is moved out of their way.
_GC_THRESHOLDS = (50_000, 20, 100)


def run_monitor(settings: Settings, metrics_host: str = "127.0.0.1", metrics_port: int = 9400) -> None:
    """Run one worker until SIGTERM or SIGINT."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per webhook POST is noise
    disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` twin of each counter
    registry = CollectorRegistry()
    metrics = MonitorMetrics(registry)
    gc.collect()
    gc.freeze()  # modules and settings live for the whole process: no collection needs to walk them again
    gc.set_threshold(*_GC_THRESHOLDS)
    try:
        server, _ = start_http_server(metrics_port, addr=metrics_host, registry=registry)
    except OSError as exc:  # a busy port: one line, not a traceback
        where = f"{metrics_host}:{metrics_port}"
        raise SystemExit(f"gatewatch monitor: cannot serve /metrics on {where}: {exc.strerror}") from None
    logger.info("monitor metrics on http://%s:%d/metrics", metrics_host, server.server_port)
    try:
        asyncio.run(_serve(settings, metrics))
    finally:
        server.shutdown()


async def _serve(settings: Settings, metrics: MonitorMetrics) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    connection = await open_redis(settings.redis_url, settings.data_dir, settings.redis_timeout_seconds + 1.0)
    registry = _registry(settings)
    executor = ThreadPoolExecutor(settings.monitor_threads, thread_name_prefix="gatewatch-monitor")
    client = httpx.AsyncClient()
    logger.info("monitor worker %s on %s", worker_id, connection.description)
    if settings.webhook_urls and settings.webhook_secret is None:
        logger.warning("webhook_urls set without webhook_secret: webhooks will go unsigned")
    try:
        if not await _until_redis_answers(connection.client, connection.description, stop):
            return  # stopped while waiting
        worker = _build(settings, metrics, worker_id, connection.client, registry, executor, client)
        await worker.run(stop)
    finally:
        await client.aclose()
        executor.shutdown(wait=False, cancel_futures=True)
        if registry is not None:
            await registry.aclose()
        await connection.aclose()
        logger.info("monitor worker %s stopped", worker_id)


async def _until_redis_answers(redis: Redis, description: str, stop: asyncio.Event) -> bool:
    """Wait (with a growing pause) for Redis to answer: started beside it, on Kubernetes for one, the monitor must
    not crash-loop while Redis comes up. False when stopped first."""
    pause = 0.5
    while not stop.is_set():
        try:
            await redis.ping()
            return True
        except RedisError as exc:
            logger.warning("%s does not answer (%s)%s; trying again in %.0fs", description, exc, tls_hint(description),
                           pause)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)
        pause = min(pause * 2, 10.0)
    return False


def _build(
    settings: Settings, metrics: MonitorMetrics, worker_id: str, redis: Redis, registry: Registry | None,
    executor: ThreadPoolExecutor, client: httpx.AsyncClient,
) -> MonitorWorker:
    policy = RetryPolicy(settings.webhook_attempts, settings.webhook_backoff_seconds,
                         settings.webhook_backoff_max_seconds, settings.webhook_timeout_seconds)
    secret = settings.webhook_secret.get_secret_value().encode() if settings.webhook_secret else None
    sender = WebhookSender(client, redis, secret, policy, metrics)
    delivery = AlertDelivery(redis, sender, settings.webhook_urls, settings.retrain_webhook_url, worker_id,
                             claim_idle_ms=int((policy.longest + 30) * 1000))
    ctx = ConsumerContext(
        redis=redis,
        worker_id=worker_id,
        store=WindowStore(redis, worker_id, settings.monitor_results_maxlen, settings.retrain_cooldown_seconds),
        references=ReferenceStore(redis, registry, settings.reference_rows, executor),
        metrics=metrics,
        lag=LagProbe(redis),
        executor=executor,
        spec=WindowSpec(settings.window_rows, settings.window_seconds, settings.min_window_rows),
        rules=AlertRules(settings.drift_persistence, settings.drift_resolve_after, settings.retrain_after_windows,
                         settings.latency_slo_ms),
        drift=DriftSettings(settings.drift_alpha, settings.drift_correction),
        read_count=settings.monitor_read_count,
        sweep_seconds=settings.monitor_lease_seconds,
    )
    ownership = Ownership(redis, worker_id, settings.monitor_lease_seconds)
    return MonitorWorker(ctx, ownership, delivery, settings.monitor_discovery_seconds)


def _registry(settings: Settings) -> Registry | None:
    try:
        return open_registry(settings.registry, settings.data_dir / "models", os.environ)
    except ValueError as exc:
        logger.warning("no model registry (%s): every drift reference will be taken from live rows", exc)
        return None
