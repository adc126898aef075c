"""The composition root: `create_app(settings)` builds every part; its lifespan opens and closes them in order."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError
from starlette.responses import Response

from gateway.api.admin import build_admin_router
from gateway.api.errors import install_error_handlers
from gateway.api.fastpath import GatewayApp, InferenceFastPath
from gateway.api.v2 import build_v2_router
from gateway.cancellation import cancel_and_wait
from gateway.dataplane import SERVER_VERSION, DataPlane
from gateway.metrics import GatewayMetrics, render
from gateway.payload_log.writer import LogMetrics, LogWriter, WriterLimits
from gateway.protocol.codecs import TensorSpec
from gateway.protocol.types import Feedback, InferenceRequest
from gateway.records import PayloadPolicy
from gateway.redis_connection import RedisConnection, open_redis, report_if_unreachable
from gateway.routing.admin import RouteAdmin
from gateway.routing.feedback_relay import FeedbackRelay
from gateway.routing.router import Router
from gateway.routing.shadow import ShadowMetrics, ShadowMirror
from gateway.routing.shared_stats import SharedVariantStats
from gateway.routing.store import RouteStore
from gateway.routing.table import InvalidRoute, Route, Signature, check_route, parse_route
from gateway.runtime.batcher import BatchLimits
from gateway.runtime.manager import ModelManager
from gateway.runtime.runner import SessionOptions
from gateway.settings import Settings, load_settings
from registry_client.errors import RegistryError, RegistryUnavailable
from registry_client.factory import open_registry

logger = logging.getLogger(__name__)


def create_app(settings: Settings, metrics_registry: CollectorRegistry | None = None) -> FastAPI:
    metrics = GatewayMetrics(metrics_registry or CollectorRegistry())
    executor = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="onnxruntime")
    registry = open_registry(settings.registry, settings.data_dir / "models", os.environ)
    manager = ModelManager(
        registry,
        executor,
        metrics,
        SessionOptions(settings.ort_intra_op_threads, settings.ort_inter_op_threads),
        lambda model: _batch_limits(settings, model),
    )
    default_policy = _payload_policy(settings)
    shadow_metrics = ShadowMetrics(metrics.shadow_requests, metrics.shadow_skipped, metrics.shadow_disagreements)
    shadows = ShadowMirror(manager, shadow_metrics, settings.shadow_max_in_flight)
    router = Router(default_policy, on_apply=shadows.announce)
    dataplane = DataPlane(manager, metrics, router, shadows)
    signature = _signature_of(manager)
    admin = RouteAdmin(
        router, signature, settings.admin_token.get_secret_value() if settings.admin_token else None
    )

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Every part is closed in reverse order of start, also when start-up fails half-way (a bad route in the
        # config file must not leave an embedded Redis running).
        async with contextlib.AsyncExitStack() as cleanup:
            cleanup.push_async_callback(registry.aclose)
            cleanup.callback(executor.shutdown, wait=True)
            logger.info("registry: %s", registry.description)
            redis = await open_redis(settings.redis_url, settings.data_dir, settings.redis_timeout_seconds)
            cleanup.push_async_callback(redis.aclose)
            console_note(f"redis: {redis.description}")
            await report_if_unreachable(redis)  # then serve anyway: logs spool, routes come from the config file
            writer = _log_writer(settings, redis, metrics, router) if settings.log_enabled else None
            if writer is not None:
                await writer.start()
                cleanup.push_async_callback(writer.aclose)  # flush the log queue: to Redis, else to the spool
                dataplane.attach_log(writer)
            cleanup.push_async_callback(manager.aclose)  # drain every batcher
            cleanup.push_async_callback(shadows.aclose)  # shadows of the last requests still use the batchers
            try:
                await manager.sync()
            except RegistryUnavailable as exc:
                logger.error("registry unavailable at start (%s); not ready until it answers", exc)
            except RegistryError as exc:  # e.g. the URL answers but is no MLflow registry: say so, keep polling
                logger.error("registry at start: %s; not ready until it answers as a registry", exc)
            relay = FeedbackRelay(redis.client, router)
            relay.start()
            cleanup.push_async_callback(relay.aclose)
            dataplane.attach_relay(relay)
            store = RouteStore(redis.client, router, lambda endpoint, route: check_route(endpoint, route, signature))
            await _load_routes(store, router, settings, signature)
            admin.attach_store(store)
            store.start(settings.route_resync_seconds)
            cleanup.push_async_callback(store.aclose)
            shared_stats = SharedVariantStats(redis.client, router, settings.redis_timeout_seconds)
            shared_stats.start()
            cleanup.push_async_callback(shared_stats.aclose)
            admin.attach_shared_stats(shared_stats)
            poller = asyncio.create_task(manager.poll_forever(settings.registry_poll_seconds), name="registry poller")
            cleanup.push_async_callback(cancel_and_wait, [poller])
            _tune_garbage_collector()
            yield  # uvicorn has stopped accepting and answered in-flight requests when this returns

    app = GatewayApp(
        title="gatewatch",
        version=SERVER_VERSION,
        description="Open Inference Protocol (KServe V2) gateway over versioned ONNX models.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # Inference requests skip FastAPI's middleware and routing (see fastpath.py); the rest is plain FastAPI.
    app.fast_path = InferenceFastPath(dataplane, settings.max_body_bytes)
    app.body_timeout_seconds = settings.body_timeout_seconds
    app.include_router(build_v2_router(dataplane, settings.max_body_bytes))
    app.include_router(build_admin_router(admin))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        body, content_type = render(metrics.registry)
        return Response(body, media_type=content_type)

    _document_infer_request(app)
    app.state.dataplane = dataplane
    app.state.metrics = metrics
    return app


def create_app_from_environment() -> FastAPI:
    """Factory for `uvicorn --factory` worker processes: settings from GATEWATCH_CONFIG and GATEWATCH_* env."""
    from pathlib import Path

    config = os.environ.get("GATEWATCH_CONFIG")
    return create_app(load_settings(Path(config) if config else None))


def _tune_garbage_collector() -> None:
    """Keep full collections off the request path's tail latency.

    Under load, objects that live a few milliseconds (queued log records, futures, arrays) reach the oldest
    generation; with CPython's default thresholds a full collection then ran about every second and paused the
    loop for 0.1–0.5 s (p99 of ~120 ms at c=64 where the collector-off run had ~35 ms). Objects alive after start-up
    (models, modules, settings) are frozen out of every collection, and young collections are made rarer; what is
    garbage is still freed by reference counting at once, cycles a little later.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


