"""uvicorn's httptools protocol, with each response handed to the socket in one write.

uvicorn writes a response's status line and headers, then its body, as two `transport.write` calls; uvloop sends
each at once, so every response cost two send syscalls and two TCP segments (py-spy put about 15 % of the
gateway's samples at c=64 in those two writes). `CoalescingTransport` holds what is written during one turn of the
loop and hands it to the socket in one write at the end of the turn, or at once when it holds `FLUSH_BYTES`.
Everything else about HTTP (parsing, keep-alive, flow control, 100-continue) stays uvicorn's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

FLUSH_BYTES = 256 * 1024  # beyond this, hand data over at once rather than hold it in memory until the turn ends


class CoalescingTransport(asyncio.Transport):
    """Wraps a transport: writes made in one loop turn are joined and written once, in order."""

    def __init__(self, inner: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._inner = inner
        self._loop = loop
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._flush_scheduled = False

    # -- writing ----------------------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._pending.append(bytes(data))
        self._pending_bytes += len(data)
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        """Hand everything held to the socket now (one write)."""
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        if not self._inner.is_closing():
            self._inner.write(data)

    def _scheduled_flush(self) -> None:
        self._flush_scheduled = False
        self.flush()

    def write_eof(self) -> None:
        self.flush()
        self._inner.write_eof()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size() + self._pending_bytes

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._inner.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    # -- closing: what was written before close() still goes out; abort() drops it --------------------------------

    def close(self) -> None:
        self.flush()
        self._inner.close()

    def abort(self) -> None:
        self._pending.clear()
        self._pending_bytes = 0
        self._inner.abort()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    # -- everything else is the wrapped transport's -------------------------------------------------------------

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._inner.get_protocol()


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a `CoalescingTransport` (passed to uvicorn as `http=`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # Writes go out at the end of the loop turn, not as each response completes: measured side by side, flushing
        # at completion cost about 5 µs more system time per request (probably more cross-CPU wake-ups of the
        # client) to save a turn's worth of latency, a few microseconds.
        super().connection_made(CoalescingTransport(transport, self.loop))
