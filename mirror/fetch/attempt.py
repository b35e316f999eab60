"""One download attempt: stream a URL into a temp file and prove it is the
file upstream promised.

An attempt never touches a final path: it returns a ``Verified`` temp file
(size and sha256 checked), or raises ``DownloadError`` and leaves no temp
behind.  It does not fsync: the tree makes a whole batch of files durable
at once before any page links them (``mirror.publish.tree``).  Bytes are
hashed while they stream; reading stops at ``size + 1`` so an upstream
cannot fill the disk with an oversized body.  Disk writes take one thread
hop per megabyte-sized batch, so a typical 40 KB file costs a single hop
for its write; in a helper process, none.

The body comes from a ``FileSource``: the lean h11 pool
(``mirror.upstream.files``) in production.

The same function runs in the main process and in the helper processes
(``mirror.fetch.worker``); retries, backoff and the concurrency limit are
the caller's (``mirror.fetch.downloader``, which runs in both).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, cast

import httpx
import trio

from mirror.errors import DiskError, DownloadError, HashMismatch, SizeMismatch, UnsafeInput
from mirror.metrics import Metrics
from mirror.upstream.files import FileSource
from mirror.upstream.retry import classify, throttle_wait

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


class FileJob(NamedTuple):
    """One file of a batch: what ``fetch_file`` takes."""

    url: str
    rel: str
    sha256: str | None
    size: int | None
    limit: int | None


# A batch's answer per job: the verified temp, or why there is none.
Outcome = Verified | DownloadError | UnsafeInput


def discard(tmp: Path) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


class _Sink:
    """Temp file writer.  Its blocking calls run in worker threads, or, with
    ``inline`` (a helper process, whose loop does nothing else), right here:
    a thread hop costs more than writing a small file to the page cache,
    mostly in GIL handovers between the two threads."""

    def __init__(self, path: Path, *, inline: bool = False) -> None:
        self.path = path
        self.inline = inline
        self.fd: int | None = None
        self.pending: list[bytes] = []
        self.pending_bytes = 0

    def _write(self, chunks: list[bytes], final: bool) -> None:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        for c in chunks:
            view = memoryview(c)
            while view:
                view = view[os.write(self.fd, view):]
        if final:
            fd, self.fd = self.fd, None
            os.close(fd)

    async def _run(self, chunks: list[bytes], final: bool) -> None:
        if self.inline:
            self._write(chunks, final)
        else:
            await trio.to_thread.run_sync(self._write, chunks, final)

    async def add(self, chunk: bytes) -> None:
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)
        if self.pending_bytes >= FLUSH_BYTES:
            chunks, self.pending, self.pending_bytes = self.pending, [], 0
            await self._run(chunks, False)

    async def finish(self) -> None:
        """Write the rest and close, in one thread hop (or none, inline)."""
        chunks, self.pending = self.pending, []
        await self._run(chunks, True)

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                os.close(fd)
            except OSError:
                pass  # the temp is discarded next


async def attempt(
    source: FileSource, url: str, tmp: Path, *, sha256: str | None, size: int | None,
    limit: int | None, timeout: float, metrics: Metrics, inline: bool = False,
) -> Verified:
    """Download ``url`` into ``tmp`` once.

    ``sha256=None`` (PEP 658 ``true`` without a hash) means: accept and report
    the digest we computed.  ``limit`` caps a body whose ``size`` is unknown.
    ``inline``: write without thread hops (see ``_Sink``)."""
    sink = _Sink(tmp, inline=inline)
    ok = False
    deadline = timeout + (size or 0) / MIN_RATE
    try:
        with trio.move_on_after(deadline) as scope:
            result = await _stream(source, url, sink, sha256=sha256, size=size, limit=limit, scope=scope,
                                   timeout=timeout, metrics=metrics)
            ok = True
            return result
        raise DownloadError(url, "timeout", f"body slower than {MIN_RATE // 1024} KB/s after {timeout:g}s")
    except OSError as e:
        raise DiskError.of(e, f"writing temp file for {url}") from None
    finally:
        if not ok:
            sink.close()
            # Shielded so a cancelled download still removes its temp.
            if inline:
                discard(tmp)
            else:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(discard, tmp)


async def _stream(
    source: FileSource, url: str, sink: _Sink, *, sha256: str | None, size: int | None,
    limit: int | None, scope: trio.CancelScope, timeout: float, metrics: Metrics,
) -> Verified:
    h = hashlib.sha256()
    n = 0
    started = trio.current_time()
    try:
        async with source.stream(url) as r:
            metrics.upstream_requests.labels("file").inc()
            if r.status != 200:
                wait = throttle_wait(r.status, r.header, now=time.time())
                raise DownloadError(url, "http_status", f"HTTP {r.status}", wait=wait)
            # Chunks as they arrive, so the size check and the moving
            # deadline see every read.
            chunks = cast(AsyncGenerator[bytes, None], r.chunks())
            try:
                async for chunk in chunks:
                    n += len(chunk)
                    if size is not None and n > size:
                        # Stop at size + 1: never store more than promised.
                        raise SizeMismatch(url, size, n)
                    if size is None:
                        if limit is not None and n > limit:
                            raise DownloadError(url, "size_mismatch", f"body exceeds the {limit}-byte limit")
                        scope.deadline = max(scope.deadline, started + timeout + n / MIN_RATE)
                    h.update(chunk)
                    await sink.add(chunk)
            finally:
                # Close the generator now rather than at garbage collection,
                # when trio would warn about an unfinished async generator.
                await chunks.aclose()
    except httpx.TransportError as e:
        raise DownloadError(url, *classify(e)) from None
    if size is not None and n < size:
        # A complete HTTP body (a cut one raised RemoteProtocolError
        # above) that is shorter than the page promised.
        raise SizeMismatch(url, size, n)
    digest = h.hexdigest()
    if sha256 is not None and digest != sha256:
        raise HashMismatch(url, sha256, digest)
    await sink.finish()
    return Verified(sink.path, n, digest)
