"""What a load run sends and where: a loopback-only HTTP target with its request pre-encoded once."""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

LOOPBACK_NAMES = frozenset({"127.0.0.1", "::1", "localhost"})


class NotLoopback(ValueError):
    """The target is not on this machine's loopback interface: we never send load anywhere else."""


def ensure_loopback(host: str) -> str:
    """Return `host` if it is 127.0.0.1, ::1 or localhost (and localhost resolves only to loopback)."""
    bare = host.strip("[]")
    if bare not in LOOPBACK_NAMES:
        raise NotLoopback(f"refusing to send load to {host!r}: only 127.0.0.1, ::1 and localhost are allowed")
    if bare == "localhost":
        # /etc/hosts could point localhost elsewhere; check what we would actually connect to.
        addresses = {info[4][0] for info in socket.getaddrinfo(bare, None, proto=socket.IPPROTO_TCP)}
        strays = [a for a in addresses if not ipaddress.ip_address(str(a).split("%")[0]).is_loopback]
        if strays:
            raise NotLoopback(f"refusing to send load to localhost: it resolves to {strays}")
    return bare


@dataclass(frozen=True)
class HttpTarget:
    """A loopback server and the one request sent to it, again and again."""

    host: str
    port: int
    path: str = "/"
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = field(default=None, repr=False)
    expected_status: int = 200

    def __post_init__(self) -> None:
        ensure_loopback(self.host)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"

    @functools.cached_property
    def request(self) -> bytes:
        """The exact HTTP/1.1 keep-alive request bytes, built once."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in self.all_headers()]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head + (self.body or b"")

    def all_headers(self) -> list[tuple[str, str]]:
        """The headers as sent, Content-Length (and a default Content-Type) included when there is a body."""
        headers = list(self.headers)
        if self.body is not None:
            if not any(name.lower() == "content-type" for name, _ in headers):
                headers.append(("Content-Type", "application/json"))
            headers = [(n, v) for n, v in headers if n.lower() != "content-length"]
            headers.append(("Content-Length", str(len(self.body))))
        return headers


def encode_request(
    host: str,
    port: int,
    path: str,
    body: bytes | None = None,
    method: str | None = None,
    headers: Mapping[str, str] | None = None,
    expected_status: int = 200,
) -> HttpTarget:
    """A target for `path` on a loopback port: POST when there is a body, else GET."""
    verb = method or ("POST" if body is not None else "GET")
    return HttpTarget(host, port, path, verb, tuple((headers or {}).items()), body, expected_status)


def parse_url(url: str) -> tuple[str, int, str]:
    """`http://127.0.0.1:8000/path?q` -> (host, port, path with query); loopback and plain http only."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported, not {url!r}")
    if parts.hostname is None:
        raise ValueError(f"no host in {url!r}")
    host = ensure_loopback(parts.hostname)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return host, parts.port or 80, path
