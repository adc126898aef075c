"""Tumbling windows of log entries per endpoint x model x version x role, counted in rows.

A window closes when it holds `window_rows` rows, or once `window_seconds` have passed since its first entry
(in record time when a later entry arrives, in wall time when the stream is idle) and it holds at least
`min_window_rows`. The entries of open windows are unacknowledged in Redis; a new owner of the stream re-reads them
and rebuilds the same windows, because windows are cut from the entries alone, in stream order.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.records import LOG_STREAM_PREFIX

_RECENT_UIDS = 200_000  # uids of closed windows remembered, to drop duplicates the gateway wrote twice


@dataclass(frozen=True, order=True)
class WindowKey:
    endpoint: str
    model: str
    version: str
    role: str

    @property
    def label(self) -> str:
        return f"{self.endpoint}|{self.model}|{self.version}|{self.role}"


@dataclass(frozen=True)
class WindowSpec:
    rows: int
    seconds: float
    min_rows: int


@dataclass(slots=True)
class LogEntry:
    """The fields of one stream entry the monitor uses. Parsed on the event loop for every entry, so it stays
    minimal: ids and tensors remain bytes (tensors are decoded off the loop, when the window closes)."""

    entry_id: bytes
    uid: bytes
    request_id: bytes
    ts_ms: int
    key: WindowKey
    rows: int
    status: int
    latency_ms: float
    payload: bytes
    redacted: frozenset[str]
    inputs: bytes
    outputs: bytes


_KEYS: dict[tuple[bytes, bytes, bytes, bytes], WindowKey] = {}  # one WindowKey object per distinct key


def parse_entry(stream: str, entry_id: bytes, fields: Mapping[bytes, bytes] | None) -> LogEntry | None:
    """A stream entry as a `LogEntry`, or None when it is not a usable log record (trimmed, malformed)."""
    if not fields:
        return None
    get = fields.get
    return _entry(stream, entry_id, (
        get(b"endpoint", b""), get(b"model", b""), get(b"version", b""), get(b"role", b"primary"), get(b"uid"),
        get(b"id", b""), get(b"ts", b"0"), get(b"rows", b"1"), get(b"status"), get(b"latency_ms"),
        get(b"payload", b"full"), get(b"redacted"), get(b"inputs", b"[]"), get(b"outputs", b"[]")))


# The fields `_entry` takes, in its order, and what stands for each one an entry lacks (as `parse_entry` reads them).
_FIELDS: tuple[tuple[bytes, bytes | None], ...] = (
    (b"endpoint", b""), (b"model", b""), (b"version", b""), (b"role", b"primary"), (b"uid", None), (b"id", b""),
    (b"ts", b"0"), (b"rows", b"1"), (b"status", None), (b"latency_ms", None), (b"payload", b"full"),
    (b"redacted", None), (b"inputs", b"[]"), (b"outputs", b"[]"),
)
_DEFAULTS = [default for _, default in _FIELDS]


class _Layout:
    """Where `_FIELDS` sit in a flat [name, value, name, value, …] entry with these names, in this order:
    positions past the entry's end pick the defaults appended to it."""

    __slots__ = ("names", "pick")

    def __init__(self, names: list[bytes]) -> None:
        at = {name: 2 * i + 1 for i, name in enumerate(names)}  # a repeated name: its last value, as in a dict
        end = 2 * len(names)
        self.names = names
        self.pick = operator.itemgetter(*(at.get(name, end + i) for i, (name, _) in enumerate(_FIELDS)))


_LAYOUTS: list[_Layout] = []  # the field layouts seen last (writers emit their fields in a fixed order)


def parse_flat_entry(stream: str, entry_id: bytes, flat: Sequence[bytes] | None) -> LogEntry | None:
    """`parse_entry` for the fields as Redis sends them, a flat list of names and values (no dict per entry)."""
    if not flat:
        return None
    if len(flat) % 2:
        return parse_entry(stream, entry_id, _pairs(flat))
    names = flat[0::2]
    for layout in _LAYOUTS:
        if layout.names == names:
            break
    else:
        layout = _Layout(list(names))
        _LAYOUTS.insert(0, layout)
        del _LAYOUTS[8:]
    return _entry(stream, entry_id, layout.pick([*flat, *_DEFAULTS]))


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    it = iter(flat)
    return dict(zip(it, it, strict=False))


