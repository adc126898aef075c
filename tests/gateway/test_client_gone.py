"""Clients that leave, and request bodies that stop arriving, against a real `gatewatch serve` on loopback.

Requests are written on raw sockets so that a test decides exactly when a client goes away (a close after the
whole request, or half-way through its body) or goes quiet. The one inference thread is kept busy by a large
request to a slow model, so that what is queued behind it stays queued until the test has acted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import orjson
import pytest
import redis

from gateway.records import log_stream
from loadtests import onnx_models as om
from tests.conftest import GatewayProcess, RedisServer, start_gateway, write_config
from tests.gateway.test_batching import SLOW_FEATURES, metric, slow_model, v2_request
from tests.polling import wait_for

MODEL = "patience"  # a name of its own: the log stream is read from the shared test Redis
BODY_TIMEOUT = 1.0


@dataclass
class Served:
    gateway: GatewayProcess
    redis: redis.Redis

    def records(self) -> list[dict[str, str]]:
        entries = self.redis.xrange(log_stream(MODEL))
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Served]:
    registry = tmp_path_factory.mktemp("gone-registry")
    om.write_version(registry, MODEL, 1, slow_model())
    workdir = tmp_path_factory.mktemp("gone-gateway")
    config = write_config(
        workdir / "gatewatch.yaml",
        registry,
        inference_threads=1,
        max_batch_size=1,  # each request is its own run: runs count requests that reached the model
        body_timeout_seconds=BODY_TIMEOUT,
        redis_url=redis_server.url,
        log_linger_ms=0,
    )
    client = redis_server.client()
    client.delete(log_stream(MODEL))
    gateway = start_gateway(config, workdir)
    yield Served(gateway, client)
    gateway.terminate()
    client.close()


@pytest.fixture
async def http(served: Served) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=served.gateway.url, timeout=60) as client:
        yield client


def infer_request(
    served: Served, rows: int, seed: int, body_bytes: int | None = None, request_id: str | None = None
) -> bytes:
    """A whole HTTP/1.1 inference request; with `body_bytes`, only that much of its body."""
    data = np.random.default_rng(seed).normal(size=(rows, SLOW_FEATURES)).astype(np.float32)
    body = orjson.dumps(v2_request("x", data, f"{seed}"))
    host = served.gateway.url.removeprefix("http://")
    head = (
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n" + (f"x-request-id: {request_id}\r\n" if request_id else "") + "\r\n"
    ).encode()
    return head + (body if body_bytes is None else body[:body_bytes])


async def connect(served: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = served.gateway.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def send(served: Served, raw: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await connect(served)
    writer.write(raw)
    await writer.drain()
    return reader, writer


async def hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    await writer.wait_closed()


async def counted(http: httpx.AsyncClient, code: str) -> float:
    return await metric(http, "gatewatch_requests_total", endpoint=MODEL, variant="default", model=MODEL,
                        version="1", code=code)


async def runs(http: httpx.AsyncClient) -> float:
    return await metric(http, "gatewatch_batch_size_count", model=MODEL, version="1")


# Rows of a queued request whose JSON body (~400 KB) is over uvicorn's 64 KiB read-pause mark when written at once.
LARGE_ROWS = 2400


async def test_requests_whose_clients_left_never_run_and_are_logged_499(served: Served, http: httpx.AsyncClient
                                                                        ) -> None:
    runs_before, gone_before = await runs(http), await counted(http, "499")
    in_flight_before = await metric(http, "gatewatch_requests_in_flight")
    # The blocker, on a socket of its own: it starts running, and its client leaves while it runs.
    _, blocker = await send(served, infer_request(served, rows=600, seed=1, request_id="blocker"))

    async def blocker_running() -> bool:
        return await metric(http, "gatewatch_requests_in_flight") > in_flight_before

    await wait_for(blocker_running, 30, "the blocker to run")
    queued = [
        await send(served, infer_request(served, rows=1, seed=10 + i, request_id=f"queued-{i}")) for i in range(3)
    ]
    # One large body, written at once: the server has stopped reading its socket by the time the body is in.
    queued.append(await send(served, infer_request(served, rows=LARGE_ROWS, seed=13, request_id="queued-large")))
    request_ids = {"blocker", "queued-0", "queued-1", "queued-2", "queued-large"}

    async def four_queued() -> bool:
        return await metric(http, "gatewatch_queue_depth", model=MODEL, version="1") == 4

    await wait_for(four_queued, 30, "four queued requests")
    for _, writer in queued:
        await hang_up(writer)
    await hang_up(blocker)

    async def all_five_counted() -> bool:
        return await counted(http, "499") - gone_before == 5

    await wait_for(all_five_counted, 30, "five requests counted as 499")
    assert await runs(http) - runs_before == 1  # the blocker ran; nobody ran the four whose clients had left
    assert await metric(http, "gatewatch_queue_depth", model=MODEL, version="1") == 0

    def logged_499() -> list[dict[str, str]]:
        return [r for r in served.records() if r["status"] == "499" and r["id"] in request_ids]

    async def five_logged() -> bool:
        return len(logged_499()) == 5

    await wait_for(five_logged, 30, "five 499 records in the log stream")
    by_id = {record["id"]: record for record in logged_499()}
    assert "while its request ran" in by_id["blocker"]["error"] and by_id["blocker"]["rows"] == "600"
    for i in range(3):
        assert "while its request was queued" in by_id[f"queued-{i}"]["error"] and by_id[f"queued-{i}"]["rows"] == "1"
    assert by_id["queued-large"]["rows"] == str(LARGE_ROWS)

    # The gateway still answers whoever stays.
    response = await http.post(f"/v2/models/{MODEL}/infer", json=v2_request("x", np.ones((1, SLOW_FEATURES))))
    assert response.status_code == 200, response.text


async def test_a_client_that_leaves_mid_body_is_logged_499(served: Served, http: httpx.AsyncClient) -> None:
    gone_before = await counted_unrouted(http, "499")
    _, writer = await send(served, infer_request(served, rows=1, seed=20, body_bytes=25))
    await hang_up(writer)

    async def counted_once() -> bool:
        return await counted_unrouted(http, "499") - gone_before == 1

    await wait_for(counted_once, 30, "the abandoned upload counted as 499")

    def mid_body() -> list[dict[str, str]]:
        return [r for r in served.records() if r["status"] == "499" and "after 25 bytes" in r["error"]]

    async def logged() -> bool:
        return len(mid_body()) == 1

    await wait_for(logged, 30, "the abandoned upload in the log stream")
    assert await counted_unrouted(http, "499") - gone_before == 1
    (record,) = mid_body()
    assert record["endpoint"] == MODEL and "closed the connection after 25 bytes of its request body" in record["error"]


async def counted_unrouted(http: httpx.AsyncClient, code: str) -> float:
    """Requests refused before reaching a version are counted under the name called, version `_unknown`."""
    return await metric(http, "gatewatch_requests_total", endpoint=MODEL, variant="default", model=MODEL,
                        version="_unknown", code=code)


async def test_a_body_that_stops_arriving_gets_408_and_the_connection_closes(served: Served, http: httpx.AsyncClient
                                                                             ) -> None:
    timed_out_before = await counted_unrouted(http, "408")
    reader, writer = await send(served, infer_request(served, rows=1, seed=30, body_bytes=40))
    async with asyncio.timeout(BODY_TIMEOUT * 20):
        answer = await reader.read()  # to EOF: the server closes the connection after answering
    await hang_up(writer)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in head.lower()
    assert "stopped arriving" in orjson.loads(body)["error"]
    assert await counted_unrouted(http, "408") - timed_out_before == 1

    def stalled() -> list[dict[str, str]]:
        return [r for r in served.records() if r["status"] == "408"]

    async def logged() -> bool:
        return len(stalled()) == 1

    await wait_for(logged, 30, "the stalled request in the log stream")
    assert "after 40 bytes" in stalled()[0]["error"]


async def test_a_slow_but_steady_body_is_not_cut_off(served: Served, http: httpx.AsyncClient) -> None:
    raw = infer_request(served, rows=1, seed=40)
    head_end = raw.index(b"\r\n\r\n") + 4
    reader, writer = await send(served, raw[:head_end])
    # Each piece comes well within the timeout of the one before, but the whole body takes longer than it.
    pieces = np.array_split(np.frombuffer(raw[head_end:], dtype=np.uint8), 6)
    for piece in pieces:
        await asyncio.sleep(BODY_TIMEOUT / 3)  # pacing the client, not waiting for the server
        writer.write(piece.tobytes())
        await writer.drain()
    async with asyncio.timeout(30):
        status_line = await reader.readline()
    await hang_up(writer)
    assert status_line.startswith(b"HTTP/1.1 200 "), status_line


async def test_feedback_body_that_stops_arriving_gets_408(served: Served, http: httpx.AsyncClient) -> None:
    host = served.gateway.url.removeprefix("http://")
    raw = (f"POST /v2/models/{MODEL}/feedback HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
           f"content-length: 100\r\n\r\n" + '{"id": "x", ').encode()
    reader, writer = await send(served, raw)
    async with asyncio.timeout(BODY_TIMEOUT * 20):
        answer = await reader.read()
    await hang_up(writer)
    assert answer.startswith(b"HTTP/1.1 408 "), answer


async def test_a_request_waiting_behind_another_on_its_connection_is_not_timed_out(
    served: Served, http: httpx.AsyncClient
) -> None:
    """HTTP pipelining: the server does not read a second request while the first runs, so the second's silence
    is the server's, not its client's; its upload goes on once the first is answered."""
    first = infer_request(served, rows=1500, seed=50, request_id="ahead")  # runs for longer than two timeouts
    second = infer_request(served, rows=1, seed=51, request_id="behind")
    head_end = second.index(b"\r\n\r\n") + 4
    reader, writer = await send(served, first + second[: head_end + 10])
    rest = second[head_end + 10 :]
    async with asyncio.timeout(60):
        answers = [await read_response(reader)]  # the first answer: the second request starts now
        for piece in (rest[: len(rest) // 2], rest[len(rest) // 2 :]):
            await asyncio.sleep(BODY_TIMEOUT / 3)  # pacing the client, not waiting for the server
            writer.write(piece)
            await writer.drain()
        answers.append(await read_response(reader))
    await hang_up(writer)
    assert [status for status, _ in answers] == [200, 200], answers
    assert [orjson.loads(body)["id"] for _, body in answers] == ["50", "51"]


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a content-length: its status and body."""
    status = int((await reader.readline()).split(b" ")[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)
