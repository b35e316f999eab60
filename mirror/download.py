"""Download one file into a temp file and prove it is the file upstream promised.

A ``Downloader`` never touches a final path: it returns a ``Verified`` temp
file (size and sha256 checked, fsynced) and the caller hands it to
``Tree.commit_file``.  Bytes are hashed while they stream; reading stops at
``size + 1`` so an upstream cannot fill the disk with an oversized body.

Concurrency is bounded by a shared ``trio.CapacityLimiter`` held for one
attempt (not across backoff sleeps).  Disk writes take one thread hop per
megabyte-sized batch, so a typical 40 KB file costs a single hop for
write + fsync.  With a ``FetchPool`` set (a large cycle), the attempt runs
in a helper process instead and only the commit takes a hop here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

import httpx
import trio

from mirror.config import UpstreamConfig
from mirror.errors import DownloadError, HashMismatch, SizeMismatch
from mirror.fetchpool import FetchPool, NoWorker
from mirror.metrics import Metrics
from mirror.tree import Tree, disk_error

log = logging.getLogger(__name__)

FLUSH_BYTES = 1 << 20
# Total time allowed per attempt: the request timeout plus the file at a
# pessimistic 64 KB/s, so a stalled-but-trickling upstream is cut off.  When
# the size is unknown the deadline moves with the bytes received, which asks
# for the same average rate.
MIN_RATE = 64 * 1024


@dataclass(frozen=True)
class Verified:
    tmp: Path
    size: int
    sha256: str


class _Sink:
    """Temp file writer whose blocking calls run in worker threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f: BinaryIO | None = None
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    def _write(self, chunks: list[bytes], final: bool) -> None:
        if self.f is None:
            self.f = open(self.path, "wb")
        for c in chunks:
            self.f.write(c)
        if final:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()

    async def add(self, chunk: bytes) -> None:
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)
        if self.pending_bytes >= FLUSH_BYTES:
            chunks, self.pending, self.pending_bytes = self.pending, [], 0
            await trio.to_thread.run_sync(self._write, chunks, False)

    async def finish(self, commit: Callable[[Path], None] | None = None) -> None:
        """Write the rest, fsync, close and (if given) hand the file to
        ``commit``, all in one thread hop: per small file that hop, not the
        network, is what bounds a first sync."""
        chunks, self.pending = self.pending, []

        def done() -> None:
            self._write(chunks, True)
            if commit is not None:
                commit(self.path)

        await trio.to_thread.run_sync(done)

    def close(self) -> None:
        if self.f is not None and not self.f.closed:
            try:
                self.f.close()
            except OSError:
                pass  # flushing to a full disk fails again; the temp is discarded next


