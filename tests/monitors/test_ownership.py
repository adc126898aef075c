"""Monitor processes sharing log streams: spread by fair share, taken over after a SIGKILL, with every row in
exactly one stored window. Traffic keeps flowing during the kill (a writer thread, paced: the pacing is the
scenario), so the killed worker dies holding open windows whose entries are pending. And a Redis restart under a
running worker: again every row exactly once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import redis

from tests.conftest import RedisServer
from tests.monitors.helpers import MonitorProcess, log_record, start_monitor, tensor, wait_for, window_results

STREAMS = [f"gatewatch:log:shard{i}" for i in range(4)]
GROUP = "gatewatch-monitor"


@dataclass
class Traffic:
    """Writes records with 1–3 rows each to the streams; counts what it sent."""

    client: redis.Redis
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(7))
    rows: dict[str, int] = field(default_factory=dict)
    records: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def send(self, stream: str, count: int) -> None:
        pipe = self.client.pipeline(transaction=False)
        for _ in range(count):
            rows = int(self.rng.integers(1, 4))
            x = self.rng.normal(size=(rows, 4))
            record = log_record(endpoint=stream.rsplit(":", 1)[1], model="m", version=1, rows=rows,
                                inputs=[tensor("X", x, "FP64")], outputs=[tensor("y", x.sum(axis=1), "FP64")])
            pipe.xadd(stream, record)  # type: ignore[arg-type]
            self.rows[stream] = self.rows.get(stream, 0) + rows
            self.records[stream] = self.records.get(stream, 0) + 1
        pipe.execute()

    def start(self, streams: list[str]) -> None:
        def run() -> None:
            while not self._stop.wait(0.05):  # pacing the traffic, not synchronisation
                for stream in streams:
                    self.send(stream, 10)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=20)


@pytest.fixture
def config(redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path) -> Path:
    path = tmp_path / "gatewatch.yaml"
    (tmp_path / "models").mkdir()
    path.write_text("\n".join([
        f"registry: {tmp_path / 'models'}", f"data_dir: {tmp_path / 'data'}", f"redis_url: {redis_server.url}",
        "monitor_lease_seconds: 2", "monitor_discovery_seconds: 0.5", "window_rows: 200", "window_seconds: 2",
        "min_window_rows: 1", "reference_rows: 200",
    ]) + "\n")
    return path


@pytest.fixture
def monitors(config: Path, tmp_path: Path) -> Iterator[list[MonitorProcess]]:
    started: list[MonitorProcess] = []
    yield started
    for monitor in started:
        if monitor.process.poll() is None:
            monitor.kill()


def holders(client: redis.Redis, streams: list[str]) -> dict[str, str | None]:
    values = client.mget([f"gatewatch:monitor:lease:{s}" for s in streams])
    return {s: (v.decode() if isinstance(v, bytes) else None) for s, v in zip(streams, values, strict=True)}


def pid_of(worker: str | None) -> int | None:
    return int(worker.rsplit("-", 2)[1]) if worker else None


def pending(client: redis.Redis, stream: str) -> int:
    return int(client.xpending(stream, GROUP)["pending"])  # type: ignore[index]


def all_consumed(client: redis.Redis, streams: list[str]) -> bool:
    for stream in streams:
        groups = client.xinfo_groups(stream)
        last = client.xrevrange(stream, count=1)[0][0]  # type: ignore[index]
        if not groups or groups[0]["last-delivered-id"] != last or groups[0]["pending"] != 0:  # type: ignore[index]
            return False
    return True


def test_streams_spread_and_survive_sigkill_exactly_once(
    config: Path, tmp_path: Path, redis_client: redis.Redis, monitors: list[MonitorProcess]
) -> None:
    traffic = Traffic(redis_client)
    for stream in STREAMS:
        traffic.send(stream, 50)
    monitors += [start_monitor(config, tmp_path), start_monitor(config, tmp_path)]
    pids = {m.process.pid for m in monitors}

    def spread() -> bool:
        owners = [pid_of(h) for h in holders(redis_client, STREAMS).values()]
        return set(owners) == pids and all(owners.count(pid) == 2 for pid in pids)

    wait_for(spread, 60, "4 streams spread 2 and 2 over the two workers")
    traffic.start(STREAMS)
    victim_stream = STREAMS[0]
    victim_pid = pid_of(holders(redis_client, [victim_stream])[victim_stream])
    [victim] = [m for m in monitors if m.process.pid == victim_pid]
    [survivor] = [m for m in monitors if m is not victim]
    wait_for(lambda: sum(r["endpoint"] == "shard0" for r in window_results(redis_client)) >= 3, 60,
             "some windows of the victim's stream stored")
    wait_for(lambda: pending(redis_client, victim_stream) > 0, 10, "entries pending in an open window")
    victim.kill()

    wait_for(lambda: set(map(pid_of, holders(redis_client, STREAMS).values())) == {survivor.process.pid}, 30,
             "the survivor owning every stream")
    traffic.send("gatewatch:log:late", 100)  # a stream that appears later is found without a restart
    traffic.stop()
    streams = [*STREAMS, "gatewatch:log:late"]
    wait_for(lambda: all_consumed(redis_client, streams), 60, "every entry consumed and acknowledged")

    results = window_results(redis_client)
    for stream in streams:
        endpoint = stream.rsplit(":", 1)[1]
        mine = [r for r in results if r["endpoint"] == endpoint]
        assert sum(r["rows"] for r in mine) == traffic.rows[stream], stream
        assert sum(r["entries"] for r in mine) == traffic.records[stream], stream
    workers = {r["worker"] for r in results if r["endpoint"] == "shard0"}
    assert len(workers) == 2, "shard0's windows were stored by the victim, then by the survivor"
    assert "re-read" in survivor.log()
    assert survivor.terminate() == 0, survivor.log()
    assert holders(redis_client, streams) == dict.fromkeys(streams), "leases released on SIGTERM"


def test_redis_restart_loses_and_doubles_nothing(
    config: Path, tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis,
    monitors: list[MonitorProcess],
) -> None:
    traffic = Traffic(redis_client)
    stream = STREAMS[0]
    traffic.send(stream, 330)
    monitors.append(start_monitor(config, tmp_path))
    wait_for(lambda: len(window_results(redis_client)) >= 2, 60, "windows before the outage")
    redis_server.stop()
    time.sleep(3)  # the scenario: Redis is down for a while (its append-only file keeps the data)
    redis_server.start()
    traffic.client = redis_server.client()
    traffic.send(stream, 200)
    wait_for(lambda: all_consumed(traffic.client, [stream]), 60, "every entry consumed after the restart")
    results = window_results(traffic.client)
    assert sum(r["rows"] for r in results) == traffic.rows[stream]
    assert sum(r["entries"] for r in results) == traffic.records[stream] == 530
    assert monitors[0].terminate() == 0, monitors[0].log()
