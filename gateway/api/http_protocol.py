"""uvicorn's httptools protocol, with each response handed to the socket in one write, and two things uvicorn
does not do for an application: tell it whether a request's client is still connected, and stop waiting for a
request body that stopped arriving.

uvicorn writes a response's status line and headers, then its body, as two `transport.write` calls; uvloop sends
each at once, so every response cost two send syscalls and two TCP segments (py-spy put about 15 % of the
gateway's samples at c=64 in those two writes). `CoalescingTransport` holds what is written during one turn of the
loop and hands it to the socket in one write at the end of the turn, or at once when it holds `FLUSH_BYTES`.

Each request's ASGI scope gets `CONNECTION_GONE`, a callable that says whether the client has gone (the
batcher drops queued requests nobody waits for), and `BODY_STALLED`, set to the timeout when no body byte came
for `body_timeout` seconds while the server was reading: the waiting `receive()` is woken and
`api.v2.receive_body`, which every route with a body reads it through, answers 408. Only the running request is
watched; one waiting behind it on the connection (HTTP pipelining) is not read yet, so its silence is the server's.
Everything else about HTTP (parsing, keep-alive, flow control, 100-continue) stays uvicorn's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

FLUSH_BYTES = 256 * 1024  # beyond this, hand data over at once rather than hold it in memory until the turn ends
CONNECTION_GONE = "gatewatch.connection_gone"  # scope key: () -> bool, True once the client's connection is lost
BODY_STALLED = "gatewatch.body_stalled"  # scope key: the timeout (s), present once the request body stalled
DEFAULT_BODY_TIMEOUT = 15.0  # the `body_timeout_seconds` setting's default


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
    """uvicorn's httptools protocol over a `CoalescingTransport` (passed to uvicorn as `http=`); see the module
    docstring for the scope keys it adds. The body timeout is the application's `body_timeout_seconds` attribute
    (the app is built in each worker process from the settings; a class passed to uvicorn must be importable)."""

    body_timeout: float = DEFAULT_BODY_TIMEOUT
    _body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.body_timeout = getattr(self.app, "body_timeout_seconds", DEFAULT_BODY_TIMEOUT)
        # Writes go out at the end of the loop turn, not as each response completes: measured side by side, flushing
        # at completion cost about 5 µs more system time per request (probably more cross-CPU wake-ups of the
        # client) to save a turn's worth of latency, a few microseconds.
        super().connection_made(CoalescingTransport(transport, self.loop))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[CONNECTION_GONE] = self.transport.is_closing  # type: ignore[literal-required]

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_body()

    def on_body(self, body: bytes) -> None:
        super().on_body(body)
        if self.cycle is not None:
            self.cycle.scope.pop(BODY_STALLED, None)  # type: ignore[misc]  # bytes came after all: not stalled

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # uvicorn stops reading while over 64 KiB of body waits for the application, and starts again only in
        # receive(). After a large final read the application never calls receive() again, so a client that
        # leaves would go unseen: read on (a request waiting behind this one pauses reading again, as uvicorn does).
        if not self.pipeline and self.flow is not None:
            self.flow.resume_reading()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start the next pipelined request: its body is watched from now on
        if not self.transport.is_closing():
            self._watch_body()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()
        super().connection_lost(exc)

    def _watch_body(self) -> None:
        # Most requests arrive whole in one read: then no timer is ever armed. Otherwise each read re-arms it, so
        # the limit is on silence, not on the length of an upload.
        self._stop_watching()
        cycle = self.cycle
        if cycle is not None and not self.pipeline and _awaits_body(cycle):
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_stalled, cycle)

    def _stop_watching(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_stalled(self, cycle: RequestResponseCycle) -> None:
        self._body_timer = None
        if cycle is not self.cycle or not _awaits_body(cycle):
            return
        if self.flow is not None and self.flow.read_paused:
            # The server stopped reading (the application has not asked for more yet): that silence is not the
            # client's. Look again later.
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_stalled, cycle)
            return
        cycle.scope[BODY_STALLED] = self.body_timeout  # type: ignore[literal-required]
        cycle.message_event.set()  # a receive() waiting for the body returns what came so far, marked stalled


def _awaits_body(cycle: RequestResponseCycle) -> bool:
    return cycle.more_body and not cycle.response_complete and not cycle.disconnected