class Downloader:
    def __init__(
        self,
        client: httpx.AsyncClient,
        tree: Tree,
        *,
        cfg: UpstreamConfig,
        metrics: Metrics,
        limiter: trio.CapacityLimiter,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = trio.sleep,
    ) -> None:
        self.client = client
        self.tree = tree
        self.cfg = cfg
        self.metrics = metrics
        self.limiter = limiter
        self.rng = rng or random.Random()
        self.sleep = sleep
        # Set for a large cycle: attempts then run in helper processes.
        self.pool: FetchPool | None = None

    async def fetch(
        self, url: str, *, sha256: str | None, size: int | None, limit: int | None = None,
        commit: Callable[[Path], None] | None = None,
    ) -> Verified:
        """Download ``url`` to a verified temp file, retrying transient faults.

        ``sha256=None`` (PEP 658 ``true`` without a hash) means: accept and
        report the digest we computed.  ``limit`` caps a body whose ``size``
        is unknown (sidecars), so an endless body cannot fill the disk.
        ``commit`` (the tree's, never ours: this module does not know final
        paths) is called with the verified, fsynced temp file in the same
        thread hop; ``Verified.tmp`` has then been moved by it."""
        last: DownloadError | None = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                step = min(self.cfg.max_backoff, self.cfg.backoff * 2 ** (attempt - 1))
                await self.sleep(step * (0.5 + self.rng.random()))
            try:
                async with self.limiter:
                    v = await self._attempt(url, sha256=sha256, size=size, limit=limit, commit=commit)
                self.metrics.files_downloaded.inc()
                self.metrics.bytes_downloaded.inc(v.size)
                return v
            except DownloadError as e:
                self.metrics.download_errors.labels(e.reason).inc()
                log.debug("download %s failed (attempt %d): %s", url, attempt + 1, e)
                last = e
                if e.reason == "http_status" and e.detail in ("HTTP 404", "HTTP 410", "HTTP 403") and attempt >= 1:
                    break  # gone; do not hammer
        assert last is not None
        raise last

    async def _attempt(
        self, url: str, *, sha256: str | None, size: int | None, limit: int | None,
        commit: Callable[[Path], None] | None,
    ) -> Verified:
        if self.pool is not None:
            try:
                tmp, n, digest = await self.pool.attempt(url, sha256=sha256, size=size, limit=limit)
            except NoWorker:
                pass  # no helper left: download here
            else:
                if commit is not None:
                    await trio.to_thread.run_sync(commit, tmp)
                return Verified(tmp, n, digest)
        tmp = self.tree.new_temp()
        sink = _Sink(tmp)
        ok = False
        deadline = self.cfg.timeout + (size or 0) / MIN_RATE
        try:
            with trio.move_on_after(deadline) as scope:
                result = await self._stream(url, sink, sha256=sha256, size=size, limit=limit, scope=scope,
                                            commit=commit)
                ok = True
                return result
            raise DownloadError(url, "timeout", f"body slower than {MIN_RATE // 1024} KB/s after {self.cfg.timeout:g}s")
        except OSError as e:
            raise disk_error(e, f"writing temp file for {url}") from None
        finally:
            if not ok:
                sink.close()
                # Shielded so a cancelled download still removes its temp.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.tree.discard, tmp)
            del scope

    async def _stream(
        self, url: str, sink: _Sink, *, sha256: str | None, size: int | None, limit: int | None,
        scope: trio.CancelScope, commit: Callable[[Path], None] | None,
    ) -> Verified:
        h = hashlib.sha256()
        n = 0
        started = trio.current_time()
        try:
            async with self.client.stream("GET", url) as r:
                self.metrics.upstream_requests.labels("file").inc()
                if r.status_code != 200:
                    raise DownloadError(url, "http_status", f"HTTP {r.status_code}")
                # Chunks as they arrive (<= 64 KB), so the size check and the
                # moving deadline see every read.
                chunks = cast(AsyncGenerator[bytes, None], r.aiter_bytes())
                try:
                    async for chunk in chunks:
                        n += len(chunk)
                        if size is not None and n > size:
                            # Stop at size + 1: never store more than promised.
                            raise SizeMismatch(url, size, n)
                        if size is None:
                            if limit is not None and n > limit:
                                raise DownloadError(url, "size_mismatch", f"body exceeds the {limit}-byte limit")
                            scope.deadline = max(scope.deadline, started + self.cfg.timeout + n / MIN_RATE)
                        h.update(chunk)
                        await sink.add(chunk)
                finally:
                    # Close the generator now rather than at garbage collection,
                    # when trio would warn about an unfinished async generator.
                    await chunks.aclose()
        except httpx.TimeoutException as e:
            raise DownloadError(url, "timeout", type(e).__name__) from None
        except httpx.RemoteProtocolError as e:
            raise DownloadError(url, "truncated", str(e)[:200]) from None
        except httpx.TransportError as e:
            raise DownloadError(url, "connection", f"{type(e).__name__}: {e}"[:200]) from None
        if size is not None and n < size:
            # A complete HTTP body (a cut one raised RemoteProtocolError
            # above) that is shorter than the page promised.
            raise SizeMismatch(url, size, n)
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256:
            raise HashMismatch(url, sha256, digest)
        await sink.finish(commit)
        return Verified(sink.path, n, digest)
