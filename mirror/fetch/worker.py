"""A download helper process: ``python -m mirror.fetch.worker``.

Started by ``mirror.fetch.pool.FetchPool``.  It reads its setup (the
upstream config, the layout, its share of ``workers``, the log level) from
the first frame on stdin.  Each ``batch`` frame (a project's files) runs
``Downloader.fetch_batch`` here, under this process' own limiter and the
same retry policy as the main process, and is answered once: a verified
temp file under ``state/tmp`` or the error, per file.  Each ``page`` frame
runs one ``Upstream.project_page``, answered with the parsed snapshot (or
the error).  The answers carry the counts made since the last shipment
(see ``counts``), and the CPU time this process has used (the parent
balances the pages on it).  This process never writes anywhere but its
temp files.

It exits when its stdin closes, which is also what happens when the parent
is killed, and it ignores SIGINT and SIGTERM: systemd signals the whole
unit, and the parent must be the one that decides what finishes.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import trio

from mirror import __version__, logfmt
from mirror.errors import DiskError, DownloadError, UnsafeInput, UpstreamError
from mirror.fetch.attempt import FileJob, Verified, discard
from mirror.fetch.downloader import Downloader
from mirror.fetch.pool import FrameReader, send_frame
from mirror.metrics import HELPER_COUNTERS, Metrics
from mirror.model import NormalizedName
from mirror.upstream.client import Upstream
from mirror.upstream.transport import open_client, open_files

log = logging.getLogger(__name__)

# Seconds between two shipments of counts while other jobs are in flight.
COUNTS_EVERY = 0.25


async def serve() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(0))
    stdout = trio.lowlevel.FdStream(os.dup(1))
    out_lock = trio.Lock()
    reader = FrameReader(stdin)
    first = await reader.next()
    if first is None:
        return
    cfg, layout, workers, level = first
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logfmt.formatter_for(logfmt.stderr_is_journal(os.environ.get("JOURNAL_STREAM"), os.fstat),
                                              "%(levelname)s %(name)s[%(process)d]: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    scopes: dict[int, trio.CancelScope] = {}
    # Counts go home with the answers, as the difference since the last
    # shipment: with every answer that leaves nothing else in flight (so the
    # parent has them all when it stops asking), and otherwise at most every
    # COUNTS_EVERY seconds (reading every counter cost a tenth of this
    # process' CPU when done for every answer).
    metrics = Metrics()
    shipped = metrics.counts(HELPER_COUNTERS)
    shipped_at = trio.current_time()

    def counts() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        nonlocal shipped, shipped_at
        if len(scopes) > 1 and trio.current_time() - shipped_at < COUNTS_EVERY:
            return {}
        shipped_at = trio.current_time()
        now = metrics.counts(HELPER_COUNTERS)
        delta = {k: v - shipped.get(k, 0.0) for k, v in now.items() if v != shipped.get(k, 0.0)}
        shipped = now
        return delta

    files = open_files(cfg, workers=workers, version=__version__)
    client = open_client(cfg, workers=workers, version=__version__)
    upstream = Upstream(client, cfg, metrics=metrics)
    downloader = Downloader(files, layout.tmp, cfg=cfg, metrics=metrics, limiter=trio.CapacityLimiter(workers),
                            inline=True)
    try:

        async def answer(rid: int, what: str, job: Callable[[], Awaitable[tuple[object, ...]]]) -> None:
            """Run one job and send its reply; a bug is reported, not a dead helper."""
            reply: tuple[object, ...] | None = None
            with trio.CancelScope() as scope:
                scopes[rid] = scope
                try:
                    reply = await job()
                except Exception as e:
                    log.exception("%s failed", what)
                    reply = ("bug", rid, f"{type(e).__name__}: {e}")
            scopes.pop(rid, None)
            if reply is None:
                return  # cancelled by the parent
            try:
                await send_frame(stdout, out_lock, reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if reply[0] == "files":
                    for o in cast(list[tuple[object, ...]], reply[2]):
                        if o[0] == "ok":
                            discard(Path(str(o[1])))

        async def batch(rid: int, jobs: list[FileJob]) -> tuple[object, ...]:
            try:
                outcomes = await downloader.fetch_batch(jobs)
            except DiskError as e:
                return ("disk", rid, str(e))
            except BaseExceptionGroup as eg:
                disk, rest = eg.split(DiskError)
                if disk is None or rest is not None:
                    raise
                return ("disk", rid, str(disk.exceptions[0]))
            out: list[tuple[object, ...]] = []
            for o in outcomes:
                if isinstance(o, Verified):
                    out.append(("ok", str(o.tmp), o.size, o.sha256))
                elif isinstance(o, DownloadError):
                    out.append(("error", o))
                else:
                    out.append(("unsafe", str(o)))
            return ("files", rid, out, counts(), time.process_time())

        async def page(rid: int, name: str, min_serial: int) -> tuple[object, ...]:
            try:
                snap = await upstream.project_page(NormalizedName(name), min_serial=min_serial)
            except (UpstreamError, UnsafeInput) as e:
                return ("raise", rid, e, counts(), time.process_time())
            return ("snap", rid, snap, counts(), time.process_time())

        async with trio.open_nursery() as nursery:
            while (frame := await reader.next()) is not None:
                if frame[0] == "batch":
                    nursery.start_soon(answer, frame[1], f"download of {len(frame[2])} file(s)",
                                       functools.partial(batch, *frame[1:]))
                elif frame[0] == "page":
                    nursery.start_soon(answer, frame[1], f"page {frame[2]}", functools.partial(page, *frame[1:]))
                elif frame[0] == "cancel" and frame[1] in scopes:
                    scopes[frame[1]].cancel()
            # stdin closed: the parent is done with us, or gone.
            nursery.cancel_scope.cancel()
    finally:
        await files.aclose()
        await client.aclose()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    trio.run(serve)


if __name__ == "__main__":
    main()
