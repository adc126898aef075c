"""A bare uvicorn server on a free loopback port, shared by the load-generator tests."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from loadtests.servers import ManagedServer, ServerSpec, start_server


@pytest.fixture(scope="package")
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    log = tmp_path_factory.mktemp("bare") / "bare.log"
    server = start_server("bare", ServerSpec([sys.executable, "-m", "loadtests.baselines", "bare"]), log)
    try:
        server.wait_ready(timeout=30)
        yield server
    finally:
        server.stop()
