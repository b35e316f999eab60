"""Download one file, retrying transient faults, into a verified temp file.

``Downloader.fetch`` runs attempts (``mirror.fetch.attempt``) under the
retry policy (``mirror.upstream.retry``) and the shared
``trio.CapacityLimiter``, held for one attempt and never across a backoff
sleep.  It counts every verified file and every failed attempt.  With a
``FetchPool`` set (a large cycle), attempts run in helper processes instead
and only the commit takes a thread hop here.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from mirror.errors import DownloadError
from mirror.fetch.attempt import Verified, attempt
from mirror.fetch.pool import FetchPool, NoWorker
from mirror.layout import new_temp_name
from mirror.metrics import Metrics
from mirror.upstream.config import UpstreamConfig
from mirror.upstream.files import FileSource
from mirror.upstream.retry import GONE, RetryPolicy

log = logging.getLogger(__name__)

# Attempts that failed before any response arrived.
_UNANSWERED = frozenset({"connection", "timeout"})


class Downloader:
    def __init__(
        self,
        files: FileSource,
        tmp: Path,
        *,
        cfg: UpstreamConfig,
        metrics: Metrics,
        limiter: trio.CapacityLimiter,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = trio.sleep,
    ) -> None:
        self.files = files
        self.tmp = tmp
        self.cfg = cfg
        self.retry = RetryPolicy.of(cfg)
        self.metrics = metrics
        self.limiter = limiter
        self.rng = rng or random.Random()
        self.sleep = sleep
        # Set for a large cycle: attempts then run in helper processes.
        self.pool: FetchPool | None = None

    async def fetch(self, url: str, *, sha256: str | None, size: int | None, limit: int | None = None) -> Verified:
        """Download ``url`` to a verified temp file (see ``attempt``)."""
        last: DownloadError | None = None
        for n in range(self.retry.attempts):
            if n:
                await self.sleep(self.retry.delay(n, self.rng))
            try:
                async with self.limiter:
                    v = await self._attempt(url, sha256=sha256, size=size, limit=limit)
                self.metrics.files_downloaded.inc()
                self.metrics.bytes_downloaded.inc(v.size)
                return v
            except DownloadError as e:
                self.metrics.download_errors.labels(e.reason).inc()
                log.debug("download %s failed (attempt %d): %s", url, n + 1, e)
                last = e
                if e.reason == "http_status" and e.detail in {f"HTTP {s}" for s in GONE} and n >= 1:
                    break  # gone; do not hammer
        assert last is not None
        raise last

    async def _attempt(self, url: str, *, sha256: str | None, size: int | None, limit: int | None) -> Verified:
        if self.pool is not None:
            try:
                tmp, n, digest = await self.pool.attempt(url, sha256=sha256, size=size, limit=limit)
            except NoWorker:
                pass  # no helper left: download here
            except DownloadError as e:
                # Counted here, as ``attempt`` counts in-process: a request
                # is one that got an answer.
                if e.reason not in _UNANSWERED:
                    self.metrics.upstream_requests.labels("file").inc()
                raise
            else:
                self.metrics.upstream_requests.labels("file").inc()
                return Verified(tmp, n, digest)
        return await attempt(self.files, url, self.tmp / new_temp_name(), sha256=sha256, size=size, limit=limit,
                             timeout=self.cfg.timeout, metrics=self.metrics)
