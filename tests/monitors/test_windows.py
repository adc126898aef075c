"""Windows counted in rows, closed by rows or time, de-duplicated by uid; tensors skipped when incomplete."""

from __future__ import annotations

import json

import numpy as np

from monitors.analysis import DriftSettings, analyse
from monitors.features import parse_tensor_lists, stack
from monitors.windows import LogEntry, WindowSet, WindowSpec, parse_entry
from tests.monitors.helpers import log_record, tensor

STREAM = "gatewatch:log:fraud"


def entry(n: int, rows: int = 1, ts_ms: int = 1_000_000, uid: str | None = None, **extra: object) -> LogEntry:
    x = np.full((rows, 2), float(n))
    record = log_record(endpoint="fraud", model="m", version=1, rows=rows, ts_ms=ts_ms,
                        inputs=[tensor("X", x, "FP64")], outputs=[tensor("y", np.zeros(rows), "FP32")],
                        **extra)  # type: ignore[arg-type]
    if uid is not None:
        record["uid"] = uid
    parsed = parse_entry(STREAM, f"{n}-0".encode(), {k.encode(): v.encode() for k, v in record.items()})
    assert parsed is not None
    return parsed


def test_windows_close_on_rows_counting_rows_not_entries() -> None:
    windows = WindowSet(WindowSpec(rows=10, seconds=60, min_rows=5))
    closed = []
    for n in range(8):
        done, _ = windows.add(entry(n, rows=3))
        closed += done
    assert [w.rows for w in closed] == [12, 12]  # a batch is never split: a window may run over by one entry
    assert [len(w.entries) for w in closed] == [4, 4]
    assert windows.open_entries == 0


def test_time_closes_a_window_only_with_enough_rows() -> None:
    windows = WindowSet(WindowSpec(rows=1000, seconds=1, min_rows=3))
    windows.add(entry(0, ts_ms=0))
    windows.add(entry(1, ts_ms=10))
    done, _ = windows.add(entry(2, ts_ms=5000))  # time is up, but only 2 rows: the window stays open
    assert done == []
    done, _ = windows.add(entry(3, ts_ms=5001))
    assert [w.rows for w in done] == [3] and done[0].reason == "time"
    assert windows.expire(now_ms=5500) == []  # the new window holds 1 row
    windows.add(entry(4, ts_ms=5100))
    windows.add(entry(5, ts_ms=5200))
    assert [w.rows for w in windows.expire(now_ms=7000)] == [3]


def test_redelivered_entries_are_not_counted_twice() -> None:
    windows = WindowSet(WindowSpec(rows=3, seconds=60, min_rows=1))
    first = entry(1, uid="u1")
    windows.add(first)
    assert windows.add(first) == ([], [])  # the same entry again (XAUTOCLAIM): ignored, not acknowledged
    copy = entry(2, uid="u1")  # the same record written twice: acknowledged at once, not counted
    assert windows.add(copy) == ([], [copy.entry_id])
    windows.add(entry(3))
    done, _ = windows.add(entry(4))
    assert [w.rows for w in done] == [3]
    assert windows.add(entry(5, uid="u1")) == ([], [b"5-0"])  # its window is closed: still a duplicate
    assert windows.add(first) == ([], [])  # re-claimed before its closed window was committed: not acked early


def test_windows_are_per_key() -> None:
    windows = WindowSet(WindowSpec(rows=2, seconds=60, min_rows=1))
    windows.add(entry(1))
    shadow = entry(2, role="shadow")
    assert shadow.key.role == "shadow"
    assert windows.add(shadow) == ([], [])
    done, _ = windows.add(entry(3))
    assert [(w.key.role, w.rows) for w in done] == [("primary", 2)]


def test_unusable_entries_parse_to_none() -> None:
    assert parse_entry(STREAM, b"1-0", None) is None
    assert parse_entry(STREAM, b"1-0", {b"uid": b"x", b"rows": b"many"}) is None
    minimal = parse_entry(STREAM, b"1-0", {b"uid": b"x"})
    assert minimal is not None and minimal.key.endpoint == "fraud" and minimal.rows == 1


def test_failed_requests_without_rows_still_fill_and_close_windows() -> None:
    """A request refused before its batch size was known is logged with rows=0; failing traffic must still close
    windows (and so report its error rate), or its entries would stay pending for ever."""
    windows = WindowSet(WindowSpec(rows=3, seconds=60, min_rows=2))
    failed = [entry(n, rows=0, status=400) for n in range(3)]
    assert [e.rows for e in failed] == [1, 1, 1]
    closed = [w for e in failed for w in windows.add(e)[0]]
    assert [(w.rows, len(w.entries)) for w in closed] == [(3, 3)]
    analysis = analyse(closed[0], None, {}, keep_tensors=False, drift=DriftSettings(0.01, "holm"))
    assert analysis.traffic.error_rate == 1.0
    assert entry(9, rows=0).rows == 0  # a successful entry claiming no rows adds none


def test_redacted_truncated_and_sampled_out_tensors_are_skipped() -> None:
    full = json.dumps([tensor("X", np.ones((2, 3)), "FP32")]).encode()
    redacted = json.dumps([{"name": "X", "shape": [2, 3], "datatype": "FP32", "data": None}]).encode()
    truncated = json.dumps([{"name": "X", "shape": [2, 3], "datatype": "FP32", "data": [1.0, 2.0]}]).encode()
    docs = parse_tensor_lists([full, redacted, truncated, b"[]", b"{broken"])
    stacked = stack(docs, [frozenset()] * 5)
    assert stacked.tensors["X"].shape == (2, 3) and stacked.datatypes["X"] == "FP32"
    assert stacked.owners["X"] == [0] and stacked.counts["X"] == [2]
    assert stack(parse_tensor_lists([full]), [frozenset({"X"})]).tensors == {}


def test_analysis_counts_rows_but_tests_only_logged_tensors() -> None:
    windows = WindowSet(WindowSpec(rows=6, seconds=60, min_rows=1))
    windows.add(entry(1, rows=2))
    windows.add(entry(2, rows=2, payload="sampled_out"))
    done, _ = windows.add(entry(3, rows=2, status=500))
    analysis = analyse(done[0], None, {}, keep_tensors=True, drift=DriftSettings(0.01, "holm"))
    assert done[0].rows == 6
    assert analysis.tensor_rows == 2
    assert analysis.traffic.error_rate == 1 / 3
    assert analysis.inputs["X"].shape == (2, 2)
