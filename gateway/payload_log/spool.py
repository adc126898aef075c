"""Spool: the local append-only file that holds log records while Redis is unreachable.

One file per process (`gateway-<pid>.spool`), held under an exclusive `flock` while the process lives, so a new
process can tell a dead process's leftover spool (lockable) from a live one's (locked) and replay it.
Each line is one record: `{"s": stream, "f": fields, "a": ms-when-a-write-was-attempted | null}`.
A `.cursor` file beside it remembers how far a replay got, so a replay cut short is resumed, not repeated.
Every method here does blocking file I/O: call them through `asyncio.to_thread`.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

import orjson

SUFFIX = ".spool"


class SpooledRecord(NamedTuple):  # a tuple, not a dataclass: one is built per log record on the event loop
    stream: str
    fields: dict[str, str]
    attempted_ms: int | None


@dataclass(frozen=True)
class Cursor:
    offset: int = 0
    attempted_ms: int | None = None  # the chunk at `offset` may have reached Redis after this time


class Spool:
    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._cursor_path = path.with_suffix(".cursor")
        self._handle: IO[bytes] | None = None
        self.size = 0

    @classmethod
    def for_process(cls, directory: Path, max_bytes: int) -> Spool:
        return cls(directory / f"gateway-{os.getpid()}{SUFFIX}", max_bytes)

    def open(self, blocking_lock: bool = False) -> bool:
        """Open and lock the file; False when another live process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = self.path.open("ab+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking_lock else fcntl.LOCK_NB))
            except BlockingIOError:
                handle.close()
                return False
            if _names(self.path, handle):
                break
            # While we waited, the holder (replaying it as an orphan) found it empty and removed it: the lock
            # we got is on a file nobody can find again. Lock the file at our path instead.
            handle.close()
        self._handle = handle
        self.size = handle.seek(0, os.SEEK_END)
        return True

    def append(self, records: list[SpooledRecord]) -> int:
        """Append what fits under `max_bytes`; returns how many records were written (the rest are dropped)."""
        assert self._handle is not None
        lines: list[bytes] = []
        room = self.max_bytes - self.size
        for record in records:
            line = orjson.dumps({"s": record.stream, "f": record.fields, "a": record.attempted_ms}) + b"\n"
            if len(line) > room:
                break
            room -= len(line)
            lines.append(line)
        if lines:
            payload = b"".join(lines)
            self._handle.write(payload)
            self._handle.flush()
            self.size += len(payload)
        return len(lines)

    def read(self, offset: int, max_records: int) -> tuple[list[SpooledRecord], int]:
        """Up to `max_records` whole records from `offset`, and the offset after them."""
        records: list[SpooledRecord] = []
        with self.path.open("rb") as reader:
            reader.seek(offset)
            while len(records) < max_records:
                line = reader.readline()
                if not line.endswith(b"\n"):
                    break  # end of file (or a torn last line from a crash: never replayed half)
                offset += len(line)
                raw = orjson.loads(line)
                records.append(SpooledRecord(raw["s"], raw["f"], raw["a"]))
        return records, offset

    def load_cursor(self) -> Cursor:
        if not self._cursor_path.is_file():
            return Cursor()
        raw = orjson.loads(self._cursor_path.read_bytes())
        return Cursor(int(raw["offset"]), raw.get("attempted_ms"))

    def save_cursor(self, cursor: Cursor) -> None:
        staging = self._cursor_path.with_suffix(".cursor.tmp")
        staging.write_bytes(orjson.dumps({"offset": cursor.offset, "attempted_ms": cursor.attempted_ms}))
        os.replace(staging, self._cursor_path)

    def clear(self) -> None:
        """Everything was replayed: empty the file and forget the cursor."""
        assert self._handle is not None
        self._handle.truncate(0)
        self._handle.flush()
        self.size = 0
        self._cursor_path.unlink(missing_ok=True)

    def close(self, remove_if_empty: bool = True) -> None:
        if self._handle is None:
            return
        if remove_if_empty and self.size == 0:
            self.path.unlink(missing_ok=True)
            self._cursor_path.unlink(missing_ok=True)
        self._handle.close()
        self._handle = None


def _names(path: Path, handle: IO[bytes]) -> bool:
    """Whether `path` still names the open file `handle` (not removed or replaced since it was opened)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def orphaned_spools(directory: Path, max_bytes: int) -> list[Spool]:
    """Spool files no live process holds, opened and locked for replay (oldest first)."""
    if not directory.is_dir():
        return []
    found: list[Spool] = []
    for path in sorted(directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime):
        spool = Spool(path, max_bytes)
        if spool.open():
            found.append(spool)
    return found
