"""Signed webhook delivery with retries and a dead-letter stream (design.md, "Webhooks").

Each POST carries the event's JSON body as stored, `X-Gatewatch-Event-Id`, `X-Gatewatch-Timestamp` (unix
seconds) and `X-Gatewatch-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`. Timeouts, connection
errors, 5xx (and 429) are retried with exponential backoff and full jitter; after the last try, or at once on any
other answer, the event goes to `gatewatch:deadletter` with the URL, the tries and the last error. Every try of
one event reuses its event id, so a receiver that saw an earlier try succeed can drop the repeat.

    >>> signature(b"secret", "1700000000", b'{"event_id": "…"}')
    'sha256=…'
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import random
import time
from dataclasses import dataclass

import httpx
from redis.asyncio import Redis

from gateway.records import DEADLETTER_STREAM
from monitors.metrics import MonitorMetrics

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Gatewatch-Signature"
TIMESTAMP_HEADER = "X-Gatewatch-Timestamp"
EVENT_ID_HEADER = "X-Gatewatch-Event-Id"


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, header: str) -> bool:
    """What a receiver does: recompute and compare in constant time."""
    return hmac.compare_digest(signature(secret, timestamp, body), header)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    backoff: float = 0.5
    backoff_max: float = 30.0
    timeout: float = 5.0

    def delay(self, retry: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max, backoff * 2^retry)], so many senders don't retry in step."""
        return rng.uniform(0, min(self.backoff_max, self.backoff * 2.0**retry))

    @property
    def longest(self) -> float:
        """An upper bound on one delivery's duration (all tries timing out, longest waits)."""
        waits = sum(min(self.backoff_max, self.backoff * 2.0**i) for i in range(self.attempts - 1))
        return self.attempts * self.timeout + waits


class WebhookSender:
    def __init__(
        self,
        client: httpx.AsyncClient,
        redis: Redis,
        secret: bytes | None,
        policy: RetryPolicy,
        metrics: MonitorMetrics,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._redis = redis
        self._secret = secret
        self._policy = policy
        self._metrics = metrics
        self._rng = rng or random.Random()

    async def deliver(self, event_id: str, body: bytes, url: str) -> bool:
        """POST until a 2xx answer (True) or the retries run out (False, dead-lettered)."""
        last_error, attempt = "", 0
        for attempt in range(1, self._policy.attempts + 1):
            last_error, retryable = await self._post(event_id, body, url)
            if not last_error:
                self._metrics.webhook_delivered()
                return True
            if not retryable or attempt == self._policy.attempts:
                break
            self._metrics.webhook_retried()
            await asyncio.sleep(self._policy.delay(attempt - 1, self._rng))
        logger.warning("webhook %s for event %s failed after %d tries (%s): dead-lettered",
                       url, event_id, attempt, last_error)
        await self._redis.xadd(
            DEADLETTER_STREAM,
            {"event": body, "url": url, "attempts": str(attempt), "last_error": last_error},
        )
        self._metrics.webhook_dead()
        return False

    async def _post(self, event_id: str, body: bytes, url: str) -> tuple[str, bool]:
        """("", _) when delivered, else (what went wrong, whether it is worth another try)."""
        timestamp = str(int(time.time()))
        headers = {"content-type": "application/json", EVENT_ID_HEADER: event_id, TIMESTAMP_HEADER: timestamp}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = signature(self._secret, timestamp, body)
        try:
            response = await self._client.post(url, content=body, headers=headers, timeout=self._policy.timeout)
        except httpx.TimeoutException as exc:
            return f"timeout: {type(exc).__name__}", True
        except httpx.TransportError as exc:
            return f"{type(exc).__name__}: {exc}", True
        if response.is_success:
            return "", False
        retryable = response.status_code >= 500 or response.status_code == 429
        return f"HTTP {response.status_code}", retryable
