"""Download one file, retrying transient faults, into a verified temp file.

``Downloader.fetch`` runs attempts (``mirror.fetch.attempt``) under the
retry policy (``mirror.upstream.retry``) and the shared
``trio.CapacityLimiter``, held for one attempt and never across a backoff
sleep.  It counts every verified file and every failed attempt.

``fetch_batch`` is how a project's files are fetched: all of them
concurrently, each through ``fetch_file``.  With a ``FetchPool`` set (a large
cycle) the whole batch goes to one helper process in one frame, and that
helper runs this same class (its own limiter, its share of ``workers``) and
answers once, with the counts it made; the main process pays two frames per
project instead of two per file.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import cast

import trio

from mirror.errors import DownloadError, UnsafeInput
from mirror.fetch.attempt import FileJob, Outcome, Verified, attempt, discard
from mirror.fetch.pool import FetchPool, NoWorker
from mirror.layout import new_temp_name
from mirror.metrics import Metrics
from mirror.upstream.config import UpstreamConfig
from mirror.upstream.files import FileSource
from mirror.upstream.retry import GONE, RetryPolicy

log = logging.getLogger(__name__)

_GONE = frozenset(f"HTTP {s}" for s in GONE)


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
        inline: bool = False,
    ) -> None:
        self.files = files
        # Write bodies without thread hops (a helper, whose loop does nothing else).
        self.inline = inline
        self.tmp = tmp
        self.cfg = cfg
        self.retry = RetryPolicy.of(cfg)
        self.metrics = metrics
        self.limiter = limiter
        self.rng = rng or random.Random()
        self.sleep = sleep
        # Set for a large cycle: batches then run in helper processes.
        self.pool: FetchPool | None = None

    def in_flight(self) -> bool:
        """Is any download attempt running here, or any batch in a helper?"""
        return self.limiter.borrowed_tokens > 0 or (self.pool is not None and self.pool.busy())

    async def fetch_batch(self, jobs: Sequence[FileJob]) -> list[Outcome]:
        """``fetch_file`` for every job, concurrently; one outcome per job, in
        order.  In a helper process when a pool is set (and one is alive).
        Cancelled, it leaves no temp behind."""
        if self.pool is not None:
            try:
                return await self.pool.fetch_batch(jobs)
            except NoWorker:
                pass  # no helper left: here
        results: list[Outcome | None] = [None] * len(jobs)

        async def one(i: int, job: FileJob) -> None:
            try:
                results[i] = await self.fetch_file(job.url, job.rel, sha256=job.sha256, size=job.size, limit=job.limit)
            except (DownloadError, UnsafeInput) as e:
                results[i] = e

        try:
            async with trio.open_nursery() as nursery:
                for i, job in enumerate(jobs):
                    nursery.start_soon(one, i, job)
        except BaseException:
            if done := [r.tmp for r in results if isinstance(r, Verified)]:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_discard_all, done)
            raise
        return cast(list[Outcome], results)

    async def fetch_file(self, url: str, rel: str, *, sha256: str | None, size: int | None,
                         limit: int | None = None) -> Verified:
        """``fetch``, from ``[upstream] download_mirror`` first when one is
        set: the same ``rel`` path under it, held to the sha256 and size that
        upstream's page gave.  A 404, a wrong hash or size, or a transport
        error there falls back to upstream's ``url`` (one attempt on the
        mirror, then upstream's retries), unless ``download_mirror_only``."""
        base = self.cfg.download_mirror
        if not base or sha256 is None:
            # No mirror, or nothing to hold a mirror's bytes to.
            v = await self.fetch(url, sha256=sha256, size=size, limit=limit)
            self.metrics.files_by_source.labels("upstream").inc()
            return v
        only = self.cfg.download_mirror_only
        try:
            v = await self.fetch(f"{base}/{rel}", sha256=sha256, size=size, limit=limit, attempts=None if only else 1)
        except DownloadError as e:
            self.metrics.download_mirror_misses.labels(e.reason).inc()
            if only:
                raise
            log.debug("download mirror has no good %s (%s); from upstream", rel, e)
        else:
            self.metrics.files_by_source.labels("download_mirror").inc()
            return v
        v = await self.fetch(url, sha256=sha256, size=size, limit=limit)
        self.metrics.files_by_source.labels("upstream").inc()
        return v

    async def fetch(self, url: str, *, sha256: str | None, size: int | None, limit: int | None = None,
                    attempts: int | None = None) -> Verified:
        """Download ``url`` to a verified temp file (see ``attempt``), in at
        most ``attempts`` tries (default: the retry policy's)."""
        tries = self.retry.tries(self.rng, attempts=attempts)
        wait: float | None = 0.0
        while True:
            if wait:
                await self.sleep(wait)
            try:
                async with self.limiter:
                    v = await self._attempt(url, sha256=sha256, size=size, limit=limit)
                self.metrics.files_downloaded.inc()
                self.metrics.bytes_downloaded.inc(v.size)
                return v
            except DownloadError as e:
                # Gone (asked twice: a CDN can 404 once), or a refused
                # certificate: no further attempt helps.
                gone = e.reason == "http_status" and e.detail in _GONE and tries.failures >= 1
                wait, throttled = tries.after_failure(asked=e.wait, final=gone or e.reason == "tls")
                if throttled:
                    self.metrics.throttled.labels("file").inc()
                    log.info("download %s: %s, asked to wait %.0fs; waiting %.1fs", url, e.detail, e.wait, wait)
                    continue
                self.metrics.download_errors.labels(e.reason).inc()
                log.debug("download %s failed (attempt %d): %s", url, tries.failures, e)
                if wait is None:
                    raise

    async def _attempt(self, url: str, *, sha256: str | None, size: int | None, limit: int | None) -> Verified:
        return await attempt(self.files, url, self.tmp / new_temp_name(), sha256=sha256, size=size, limit=limit,
                             timeout=self.cfg.timeout, metrics=self.metrics, inline=self.inline)


def _discard_all(temps: list[Path]) -> None:
    for tmp in temps:
        discard(tmp)