def _entry(stream: str, entry_id: bytes, values: Sequence[Any]) -> LogEntry | None:
    (endpoint, model, version, role, uid, request_id, ts, rows, status, latency_ms, payload, redacted, inputs,
     outputs) = values
    try:
        raw_key = (endpoint, model, version, role)
        key = _KEYS.get(raw_key) or _window_key(stream, raw_key)
        return LogEntry(
            entry_id,
            uid or entry_id,
            request_id,
            int(ts),
            key,
            _window_rows(int(rows), int(status or 200)),
            int(status or 200),
            float(latency_ms or 0),
            payload,
            frozenset(redacted.decode().split(",")) if redacted else _NOTHING_REDACTED,
            inputs,
            outputs,
        )
    except (ValueError, UnicodeDecodeError):
        return None


_NOTHING_REDACTED: frozenset[str] = frozenset()


def _window_rows(rows: int, status: int) -> int:
    """A request refused before its batch size was known (bad JSON, no shape) is logged with 0 rows; it counts as
    one here, so that windows of failing traffic fill and close, and report their error rate."""
    if rows <= 0:
        return 1 if status >= 400 else 0
    return rows


def _window_key(stream: str, raw: tuple[bytes, bytes, bytes, bytes]) -> WindowKey:
    endpoint, model, version, role = (part.decode() for part in raw)
    key = WindowKey(endpoint or stream.removeprefix(LOG_STREAM_PREFIX), model, version, role)
    if len(_KEYS) > 10_000:
        _KEYS.clear()
    _KEYS[raw] = key
    return key


@dataclass
class ClosedWindow:
    key: WindowKey
    start_ms: int
    end_ms: int
    rows: int
    entries: list[LogEntry]
    reason: str  # rows | time

    @property
    def entry_ids(self) -> list[bytes]:
        return [entry.entry_id for entry in self.entries]


@dataclass
class _OpenWindow:
    key: WindowKey
    start_ms: int
    end_ms: int
    rows: int = 0
    entries: list[LogEntry] = field(default_factory=list)

    def close(self, reason: str) -> ClosedWindow:
        return ClosedWindow(self.key, self.start_ms, self.end_ms, self.rows, self.entries, reason)


class WindowSet:
    """The open windows of one stream. Feed entries in stream order; closed windows come back in order.

    Duplicates are dropped by `uid`: a re-delivery of an entry already held is ignored, and another stream entry
    repeating a uid (written twice) comes back in `add`'s second list, to be acknowledged at once: its content
    is already counted.
    """

    def __init__(self, spec: WindowSpec) -> None:
        self.spec = spec
        self._open: dict[WindowKey, _OpenWindow] = {}
        self._held: dict[bytes, bytes] = {}  # uid -> entry id, for entries in open windows
        self._recent: dict[bytes, bytes] = {}  # uid -> entry id, for closed windows, oldest first

    @property
    def open_entries(self) -> int:
        return len(self._held)

    def add(self, entry: LogEntry) -> tuple[list[ClosedWindow], list[bytes]]:
        seen = self._held.get(entry.uid) or self._recent.get(entry.uid)
        if seen is not None:
            # The same entry again (re-claimed while its window is open or awaiting its commit) is ignored and
            # must not be acknowledged early; another entry repeating the uid is a duplicate record.
            return [], [] if seen == entry.entry_id else [entry.entry_id]
        closed: list[ClosedWindow] = []
        window = self._open.get(entry.key)
        if window is not None and self._time_is_up(window, entry.ts_ms):
            closed.append(self._close(window, "time"))
            window = None
        if window is None:
            window = self._open[entry.key] = _OpenWindow(entry.key, entry.ts_ms, entry.ts_ms)
        window.entries.append(entry)
        window.rows += entry.rows
        window.start_ms = min(window.start_ms, entry.ts_ms)
        window.end_ms = max(window.end_ms, entry.ts_ms)
        self._held[entry.uid] = entry.entry_id
        if window.rows >= self.spec.rows:
            closed.append(self._close(window, "rows"))
        return closed, []

    def expire(self, now_ms: int) -> list[ClosedWindow]:
        """Windows whose time is up by the wall clock (called while the stream is idle)."""
        due = [window for window in self._open.values() if self._time_is_up(window, now_ms)]
        return [self._close(window, "time") for window in sorted(due, key=lambda w: w.start_ms)]

    def _time_is_up(self, window: _OpenWindow, now_ms: int) -> bool:
        return now_ms - window.start_ms >= self.spec.seconds * 1000 and window.rows >= self.spec.min_rows

    def _close(self, window: _OpenWindow, reason: str) -> ClosedWindow:
        del self._open[window.key]
        for entry in window.entries:
            self._held.pop(entry.uid, None)
            self._recent[entry.uid] = entry.entry_id
        while len(self._recent) > _RECENT_UIDS:
            del self._recent[next(iter(self._recent))]
        return window.close(reason)
