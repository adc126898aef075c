"""deploy/README.md's webhook verification snippet, run against signatures made by the monitor's own signing code."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from monitors.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, signature
from tests.deploy.helpers import DEPLOY

Verifier = Callable[..., bool]


@pytest.fixture(scope="module")
def verify() -> Verifier:
    blocks = re.findall(r"```python\n(.*?)```", (DEPLOY / "README.md").read_text(), re.DOTALL)
    [snippet] = [block for block in blocks if "def verify_gatewatch_webhook" in block]
    namespace: dict[str, Any] = {}
    exec(compile(snippet, "deploy/README.md", "exec"), namespace)  # the documented code, as a reader copies it
    function: Verifier = namespace["verify_gatewatch_webhook"]
    return function


def signed(secret: str, body: bytes, timestamp: int) -> dict[str, str]:
    ts = str(timestamp)
    return {TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: signature(secret.encode(), ts, body)}


BODY = b'{"event_id":"e-1","type":"drift.detected","endpoint":"fraud"}'


def test_snippet_accepts_what_the_monitor_signs(verify: Verifier) -> None:
    now = int(time.time())
    assert verify("s3cret", signed("s3cret", BODY, now), BODY)
    # Header names are case-insensitive over HTTP; frameworks hand them over lower-cased.
    lowered = {key.lower(): value for key, value in signed("s3cret", BODY, now).items()}
    assert verify("s3cret", lowered, BODY)


def test_snippet_rejects_tampering_wrong_secret_and_replays(verify: Verifier) -> None:
    now = int(time.time())
    headers = signed("s3cret", BODY, now)
    assert not verify("s3cret", headers, BODY.replace(b"fraud", b"other"))
    assert not verify("another", headers, BODY)
    assert not verify("s3cret", {**headers, TIMESTAMP_HEADER: str(now + 1)}, BODY)  # timestamp is signed too
    old = signed("s3cret", BODY, now - 3600)
    assert not verify("s3cret", old, BODY)
    assert verify("s3cret", old, BODY, now=now - 3600 + 10)  # only the age rejected it
    assert not verify("s3cret", {}, BODY)
