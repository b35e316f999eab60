"""The retry policy: how long to wait before the next attempt, which answers
are worth another attempt, and what a failed attempt is called.

One policy serves the feed, the project pages and the files, so a change to
the backoff or to how a transport error is classified applies to all three.
The reason names are the label values of ``mirror_download_errors_total``
and ``mirror_upstream_errors_total``.

Pure: the caller sleeps and counts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import httpx

from mirror.upstream.config import UpstreamConfig

# Answers that say "this will not get better by asking again right away":
# retried once (a CDN can return one transient 404), then given up on.
GONE = frozenset({403, 404, 410})


@dataclass(frozen=True)
class RetryPolicy:
    retries: int
    backoff: float
    max_backoff: float

    @classmethod
    def of(cls, cfg: UpstreamConfig) -> RetryPolicy:
        return cls(cfg.retries, cfg.backoff, cfg.max_backoff)

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after ``failures`` failed attempts (>= 1):
        exponential, capped at ``max_backoff``, with jitter in [0.5, 1.5)."""
        step = min(self.max_backoff, self.backoff * 2.0 ** (failures - 1))
        return float(step * (0.5 + rng.random()))


def should_retry_status(status: int) -> bool:
    """A page or feed answer worth asking again: 429 and every 5xx."""
    return status == 429 or status >= 500


def classify(e: httpx.TransportError) -> tuple[str, str]:
    """(reason, detail) of an attempt that failed in the transport."""
    detail = f"{type(e).__name__}: {e}"[:200]
    if isinstance(e, httpx.TimeoutException):
        return "timeout", type(e).__name__
    if isinstance(e, httpx.RemoteProtocolError):
        # The peer closed mid-message: a body cut short.
        return "truncated", detail
    return "connection", detail
