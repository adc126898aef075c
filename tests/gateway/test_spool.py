"""The disk spool: ordered append/read, the replay cursor, the size cap, and which spools count as orphaned."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway.payload_log.spool import Cursor, Spool, SpooledRecord, orphaned_spools


def records(count: int, start: int = 0, attempted_ms: int | None = None) -> list[SpooledRecord]:
    return [
        SpooledRecord("gatewatch:log:tabular", {"uid": f"p-{i}", "id": f"r{i}"}, attempted_ms)
        for i in range(start, start + count)
    ]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    opened = Spool(tmp_path / "spool" / "gateway-1.spool", 1 << 20)
    assert opened.open()
    return opened


def test_for_process_names_the_file_after_the_pid(tmp_path: Path) -> None:
    assert Spool.for_process(tmp_path, 10).path == tmp_path / f"gateway-{os.getpid()}.spool"


def test_append_then_read_in_order_with_attempt_times(spool: Spool) -> None:
    written = records(3) + records(2, start=3, attempted_ms=1234)
    assert spool.append(written) == 5
    assert spool.size == spool.path.stat().st_size > 0
    read, offset = spool.read(0, 100)
    assert read == written
    assert offset == spool.size
    assert spool.read(offset, 100) == ([], offset)


def test_read_pages_by_offset(spool: Spool) -> None:
    spool.append(records(10))
    first, offset = spool.read(0, 4)
    second, offset = spool.read(offset, 4)
    third, end = spool.read(offset, 4)
    assert [r.fields["uid"] for r in first + second + third] == [f"p-{i}" for i in range(10)]
    assert (len(first), len(second), len(third)) == (4, 4, 2)
    assert end == spool.size


def test_torn_last_line_is_never_read(spool: Spool) -> None:
    spool.append(records(2))
    with spool.path.open("ab") as raw:
        raw.write(b'{"s": "gatewatch:log:tabular", "f": {"uid": "half')  # a crash mid-write
    read, offset = spool.read(0, 100)
    assert [r.fields["uid"] for r in read] == ["p-0", "p-1"]
    assert offset == spool.size


def test_reopen_sees_existing_records(tmp_path: Path) -> None:
    path = tmp_path / "gateway-2.spool"
    first = Spool(path, 1 << 20)
    first.open()
    first.append(records(3))
    size = first.size
    first.close()
    assert path.exists()  # not empty: kept for replay
    again = Spool(path, 1 << 20)
    assert again.open()
    assert again.size == size
    assert [r.fields["uid"] for r in again.read(0, 10)[0]] == ["p-0", "p-1", "p-2"]
    again.close(remove_if_empty=False)


def test_cursor_round_trip_and_default(spool: Spool) -> None:
    assert spool.load_cursor() == Cursor(0, None)
    spool.save_cursor(Cursor(120, 1_700_000_000_000))
    assert spool.load_cursor() == Cursor(120, 1_700_000_000_000)
    spool.save_cursor(Cursor(240, None))
    assert spool.load_cursor() == Cursor(240, None)


def test_clear_empties_file_and_forgets_cursor_then_appends_from_zero(spool: Spool) -> None:
    spool.append(records(5))
    spool.save_cursor(Cursor(10, 99))
    spool.clear()
    assert spool.size == 0 and spool.path.stat().st_size == 0
    assert spool.load_cursor() == Cursor()
    spool.append(records(2, start=100))
    read, _ = spool.read(0, 10)
    assert [r.fields["uid"] for r in read] == ["p-100", "p-101"]
    assert spool.size == spool.path.stat().st_size


def test_cap_keeps_what_fits_and_drops_the_rest(tmp_path: Path) -> None:
    line = len(b'{"s":"gatewatch:log:tabular","f":{"uid":"p-0","id":"r0"},"a":null}\n')
    capped = Spool(tmp_path / "gateway-3.spool", 3 * line + line // 2)
    capped.open()
    assert capped.append(records(5)) == 3
    assert capped.append(records(1, start=5)) == 0  # full: later records dropped too
    assert capped.size <= capped.max_bytes
    assert [r.fields["uid"] for r in capped.read(0, 10)[0]] == ["p-0", "p-1", "p-2"]
    capped.clear()
    assert capped.append(records(1, start=7)) == 1  # room again after a replay


def test_zero_cap_spools_nothing(tmp_path: Path) -> None:
    none = Spool(tmp_path / "gateway-4.spool", 0)
    none.open()
    assert none.append(records(2)) == 0
    assert none.size == 0


def test_close_removes_an_empty_spool_and_keeps_a_full_one(tmp_path: Path) -> None:
    empty = Spool(tmp_path / "gateway-5.spool", 1 << 20)
    empty.open()
    empty.save_cursor(Cursor(0, None))
    empty.close()
    assert not empty.path.exists()
    assert not empty.path.with_suffix(".cursor").exists()
    full = Spool(tmp_path / "gateway-6.spool", 1 << 20)
    full.open()
    full.append(records(1))
    full.close()
    assert full.path.exists()


def test_a_locked_spool_cannot_be_opened_twice(spool: Spool) -> None:
    other = Spool(spool.path, 1 << 20)
    assert other.open() is False
    spool.close(remove_if_empty=False)
    assert other.open() is True
    other.close()


def test_orphaned_spools_skip_live_ones_and_lock_what_they_return(tmp_path: Path) -> None:
    live = Spool(tmp_path / "gateway-10.spool", 1 << 20)
    live.open()
    live.append(records(1))
    dead_old = Spool(tmp_path / "gateway-11.spool", 1 << 20)
    dead_old.open()
    dead_old.append(records(2))
    dead_old.close()
    dead_new = Spool(tmp_path / "gateway-12.spool", 1 << 20)
    dead_new.open()
    dead_new.append(records(3))
    dead_new.close()
    os.utime(dead_old.path, (1_000_000, 1_000_000))  # older: replayed first

    orphans = orphaned_spools(tmp_path, 1 << 20)
    assert [o.path.name for o in orphans] == ["gateway-11.spool", "gateway-12.spool"]
    assert [o.size for o in orphans] == [dead_old.path.stat().st_size, dead_new.path.stat().st_size]
    # while one process replays them, another does not see them as orphaned
    assert orphaned_spools(tmp_path, 1 << 20) == []
    for orphan in orphans:
        orphan.close()
    assert {o.path.name for o in orphaned_spools(tmp_path, 1 << 20)} == {"gateway-11.spool", "gateway-12.spool"}
    live.close()


def test_orphaned_spools_of_missing_directory_is_empty(tmp_path: Path) -> None:
    assert orphaned_spools(tmp_path / "absent", 1 << 20) == []


HOLDER = """
import sys
from pathlib import Path
from gateway.payload_log.spool import Spool, SpooledRecord
spool = Spool(Path(sys.argv[1]), 1 << 20)
assert spool.open()
spool.append([SpooledRecord("s", {"uid": "x-0"}, None)])
print("held", flush=True)
sys.stdin.read()  # hold the lock until the test closes stdin, then exit without closing the spool
"""


def test_a_spool_held_by_a_live_process_is_orphaned_only_once_it_exits(tmp_path: Path) -> None:
    path = tmp_path / "gateway-99.spool"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert holder.stdout is not None and holder.stdin is not None
    try:
        assert holder.stdout.readline() == b"held\n"
        assert orphaned_spools(tmp_path, 1 << 20) == []
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    orphans = orphaned_spools(tmp_path, 1 << 20)
    assert [o.path for o in orphans] == [path]
    assert [r.fields["uid"] for r in orphans[0].read(0, 10)[0]] == ["x-0"]
    orphans[0].close()


def blocked_on_lock(path: Path) -> bool:
    """True when some process waits for a flock on `path` (Linux: a `->` line in /proc/locks names its inode)."""
    inode = f":{path.stat().st_ino} "
    return any("->" in line and inode in line for line in Path("/proc/locks").read_text().splitlines())


def test_a_spool_whose_file_an_orphan_replay_removes_while_it_waits_locks_a_real_file(tmp_path: Path) -> None:
    """Two processes starting together: B has created its spool file, A (replaying orphans) locks it first, finds
    it empty and removes it on close. B, blocked on the lock until then, must end up holding a file that exists,
    not the removed one (records spooled there would be unreadable and lost)."""
    path = tmp_path / "gateway-77.spool"
    path.touch()  # B: created, not yet locked
    (orphan,) = orphaned_spools(tmp_path, 1 << 20)  # A
    starting = Spool(path, 1 << 20)
    opener = threading.Thread(target=starting.open, args=(True,))
    opener.start()
    deadline = time.monotonic() + 10
    while not blocked_on_lock(path):
        assert time.monotonic() < deadline, "the opener never blocked on the lock"
        time.sleep(0.01)  # polling a condition: the opener waiting for the lock
    orphan.close()  # empty: removed
    opener.join(timeout=10)
    assert not opener.is_alive()
    starting.append(records(2))
    assert path.exists()
    assert [r.fields["uid"] for r in starting.read(0, 10)[0]] == ["p-0", "p-1"]
    assert orphaned_spools(tmp_path, 1 << 20) == []  # and it is really locked
    starting.close()
