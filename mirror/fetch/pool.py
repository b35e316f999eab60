"""Download processes, the parent's side: file downloads spread over more
than one CPU.

A first sync is bound by the CPU of the one Python thread that runs the HTTP
client, the hashing and the event loop, while the second core waits.  With
``[mirror] download_processes = N`` a large cycle starts N helper processes
(``python -m mirror.fetch.worker``), each with its own trio loop and pooled
client.  A helper runs the same ``attempt`` the main process runs: stream
into a temp file under ``state/tmp``, check size and sha256, and answer
with the verified temp file.  It never touches ``web/``: the parent places
(renames) the file and makes it durable, so every decision about final
paths, the publish order and the state stays in one process.

A helper also fetches and parses project pages (``Upstream.project_page``,
with its stale-page and malformed-page retries), which in a first sync cost
as much CPU as the files: the parent gets the parsed ``ProjectSnapshot``.

Files go a project at a time: one ``batch`` frame lists the project's
files, the helper fetches them all concurrently with the same
``Downloader`` the main process uses (retries, backoff, download mirror,
its own limiter), and one frame answers with an outcome per file: a
verified temp, or the error.  A frame per file each way cost the main
process more CPU than the rest of a file's work there.

The counts a helper made (requests, errors, stale and refused pages, files
and bytes downloaded) travel with its answers (all of them by its last
answer before it goes idle; ``mirror.fetch.worker``) and are added to the
parent's metrics, and so does the CPU time the helper has used.  The parent
fetches a page itself while it has used less CPU than the helpers on
average, else hands it to one (``page_here``): how much a project's files
cost against its page differs from one index to the next, and this keeps
every process equally busy without a tuned ratio.

Protocol: length-prefixed pickle frames on the helper's stdin/stdout
(``send_frame`` and ``FrameReader`` serve both ends).  The first frame is the
setup.  Then ``("batch", id, [FileJob, ...])``, ``("page", id, name,
min_serial)`` and ``("cancel", id)`` go in; ``("files", id, outcomes,
counts, cpu)`` with an outcome per job (``("ok", tmp, size, sha256)``,
``("error", DownloadError)`` or ``("unsafe", message)``),
``("snap", id, snapshot, counts, cpu)``, ``("raise", id, error, counts,
cpu)`` and ``("disk", id, message)`` come out.  A helper exits when its stdin closes,
which is also what happens when the parent is killed; it ignores SIGINT
and SIGTERM so that a stop signal sent to the whole process group lets the
parent finish its in-flight work as usual.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import pickle
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from mirror.errors import DiskError, DownloadError, UnsafeInput, UpstreamError
from mirror.fetch.attempt import FileJob, Outcome, Verified
from mirror.layout import Layout
from mirror.metrics import Metrics
from mirror.model import ProjectSnapshot
from mirror.upstream.config import UpstreamConfig

log = logging.getLogger(__name__)

HEADER = 4
# How long a closing pool waits for its helpers to exit before killing them.
EXIT_GRACE = 5.0
# How often the pages' destination is decided again (``page_here``).
CPU_RECHECK = 0.05


def prefer_here(own_cpu: float, helper_cpu: Sequence[float]) -> bool:
    """Work goes to this process while it has used no more CPU than the
    helpers on average (all of it, with no helper left)."""
    return not helper_cpu or own_cpu <= sum(helper_cpu) / len(helper_cpu)


class NoWorker(Exception):
    """No helper process is running; the caller downloads in-process."""


async def send_frame(stream: trio.abc.SendStream, lock: trio.Lock, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    async with lock:
        await stream.send_all(len(data).to_bytes(HEADER, "big") + data)


class FrameReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = await self.stream.receive_some(1 << 16)
            if not chunk:
                return False
            self.buf += chunk
        return True

    async def next(self) -> Any:
        """The next frame, or ``None`` at end of stream."""
        if not await self._fill(HEADER):
            return None
        n = int.from_bytes(self.buf[:HEADER], "big")
        if not await self._fill(HEADER + n):
            return None
        data = bytes(self.buf[HEADER:HEADER + n])
        del self.buf[:HEADER + n]
        return pickle.loads(data)


@dataclass
class _Pending:
    what: str
    files: bool = False  # a batch of files (``busy``)
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass
class _Helper:
    proc: trio.Process
    lock: trio.Lock = field(default_factory=trio.Lock)
    pending: dict[int, _Pending] = field(default_factory=dict)
    alive: bool = True
    cpu: float = 0.0  # seconds of CPU it has used, as of its last answer


class FetchPool:
    """Parent side: hands single download attempts, and project pages, to
    helper processes."""

    def __init__(self, layout: Layout, metrics: Metrics) -> None:
        self.layout = layout
        self.metrics = metrics
        self.helpers: list[_Helper] = []
        self._ids = itertools.count()
        self._cpu0 = time.process_time()
        self._recheck = -math.inf
        self._here = True

    @classmethod
    @asynccontextmanager
    async def open(cls, cfg: UpstreamConfig, layout: Layout, *, processes: int, workers: int,
                   metrics: Metrics) -> AsyncIterator[FetchPool]:
        """``workers``: the most downloads in flight at once, shared out
        between the helpers (each limits its own).  ``metrics`` receives
        what the helpers count."""
        pool = cls(layout, metrics)
        share = max(1, -(-workers // max(1, processes)))
        async with trio.open_nursery() as nursery:
            try:
                for _ in range(processes):
                    try:
                        await pool._spawn(nursery, (cfg, layout, share, logging.getLogger().level))
                    except (OSError, trio.BrokenResourceError) as e:
                        # e.g. a process limit: fewer helpers, or none and
                        # every download in-process.
                        log.warning("could not start a download process: %s", e)
                        break
                yield pool
            finally:
                with trio.CancelScope(shield=True):
                    await pool._close()
                nursery.cancel_scope.cancel()

    async def _spawn(self, nursery: trio.Nursery, setup: tuple[UpstreamConfig, Layout, int, int]) -> None:
        # The helper imports this very package (a source checkout or another
        # install must not answer instead), and never one in the cwd (-P).
        here = str(Path(__file__).resolve().parent.parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-P", "-m", "mirror.fetch.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )
        h = _Helper(proc)
        assert proc.stdin is not None and proc.stdout is not None
        try:
            await send_frame(proc.stdin, h.lock, setup)
        except trio.BrokenResourceError:
            proc.kill()
            await proc.wait()
            raise
        self.helpers.append(h)
        nursery.start_soon(self._read, h)

    async def _read(self, h: _Helper) -> None:
        assert h.proc.stdout is not None
        reader = FrameReader(h.proc.stdout)
        while True:
            try:
                frame = await reader.next()
            except (trio.BrokenResourceError, trio.ClosedResourceError, pickle.UnpicklingError, EOFError):
                frame = None
            if frame is None:
                break
            try:
                self._answer(h, frame)
            except (TypeError, ValueError, IndexError, AssertionError, OSError) as e:
                log.error("download process %d answered %r (%s); not using it", h.proc.pid, frame, e)
                break
        h.alive = False
        if h.pending:
            log.error("a download process exited with %d download(s) in flight (pid %d)", len(h.pending), h.proc.pid)
        for p in h.pending.values():
            p.error = NoWorker()
            p.done.set()
        h.pending.clear()

    def _answer(self, h: _Helper, frame: tuple[Any, ...]) -> None:
        kind, rid = frame[0], frame[1]
        if kind in ("snap", "raise", "files"):
            self.metrics.add_counts(frame[3])
            h.cpu = float(frame[4])
        p = h.pending.pop(rid, None)
        if kind == "files":
            outcomes = [self._outcome(o) for o in frame[2]]  # every temp checked before any is kept
            if p is None:
                # Answered after the caller gave up (cancelled): nobody will
                # commit these temps.
                for o in outcomes:
                    if isinstance(o, Verified):
                        o.tmp.unlink(missing_ok=True)
                return
            p.result = outcomes
            p.done.set()
            return
        if p is None:
            return
        if kind == "snap":
            if not isinstance(frame[2], ProjectSnapshot):
                raise TypeError("not a project snapshot")
            p.result = frame[2]
        elif kind == "raise":
            if not isinstance(frame[2], (UpstreamError, UnsafeInput)):
                raise TypeError(f"not an upstream error: {frame[2]!r:.200}")
            p.error = frame[2]
        elif kind == "disk":
            p.error = DiskError(frame[2])
        else:
            p.error = RuntimeError(f"download process: {frame[2]}")
        p.done.set()

    def _outcome(self, o: tuple[Any, ...]) -> Outcome:
        """One file's outcome as a helper sent it.  A temp path must be one
        this layout hands out (ValueError otherwise: the helper is not used
        again)."""
        if o[0] == "ok":
            path = Path(str(o[1]))
            if not self.layout.is_temp(path):
                raise ValueError(f"not a temp file: {path}")
            return Verified(path, int(o[2]), str(o[3]))
        if o[0] == "error":
            if not isinstance(o[1], DownloadError):
                raise TypeError(f"not a download error: {o[1]!r:.200}")
            return o[1]
        if o[0] == "unsafe":
            return UnsafeInput(str(o[1]))
        raise ValueError(f"unknown outcome {o[0]!r:.50}")

    def page_here(self) -> bool:
        """Should this process fetch the next project page itself?  (Asked
        again every ``CPU_RECHECK`` seconds: reading this process' CPU time
        sums every thread's, a cost that showed per page.)"""
        now = trio.current_time()
        if now >= self._recheck:
            self._recheck = now + CPU_RECHECK
            self._here = prefer_here(time.process_time() - self._cpu0, [h.cpu for h in self.helpers if h.alive])
        return self._here

    def busy(self) -> bool:
        """Is a helper working on a batch of files?"""
        return any(p.files for h in self.helpers for p in h.pending.values())

    async def fetch_batch(self, jobs: Sequence[FileJob]) -> list[Outcome]:
        """``Downloader.fetch_file`` for each job, in the least busy helper:
        an outcome per job, in order.  Raises ``DiskError`` (nothing kept)
        or ``NoWorker``."""
        result: list[Outcome] = await self._call(f"{len(jobs)} file(s)", "batch", list(jobs))
        return result

    async def page(self, name: str, *, min_serial: int) -> ProjectSnapshot:
        """``Upstream.project_page`` in the least busy helper.  Raises what
        it raises (``UpstreamError``, ``UnsafeInput``), or ``NoWorker``."""
        snap: ProjectSnapshot = await self._call(f"/simple/{name}/", "page", name, min_serial)
        return snap

    async def _call(self, what: str, kind: str, *args: object) -> Any:
        live = [h for h in self.helpers if h.alive]
        if not live:
            raise NoWorker()
        h = min(live, key=lambda x: len(x.pending))
        rid = next(self._ids)
        p = h.pending[rid] = _Pending(what, files=kind == "batch")
        assert h.proc.stdin is not None
        try:
            await send_frame(h.proc.stdin, h.lock, (kind, rid, *args))
            await p.done.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            h.pending.pop(rid, None)
            h.alive = False
            raise NoWorker() from None
        except BaseException:
            if h.pending.pop(rid, None) is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    try:
                        await send_frame(h.proc.stdin, h.lock, ("cancel", rid))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
            elif kind == "batch" and p.result is not None:
                for o in p.result:
                    if isinstance(o, Verified):
                        o.tmp.unlink(missing_ok=True)
            raise
        if p.error is not None:
            raise p.error
        return p.result

    async def _close(self) -> None:
        for h in self.helpers:
            assert h.proc.stdin is not None
            try:
                await h.proc.stdin.aclose()
            except trio.BrokenResourceError:
                pass
        for h in self.helpers:
            with trio.move_on_after(EXIT_GRACE):
                await h.proc.wait()
            if h.proc.returncode is None:
                log.warning("download process %d did not exit; killing it", h.proc.pid)
                h.proc.kill()
                await h.proc.wait()