def _payload_policy(settings: Settings) -> PayloadPolicy:
    return PayloadPolicy(
        sample=settings.log_sample_rate,
        redact=frozenset(settings.log_redact),
        max_tensor_bytes=settings.log_max_tensor_bytes,
    )


def _signature_of(manager: ModelManager) -> Signature:
    def signature(model: str, ref: int | str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        loaded = manager.resolve(model, ref)
        return loaded.runner.inputs, loaded.runner.outputs

    return signature


async def _load_routes(store: RouteStore, router: Router, settings: Settings, signature: Signature) -> None:
    """Routes from Redis (seeded with the config file's); the config file's alone if Redis is unreachable."""
    try:
        await store.seed(settings.endpoints)
        await store.load_all()
        return
    except RedisError as exc:
        logger.error("route store unreachable at start (%s): serving the config file's routes", exc)
    for endpoint, raw in settings.endpoints.items():
        try:
            route = parse_route(endpoint, raw)
            check_route(endpoint, route, signature)
        except InvalidRoute as exc:
            logger.error("%s", exc.message)
            continue
        router.apply(endpoint, route)


def _log_writer(settings: Settings, redis: RedisConnection, metrics: GatewayMetrics, router: Router) -> LogWriter:
    limits = WriterLimits(
        maxlen=settings.log_maxlen,
        queue_size=settings.log_queue_size,
        batch_size=settings.log_batch_size,
        spool_max_bytes=settings.log_spool_max_bytes,
        write_timeout=settings.redis_timeout_seconds,
        linger=settings.log_linger_ms / 1000,
    )
    log_metrics = LogMetrics(metrics.log_records, metrics.log_queue_depth, metrics.log_spool_bytes)
    return LogWriter(redis.client, settings.data_dir / "spool", log_metrics, limits, router.policy_for)


def console_note(message: str) -> None:
    """Start-up facts an operator needs (where the embedded Redis is), on stderr even without logging set up."""
    print(f"gatewatch: {message}", file=sys.stderr, flush=True)


def _batch_limits(settings: Settings, model: str) -> BatchLimits:
    rows, delay = settings.batch_limits(model)
    return BatchLimits(
        max_batch_size=rows,
        max_queue_delay_ms=delay,
        max_queue_size=settings.max_queue_size,
        max_concurrency=settings.inference_threads,
    )


def _document_infer_request(app: FastAPI) -> None:
    """The infer routes read raw bytes (JSON or binary); publish the V2 request schema for them anyway."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            defs = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(defs.pop("$defs", {}))
            components["InferenceRequest"] = defs
            components["Feedback"] = Feedback.model_json_schema(ref_template="#/components/schemas/{model}")
            route = Route.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(route.pop("$defs", {}))
            components["Route"] = route
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
