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
from collections.abc import Callable
import re
import ssl
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

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

    @property
    def max_throttled(self) -> int:
        """Waits the upstream may ask for in one request's life before its
        answers count as failures: a bound, so a server that always says
        "later" cannot hold a request forever."""
        return 4 * self.attempts

    def throttle_delay(self, asked: float) -> float:
        """The wait the upstream asked for, capped at ``max_backoff``."""
        return min(self.max_backoff, max(0.0, asked))

    def tries(self, rng: random.Random, *, attempts: int | None = None) -> Tries:
        """The retry state of one request (``attempts``: default the policy's)."""
        return Tries(self, rng, self.attempts if attempts is None else attempts)

    def delay(self, failures: int, rng: random.Random) -> float:
        """Seconds to wait after ``failures`` failed attempts (>= 1):
        exponential, capped at ``max_backoff``, with jitter in [0.5, 1.5)."""
        step = min(self.max_backoff, self.backoff * 2.0 ** (failures - 1))
        return float(step * (0.5 + rng.random()))


@dataclass
class Tries:
    """One request's way through the policy, for every caller (the feed, the
    pages, the files).  The caller attempts, sleeps and counts."""

    policy: RetryPolicy
    rng: random.Random
    attempts: int
    failures: int = 0
    throttled: int = 0

    def after_failure(self, *, asked: float | None = None, final: bool = False) -> tuple[float | None, bool]:
        """(seconds to wait before the next attempt, or None to give up;
        True when the wait is one the upstream asked for).

        ``asked`` is the upstream's wait hint (``throttle_wait``): honoured up
        to ``max_backoff`` without spending an attempt, at most
        ``max_throttled`` times.  ``final``: no further attempt can help."""
        if asked is not None and not final and self.throttled < self.policy.max_throttled:
            self.throttled += 1
            return self.policy.throttle_delay(asked), True
        self.failures += 1
        if final or self.failures >= self.attempts:
            return None, False
        return self.policy.delay(self.failures, self.rng), False


def should_retry_status(status: int) -> bool:
    """A page or feed answer worth asking again: 429 and every 5xx."""
    return status == 429 or status >= 500


# Statuses whose wait hints are honoured.
THROTTLE = frozenset({429, 503})
_RATELIMIT_RESET = re.compile(r"(?:^|[;,\s])(?:reset|t)\s*=\s*(\d+)")
_RATELIMIT_LEFT = re.compile(r"(?:^|[;,\s])(?:remaining|r)\s*=\s*(\d+)")


def throttle_wait(status: int, header: Callable[[str], str | None], *, now: float) -> float | None:
    """Seconds the upstream asked us to wait before asking again, or None.

    ``Retry-After`` on a 429 or 503, in seconds or as an HTTP date; else the
    reset time of a ``RateLimit`` header (``reset=`` of the older draft, ``t=``
    of the structured one) when the status is 429/503 or the quota left is 0.
    ``header`` looks a response header up by its lower-case name."""
    if status not in THROTTLE and status < 400:
        return None
    retry_after, ratelimit = header("retry-after"), header("ratelimit")
    if status in THROTTLE and retry_after:
        value = retry_after.strip()
        if value.isdigit():
            return float(value)
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            when = None
        if when is not None and when.tzinfo is not None:
            return max(0.0, when.timestamp() - now)
    if ratelimit:
        reset = _RATELIMIT_RESET.search(ratelimit)
        left = _RATELIMIT_LEFT.search(ratelimit)
        if reset and (status in THROTTLE or (left is not None and int(left.group(1)) == 0)):
            return float(reset.group(1))
    return None


_VERIFY = re.compile(r"certificate verify failed: ([^(]*)")


def tls_failure(e: BaseException) -> str | None:
    """Why the server's certificate was refused, when that is what ``e`` is
    (httpx's ConnectError or the file client's, raised over an
    ``ssl.SSLCertVerificationError``), else None.  Not worth a retry: the
    trust settings are wrong, or someone is in the middle."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, ssl.SSLCertVerificationError):
            return str(x.verify_message or "certificate verify failed")
        text = str(x)
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
            m = _VERIFY.search(text)
            return m.group(1).strip() if m else "certificate verify failed"
        x = x.__cause__ or x.__context__
    return None


def tls_message(url: str, why: str) -> str:
    """The one line for a refused certificate: the host, the reason, the fix."""
    host = urlsplit(url).netloc
    return (f"TLS: the certificate of {host} was refused ({why}); if a proxy or a private CA signs it, "
            "set upstream.ca_bundle (or SSL_CERT_FILE) to that CA")


def classify(e: httpx.TransportError) -> tuple[str, str]:
    """(reason, detail) of an attempt that failed in the transport."""
    detail = f"{type(e).__name__}: {e}"[:200]
    if (why := tls_failure(e)) is not None:
        return "tls", why
    if isinstance(e, httpx.TimeoutException):
        return "timeout", type(e).__name__
    if isinstance(e, httpx.RemoteProtocolError):
        # The peer closed mid-message: a body cut short.
        return "truncated", detail
    return "connection", detail
