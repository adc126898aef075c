"""Load goes to loopback only: anything else is refused before a connection is opened."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from loadtests.cli import app
from loadtests.target import HttpTarget, NotLoopback, encode_request, parse_url


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000/", "http://example.com/", "http://0.0.0.0:80/",
                                 "http://127.0.0.2:80/", "http://[::2]:80/"])
def test_parse_url_refuses_non_loopback_hosts(url: str) -> None:
    with pytest.raises(NotLoopback):
        parse_url(url)


@pytest.mark.parametrize(("url", "expected"), [
    ("http://127.0.0.1:8000/v2/models/m/infer", ("127.0.0.1", 8000, "/v2/models/m/infer")),
    ("http://[::1]:9000/x?y=1", ("::1", 9000, "/x?y=1")),
    ("http://localhost", ("localhost", 80, "/")),
])
def test_parse_url_accepts_loopback(url: str, expected: tuple[str, int, str]) -> None:
    assert parse_url(url) == expected


def test_target_itself_refuses_other_hosts() -> None:
    with pytest.raises(NotLoopback):
        HttpTarget("192.168.1.10", 80)
    with pytest.raises(NotLoopback):
        encode_request("example.com", 80, "/")


def test_cli_run_refuses_a_remote_url() -> None:
    result = CliRunner().invoke(app, ["run", "http://10.1.2.3:8000/", "-t", "0.1", "--driver", "builtin"])
    assert result.exit_code == 2
    assert "only 127.0.0.1, ::1 and localhost" in result.output


def test_encoded_request_has_content_length_and_default_type() -> None:
    target = encode_request("127.0.0.1", 8000, "/p", b"abc", headers={"X-A": "1"})
    assert target.request.startswith(b"POST /p HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n")
    assert b"\r\nContent-Type: application/json\r\n" in target.request
    assert target.request.endswith(b"Content-Length: 3\r\n\r\nabc")
