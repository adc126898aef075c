"""What the monitor tests share: records in the design.md stream format, a real webhook receiver, monitor
processes, and polling with deadlines (never sleeping as synchronisation)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from tests.conftest import free_port

WINDOWS_STREAM = "gatewatch:windows"


def tensor(name: str, array: np.ndarray, datatype: str) -> dict[str, Any]:
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": array.reshape(-1).tolist()}


def log_record(
    *,
    endpoint: str,
    model: str,
    version: int,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    rows: int = 1,
    role: str = "primary",
    ts_ms: int | None = None,
    request_id: str | None = None,
    payload: str = "full",
    redacted: str = "",
    status: int = 200,
    latency_ms: float = 5.0,
) -> dict[str, str]:
    """One log stream entry exactly as design.md ("Streams") defines it: every field a string."""
    return {
        "uid": uuid.uuid4().hex,
        "id": request_id or uuid.uuid4().hex,
        "ts": str(ts_ms if ts_ms is not None else int(time.time() * 1000)),
        "endpoint": endpoint,
        "variant": "default",
        "role": role,
        "model": model,
        "version": str(version),
        "rows": str(rows),
        "inputs": json.dumps(inputs) if payload != "sampled_out" else "[]",
        "outputs": json.dumps(outputs) if payload != "sampled_out" else "[]",
        "payload": payload,
        "redacted": redacted,
        "status": str(status),
        "latency_ms": f"{latency_ms:.3f}",
        "error": "" if status < 400 else "failed",
    }


def write_records(client: redis.Redis, stream: str, records: Iterable[dict[str, str]], batch: int = 500) -> int:
    pipe = client.pipeline(transaction=False)
    written = 0
    for record in records:
        pipe.xadd(stream, record)  # type: ignore[arg-type]
        written += 1
        if written % batch == 0:
            pipe.execute()
    pipe.execute()
    return written


def window_results(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(fields[b"result"]) for _, fields in client.xrange(WINDOWS_STREAM)]  # type: ignore[union-attr]


def alert_events(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(fields[b"event"]) for _, fields in client.xrange("gatewatch:alerts")]  # type: ignore[union-attr]


def wait_for(condition: Callable[[], Any], within: float, what: str, interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy (returned); fail with `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        time.sleep(interval)  # polling interval, not synchronisation


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class WebhookReceiver:
    """A real HTTP server on a loopback port that records every request; answers `status` (200) or is stopped."""

    port: int = field(default_factory=free_port)
    status: int = 200
    requests: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = receiver.status
                receiver.requests.append(Received(self.path, dict(self.headers.items()), body, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def delivered(self) -> list[Received]:
        return [r for r in self.requests if 200 <= r.status < 300]

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(r.body) for r in self.delivered()]


@dataclass
class MonitorProcess:
    """`gatewatch monitor` in a subprocess, the way users run it."""

    process: subprocess.Popen[bytes]
    metrics_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=20)

    def terminate(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_monitor(config: Path, workdir: Path, env: dict[str, str] | None = None) -> MonitorProcess:
    port = free_port()
    log_path = workdir / f"monitor-{port}.log"
    command = [sys.executable, "-m", "gateway.cli", "monitor", "--metrics-port", str(port), "--config", str(config)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env={**os.environ, **(env or {})}
        )
    return MonitorProcess(process, f"http://127.0.0.1:{port}/metrics", log_path)

