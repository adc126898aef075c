"""A drift reference taken from live rows (the version has no `reference.npz`) when the monitor starts on a backlog.

The whole backlog is in the stream before the worker starts, so one read closes several windows at once, before
the first of them has committed and offered its rows to the reference. Whatever the timing of the analysis
threads, the windows whose rows make up the reference are stored untested ("none yet") and every window after
them is tested against it ("live", with drift results).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import redis

from tests.conftest import RedisServer
from tests.monitors.helpers import log_record, start_monitor, tensor, wait_for, window_results, write_records

WINDOW_ROWS = 100
WINDOWS = 6
ROWS_PER_RECORD = 4


def backlog(client: redis.Redis, endpoint: str) -> None:
    rng = np.random.default_rng(11)
    records = []
    for _ in range(WINDOWS * WINDOW_ROWS // ROWS_PER_RECORD):
        x = rng.normal(size=(ROWS_PER_RECORD, 3))
        records.append(log_record(endpoint=endpoint, model="m", version=1, rows=ROWS_PER_RECORD,
                                  inputs=[tensor("X", x, "FP64")], outputs=[tensor("y", x.sum(axis=1), "FP64")]))
    write_records(client, f"gatewatch:log:{endpoint}", records)


@pytest.mark.parametrize(("reference_rows", "read_count"), [
    (WINDOW_ROWS, 1000),  # the first window completes the reference; one read closes every window
    (250, 1000),  # the third window completes it (the reference keeps the first 250 of its 300 rows)
    (WINDOW_ROWS, 37),  # reads that end mid-window
])
def test_backlog_windows_after_a_live_reference_are_all_tested(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path, reference_rows: int, read_count: int
) -> None:
    (tmp_path / "models").mkdir()  # a registry without the model: no reference.npz
    config = tmp_path / "gatewatch.yaml"
    config.write_text("\n".join([
        f"registry: {tmp_path / 'models'}", f"data_dir: {tmp_path / 'data'}", f"redis_url: {redis_server.url}",
        "monitor_discovery_seconds: 0.5", f"window_rows: {WINDOW_ROWS}", "window_seconds: 600",
        "min_window_rows: 1", f"reference_rows: {reference_rows}", f"monitor_read_count: {read_count}",
    ]) + "\n")
    backlog(redis_client, "backlog")
    monitor = start_monitor(config, tmp_path)
    try:
        def stored() -> list[dict[str, object]] | None:
            assert monitor.process.poll() is None, monitor.log()
            results = window_results(redis_client)
            return results if len(results) >= WINDOWS else None

        results = wait_for(stored, 60, f"{WINDOWS} windows stored")
    finally:
        code = monitor.terminate()
    assert code == 0, monitor.log()

    assert [r["rows"] for r in results] == [WINDOW_ROWS] * WINDOWS  # in commit order, which is close order
    building = math.ceil(reference_rows / WINDOW_ROWS)  # windows whose rows went into the reference
    assert [r["reference"] for r in results] == ["none yet"] * building + ["live"] * (WINDOWS - building)
    assert [r["drift"] is None for r in results] == [True] * building + [False] * (WINDOWS - building)
    for result in results[building:]:
        features = result["drift"]["features"]
        assert {f["name"] for f in features} == {"X[0]", "X[1]", "X[2]", "y"}, result
        assert all(f["p_value"] is not None for f in features if f["test"] == "ks"), result
    assert redis_client.exists("gatewatch:monitor:reference:m:1")
