"""Servers to compare gatewatch against, each run alone as `python -m loadtests.baselines MODE --port P`.

- `naive`: the V2 infer endpoint the way a user would hand-write it with FastAPI: a pydantic request model,
  `np.array(data)`, `session.run`, a dict returned as JSON. No batching, no validation beyond pydantic's.
- `bare`: a plain ASGI app that reads the body and answers a fixed small JSON: the ceiling of uvicorn's HTTP
  path on this machine, with no framework and no model.
- `raw`: an asyncio protocol that answers every request with fixed bytes, with no HTTP parsing beyond framing.
  It is far cheaper than any real server, so a run against it measures the load generator's own ceiling.

`naive` and `bare` run under uvicorn as gatewatch does: uvloop, httptools, one worker, no access log.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

FIXED_JSON = b'{"model_name":"bare","outputs":[]}'


# -- naive FastAPI + pydantic + onnxruntime ----------------------------------------------------------------


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferRequest(BaseModel):
    id: str | None = None
    inputs: list[Tensor]


def load_session(model: Path) -> ort.InferenceSession:
    """One intra-op thread, as gatewatch configures its sessions, so the two differ in serving, not in ORT."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])


def create_naive_app(models: dict[str, Path]) -> FastAPI:
    """`models` maps a model name to its file; the name `*` serves any name not listed."""
    sessions = {name: load_session(path) for name, path in models.items()}
    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    # `async def` calling session.run inline: for a model this small it is the faster of the two ways a user
    # would write it (a plain `def` would add a thread-pool hop per request), so the baseline is not a strawman.
    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: InferRequest) -> dict[str, Any]:
        session = sessions.get(name) or sessions.get("*")
        if session is None:
            raise HTTPException(status_code=404, detail=f"unknown model {name}")
        feeds = {t.name: np.array(t.data, dtype=np.float32).reshape(t.shape) for t in request.inputs}
        names = [output.name for output in session.get_outputs()]
        results = session.run(names, feeds)
        outputs = [
            {"name": n, "shape": list(r.shape), "datatype": _datatype(r), "data": r.ravel().tolist()}
            for n, r in zip(names, results, strict=True)
        ]
        return {"model_name": name, "id": request.id, "outputs": outputs}

    return app


def _model_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    return (name, Path(path)) if sep else ("*", Path(text))


def _datatype(array: np.ndarray) -> str:
    return "INT64" if array.dtype == np.int64 else "FP32"


# -- bare ASGI ------------------------------------------------------------------------------------------


async def bare_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    # Consume the body like a real endpoint would, so the ceiling includes reading the request.
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(FIXED_JSON)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": FIXED_JSON})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# -- raw protocol (the generator's ceiling) -------------------------------------------------------------

RAW_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(FIXED_JSON)).encode()
    + b"\r\n\r\n"
    + FIXED_JSON
)


class RawHttp(asyncio.Protocol):
    """Frames requests by header end + Content-Length and answers each with the same pre-built bytes."""

    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it, so no isinstance check.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
            total = end + 4 + _content_length(self._buffer[:end].lower())
            if len(self._buffer) < total:
                return  # body still arriving
            self._buffer = self._buffer[total:]
            assert self._transport is not None
            self._transport.write(RAW_RESPONSE)


def _content_length(lower_head: bytes) -> int:
    start = lower_head.find(b"\r\ncontent-length:")
    if start < 0:
        return 0
    end = lower_head.find(b"\r\n", start + 2)
    return int(lower_head[start + 17 : end if end >= 0 else None])


async def serve_raw(host: str, port: int) -> None:
    server = await asyncio.get_running_loop().create_server(RawHttp, host, port)
    async with server:
        await server.serve_forever()


# -- entry point ----------------------------------------------------------------------------------------


def _uvicorn(app: Any, host: str, port: int) -> None:
    uvicorn.run(app, host=host, port=port, loop="uvloop", http="httptools", workers=1, access_log=False,
                log_level="warning")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.baselines", description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["naive", "bare", "raw"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", type=_model_arg, action="append", default=[],
                        help="NAME=PATH (repeatable) or PATH for any name (naive only)")
    args = parser.parse_args(argv)
    if args.mode == "naive":
        if not args.model:
            parser.error("naive needs --model")
        _uvicorn(create_naive_app(dict(args.model)), args.host, args.port)
    elif args.mode == "bare":
        _uvicorn(bare_app, args.host, args.port)
    else:
        import uvloop

        uvloop.run(serve_raw(args.host, args.port))


if __name__ == "__main__":
    main()
