"""The HTTP protocol under `gatewatch serve`: uvicorn's httptools protocol, writing each response in one send.

The first tests drive `CoalescingTransport` over a real socket pair (the socket's other end reads what arrived);
the last ones run real uvicorn servers on loopback and count the writes that reach the socket per response, with
uvicorn's stock protocol as the control that shows the count can differ.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.api.http_protocol import FLUSH_BYTES, CoalescingTransport, GatewayHttpProtocol
from tests.conftest import free_port
from tests.polling import wait_for


class _Recorder(asyncio.Protocol):
    pass


class _CountingTransport(asyncio.Transport):
    """A real transport, with the writes that reach it counted."""

    def __init__(self, inner: asyncio.Transport, writes: list[bytes]) -> None:
        super().__init__()
        self._inner = inner
        self._writes = writes

    def write(self, data: Any) -> None:
        self._writes.append(bytes(data))
        self._inner.write(data)

    def __getattribute__(self, name: str) -> Any:
        if name in ("write", "_inner", "_writes"):
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "_inner"), name)


async def _coalescing_pair() -> tuple[CoalescingTransport, list[bytes], socket.socket]:
    """A `CoalescingTransport` over a real loop transport on one end of a socket pair, with the writes reaching
    that transport counted; the other end for reading."""
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_connection(_Recorder, sock=ours)
    writes: list[bytes] = []
    theirs.setblocking(False)
    return CoalescingTransport(_CountingTransport(transport, writes), loop), writes, theirs


async def _read(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    received = b""
    while len(received) < size:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, size - len(received)), 5)
        if not chunk:
            break
        received += chunk
    return received


async def test_writes_of_one_loop_turn_reach_the_socket_as_one_write_in_order() -> None:
    transport, writes, peer = await _coalescing_pair()
    transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
    transport.write(memoryview(b"hello"))
    assert writes == []  # held until the turn ends
    assert transport.get_write_buffer_size() == 43
    await asyncio.sleep(0)
    assert writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"]
    assert await _read(peer, 43) == writes[0]
    transport.write(b"next")
    await asyncio.sleep(0)
    assert writes[1:] == [b"next"]
    transport.close()
    peer.close()


async def test_a_large_write_goes_at_once_with_what_was_held_before_it() -> None:
    transport, writes, peer = await _coalescing_pair()
    transport.write(b"head")
    transport.write(b"x" * FLUSH_BYTES)
    assert writes == [b"head" + b"x" * FLUSH_BYTES]
    received = await _read(peer, FLUSH_BYTES + 4)
    assert received == writes[0]
    transport.close()
    peer.close()


async def test_close_sends_what_was_written_first_and_abort_drops_it() -> None:
    transport, writes, peer = await _coalescing_pair()
    transport.write(b"last words")
    transport.close()
    assert transport.is_closing()
    assert await _read(peer, 64) == b"last words"  # then EOF
    peer.close()

    transport, writes, peer = await _coalescing_pair()
    transport.write(b"never sent")
    transport.abort()
    await asyncio.sleep(0)
    assert writes == []
    assert await _read(peer, 64) == b""
    peer.close()


# -- real servers ---------------------------------------------------------------------------------------------


async def _two_part_app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """An ASGI app that answers like the gateway's fast path: a start message, then one body message."""
    if scope["type"] != "http":
        return
    body = b'{"ok":true}'
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _counting(protocol: type[HttpToolsProtocol], writes: list[bytes]) -> type[HttpToolsProtocol]:
    class Counting(protocol):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(_CountingTransport(transport, writes))

    return Counting


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[type[HttpToolsProtocol]], Any]]:
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []

    async def start(protocol: type[HttpToolsProtocol]) -> int:
        port = free_port()
        config = uvicorn.Config(_two_part_app, host="127.0.0.1", port=port, http=protocol, lifespan="off",
                                log_level="warning", loop="none")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        servers.append((server, task))
        await wait_for(lambda: server.started, 10, "uvicorn to start", interval=0.01)
        return port

    yield start
    for server, task in servers:
        server.should_exit = True
        await task


async def _pipelined_then_close(port: int, requests: int) -> bytes:
    """Everything the server sends for `requests` pipelined requests, the last one asking to close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"
    closing = b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    writer.write(request * (requests - 1) + closing)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(-1), 5)  # to EOF: the server closes after the last answer
    writer.close()
    return data


@pytest.mark.parametrize(("protocol", "writes_per_response"), [(GatewayHttpProtocol, 1), (HttpToolsProtocol, 2)])
async def test_each_response_reaches_the_socket_in_writes_per_response(
    serve: Callable[[type[HttpToolsProtocol]], Any], protocol: type[HttpToolsProtocol], writes_per_response: int
) -> None:
    writes: list[bytes] = []
    port = await serve(_counting(protocol, writes))
    for _ in range(5):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        response = await asyncio.wait_for(reader.readuntil(b'{"ok":true}'), 5)
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        writer.close()
    assert len(writes) == 5 * writes_per_response


async def test_pipelined_requests_and_connection_close_are_answered_whole(
    serve: Callable[[type[HttpToolsProtocol]], Any],
) -> None:
    port = await serve(GatewayHttpProtocol)
    data = await _pipelined_then_close(port, 3)
    assert data.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert data.count(b'{"ok":true}') == 3
    assert data.endswith(b'{"ok":true}')
