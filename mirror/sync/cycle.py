"""One sync cycle: feed -> plan -> download -> publish -> commit.

Theory of operation
-------------------
1. *Feed.*  The changelog (or the root index diff) names the projects that
   changed and the serial each must reach.  They go into the ``todo`` table
   together with the new feed position, in one transaction: from then on a
   crash loses nothing, the next run simply finds them in ``todo``
   (``mirror.sync.feed``).
2. *Projects.*  ``workers`` tasks take projects from ``todo`` (including ones
   deferred by earlier runs).  Each fetches the page (stale pages are retried
   with cache busting, then deferred), plans, downloads the missing files
   concurrently through the shared ``CapacityLimiter``, commits each verified
   file into the tree and records it, and only then writes the project's
   pages and updates ``projects``/``refs``.  A failing project is deferred
   (kept in ``todo`` with its error) and never blocks the others.
   A *destructive* project (removed upstream, or a page that drops files)
   is held back until every worker is done; the safety valve
   (``valve.decide``) then publishes all held projects, or none when the
   cycle would retire too much, leaving them queued (``--allow-mass-delete``
   lets one cycle through).
3. *Root.*  When any project was published or removed, the root index is
   rewritten from ``projects``, after every page it links exists; pages of
   removed projects are deleted after that, so the root never links a page
   that is gone.
4. *Retirement.*  Files unreferenced for ``retire_after`` are deleted (with
   the directories they empty).  This comes after the root, when no
   published page links them, and before the change list, so the list of
   the cycle that deleted a file names it.
5. *Change list, then trace.*  Every path written or deleted above was
   noted in the state (before a page is written; with the state row of a
   file); the notes become ``changes/<generation>-<epoch>.txt`` and the
   index, and ``trace/<name>`` is written last of all
   (``mirror.downstream.cycle_end``).

A secondary copying ``web/`` at any moment copies pages that only link files
published before them and not retired for ``retire_after``; one that trusts
the trace finds every change up to its generation listed.

A disk error (ENOSPC, EROFS) aborts the whole cycle: nothing partial is
visible because every write is a rename of a complete, fsynced file.  Every
task that hit it reports it (through nested nurseries, as an exception
group, or as SQLite's "database or disk is full"); ``sync_once`` turns all of
that into one ``DiskError`` so callers see a single, clear condition.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import httpx
import trio

from mirror import layout
from mirror.config import Config
from mirror.downstream import cycle_end
from mirror.errors import DiskError, ProjectNotFound, UnsafeInput, UnsafePath, UnsupportedAPIVersion, UpstreamError
from mirror.fetch.downloader import Downloader
from mirror.fetch.pool import FetchPool, NoWorker
from mirror.metrics import Metrics
from mirror.model import NormalizedName, ProjectSnapshot, Serial
from mirror.plan import filters, valve
from mirror.publish import rootindex
from mirror.publish.state import State
from mirror.publish.tree import Tree
from mirror.sync.disk import disk_error_aborts_cycle
from mirror.sync.feed import Feed
from mirror.sync.project import CycleReport, Deps, Progress, ProjectSync
from mirror.sync.publisher import Publisher
from mirror.upstream.files import FileSource
from mirror.upstream.client import Upstream

__all__ = ["POOL_MIN_PROJECTS", "CycleReport", "Progress", "Syncer"]

log = logging.getLogger(__name__)

# Projects to sync from which a cycle downloads in helper processes (when
# ``download_processes`` asks for them).
POOL_MIN_PROJECTS = 200


@dataclass
class _Held:
    """A destructive project change waiting for the safety valve."""

    name: NormalizedName
    dropped: int  # paths the new page stops referencing (all, for a removal)
    removal: bool
    commit: Callable[[], Awaitable[None]] | None = None


class Syncer:
    # A cycle with fewer projects to sync downloads in-process.
    pool_min_projects = POOL_MIN_PROJECTS

    def __init__(
        self,
        cfg: Config,
        *,
        client: httpx.AsyncClient,
        files: FileSource,
        state: State,
        tree: Tree,
        metrics: Metrics,
        progress: Progress | None = None,
        allow_mass_delete: bool = False,
    ) -> None:
        self.cfg = cfg
        self.state = state
        self.tree = tree
        self.metrics = metrics
        self.upstream = Upstream(client, cfg.upstream, metrics=metrics)
        self.limiter = trio.CapacityLimiter(cfg.mirror.workers)
        self.downloader = Downloader(files, cfg.layout.tmp, cfg=cfg.upstream, metrics=metrics, limiter=self.limiter)
        self.deps = Deps(cfg, state, tree, self.upstream, self.downloader, metrics, progress)
        self.feed = Feed(cfg, state=state, upstream=self.upstream, metrics=metrics)
        self.progress = progress
        # Set by request_stop: projects already started finish, no new one
        # is handed out.
        self.stop_requested = False
        # One-shot: consumed by the first cycle the safety valve would block.
        self.allow_mass_delete = allow_mass_delete
        self.held: list[_Held] = []
        self.publisher = Publisher(self.deps, CycleReport())
        # Projects of the running cycle not finished yet.
        self.pending = 0

    def request_stop(self) -> None:
        """Start no new project; those in flight finish (the daemon's SIGTERM)."""
        self.stop_requested = True

    def downloads_in_flight(self) -> bool:
        """Is any download attempt running, here or in a helper?  (A backoff
        sleep here holds no token.)"""
        return self.downloader.in_flight()

    # -- projects -------------------------------------------------------------
    @asynccontextmanager
    async def _download_processes(self) -> AsyncIterator[None]:
        """Helper processes for the downloads of a large cycle.  Starting
        them costs a few hundred ms of CPU, more than a usual cycle needs."""
        n = self.cfg.mirror.download_processes
        if n == 0 or self.state.todo_count() < self.pool_min_projects:
            yield
            return
        async with FetchPool.open(self.cfg.upstream, self.cfg.layout, processes=n,
                                  workers=self.cfg.mirror.workers, metrics=self.metrics) as pool:
            log.info("downloading in %d helper process(es)", n)
            self.downloader.pool = pool
            try:
                yield
            finally:
                self.downloader.pool = None

    async def sync_projects(self, report: CycleReport) -> None:
        self.held = []
        total = self.pending = self.state.todo_count()
        self.metrics.projects_pending.set(total)
        if self.progress:
            self.progress("projects", 0, total)
        send, recv = trio.open_memory_channel[tuple[NormalizedName, Serial]](0)
        done = 0

        async def worker(rx: trio.MemoryReceiveChannel[tuple[NormalizedName, Serial]]) -> None:
            nonlocal done
            async with rx:
                async for name, serial in rx:
                    await self.sync_project(name, serial, report)
                    done += 1
                    self.pending = max(0, total - done)
                    self.metrics.projects_pending.set(self.pending)
                    if self.progress:
                        self.progress("projects", done, total)

        def unsafe(name: str, why: str) -> None:
            log.error("%s: not published, the tree is unsafe: %s", name, why)
            self._defer(name, why, report)

        self.publisher = Publisher(self.deps, report, on_unsafe=unsafe)
        periodic = trio.CancelScope()

        async def root_every(interval: float) -> None:
            # A long first sync shows its progress in the root index, so a
            # sync killed and resumed many times still serves what it has.
            with periodic:
                while True:
                    await trio.sleep(interval)
                    # Its serial is the last one whose every change is out,
                    # not the feed position this cycle is working towards.
                    if await self.publish_root(report, serial=self.state.synced_serial()):
                        log.info("root index republished during the cycle: %d project(s) so far",
                                 self.state.project_count())

        async with trio.open_nursery() as outer:
            await outer.start(self.publisher.run)
            if self.cfg.mirror.root_interval > 0:
                outer.start_soon(root_every, self.cfg.mirror.root_interval)
            async with trio.open_nursery() as nursery:
                for _ in range(max(1, self.cfg.mirror.workers)):
                    nursery.start_soon(worker, recv.clone())
                await recv.aclose()
                async with send:
                    for item in self.state.iter_todo():
                        if self.stop_requested:
                            break
                        await send.send(item)
            await self.release_held(report)
            await self.publisher.close()
            periodic.cancel()

    async def release_held(self, report: CycleReport) -> None:
        """Publish the held destructive changes, or none of them (safety valve)."""
        held, self.held = self.held, []
        if not held:
            self.metrics.retirement_blocked.set(0)
            return
        verdict = valve.decide(
            retiring=sum(h.dropped for h in held),
            removing=sum(1 for h in held if h.removal),
            projects=self.state.project_count(),
            max_retire=self.cfg.mirror.max_retire,
            allow=self.allow_mass_delete,
        )
        if not verdict.allowed:
            self.metrics.retirement_blocked.set(1)
            report.blocked = verdict.reason
            log.error("safety valve: %s; %d destructive change(s) not published and kept queued "
                      "(run `mirror sync --allow-mass-delete` once if this is intended)", verdict.reason, len(held))
            for h in held:
                self.state.defer(h.name, f"safety valve: {verdict.reason}")
            return
        self.metrics.retirement_blocked.set(0)
        if verdict.overridden:
            self.allow_mass_delete = False
            log.warning("safety valve overridden by --allow-mass-delete: %s", verdict.reason)
        for h in held:
            if h.removal:
                self._remove(h.name, report)
            elif h.commit is not None:
                await h.commit()

    async def sync_project(self, name: NormalizedName, promised: Serial, report: CycleReport) -> None:
        f = self.cfg.mirror_filters
        if f.active and (why := filters.project_allowed(f, name)) is not None:
            if self.state.project(name) is not None:
                log.info("%s: excluded by the filters (%s); unpublishing", name, why)
                self._remove_or_hold(name, report)
            else:
                self.state.drop_todo(name)
            return
        stored = self.state.snapshot(name) if promised > 0 else None
        if stored is not None and stored.serial is not None and stored.serial >= promised:
            # Replaying what we already know (a filter change): no upstream request.
            await self.publish_snapshot(stored, report)
            return
        try:
            snap = await self._project_page(name, promised)
        except ProjectNotFound:
            self.state.forget_upstream(name)
            self._remove_or_hold(name, report)
            return
        except (UpstreamError, UnsafeInput) as e:
            # Malformed pages were counted by each attempt in project_page.
            if isinstance(e, UnsupportedAPIVersion):
                self.metrics.rejected.labels("api_version").inc()
            self._defer(name, str(e), report)
            return
        if snap.serial is None:
            # An upstream without serials (plain PEP 503): what we fetched now
            # is as fresh as anything the feed promised.
            snap = replace(snap, serial=promised)
        for kind, why in snap.rejected:
            self.metrics.rejected.labels(kind).inc()
            log.warning("%s: refused a file entry from upstream: %s", name, why)
        try:
            await self.publish_snapshot(snap, report)
        except UnsafePath as e:
            # Something in the tree (a symlink where a directory belongs) would
            # redirect our writes: leave the project alone, loudly.
            log.error("%s: not published, the tree is unsafe: %s", name, e)
            self._defer(name, str(e), report)

    async def _project_page(self, name: NormalizedName, promised: Serial) -> ProjectSnapshot:
        """The page, fetched and parsed here or by a helper process, whichever
        has used less CPU so far (``FetchPool.page_here``): this process
        also plans, renders and publishes, the helpers download."""
        pool = self.downloader.pool
        if pool is not None and not pool.page_here():
            try:
                return await pool.page(name, min_serial=promised)
            except NoWorker:
                pass  # no helper left: here
        return await self.upstream.project_page(name, min_serial=promised)

    async def publish_snapshot(self, upstream_snap: ProjectSnapshot, report: CycleReport) -> None:
        """Mirror one project's snapshot (``ProjectSync``); a page that drops
        files waits for the safety valve."""
        job = ProjectSync(self.deps, upstream_snap, report)
        job.plan()
        if not await job.download():
            self.publisher.submit(job.publication(pages=False))
            self._defer(job.name, job.error, report)
            return
        await job.prepare_pages()
        if dropped := job.unreferenced:
            self.publisher.submit(job.publication(pages=False))

            async def commit() -> None:
                self.publisher.submit(job.publication())

            self.held.append(_Held(job.name, dropped, removal=False, commit=commit))
        else:
            self.publisher.submit(job.publication())

    def _remove_or_hold(self, name: NormalizedName, report: CycleReport) -> None:
        """A published project is removed only through the safety valve."""
        if self.state.project(name) is None:
            self._remove(name, report)
        else:
            self.held.append(_Held(name, len(self.state.refs(name)), removal=True))

    def _remove(self, name: NormalizedName, report: CycleReport) -> None:
        orphans = self.state.remove_project(name)
        report.files_retired += len(orphans)
        report.projects_removed += 1
        log.info("%s: removed upstream; unpublishing (%d file(s) to retire)", name, len(orphans))

    def _defer(self, name: str, error: str, report: CycleReport) -> None:
        self.state.defer(name, error)
        report.failed[name] = error
        log.warning("%s: deferred to the next run: %s", name, error)

    # -- root and serial --------------------------------------------------------
    async def publish_root(self, report: CycleReport, *, serial: int | None = None) -> bool:
        """Write the root index if anything it lists changed; True if written.

        The dirty marks are cleared *before* the root is read from the state
        (and set again if writing fails): a project the publisher records
        while the root is being written marks it dirty again, so it is listed
        next time instead of being lost between the read and the clear.
        ``serial`` (default: the feed position) goes into the JSON root."""
        gone = self.state.gone()
        json_dirty, html_dirty = self.state.root_dirty()
        if not (json_dirty or html_dirty or gone):
            return False
        # One streaming pass in a worker thread: the root is the only page
        # whose size grows with the index (600k projects on PyPI).
        html = html_dirty or bool(gone)
        self.state.changes.note_now((p, "replace") for p in layout.ROOT_PAGES if html or p == layout.ROOT_JSON)
        self.state.clear_root_dirty()
        try:
            await trio.to_thread.run_sync(
                functools.partial(rootindex.write_root, self.tree, self.state.path,
                                  self.state.serial if serial is None else serial, html=html)
            )
        except BaseException:
            self.state.set_meta(**({"root_json_dirty": 1} if json_dirty else {}),
                                **({"root_html_dirty": 1} if html_dirty else {}))
            raise
        report.root_written = True
        if gone:
            paths = [p for n in gone for p in layout.project_paths(n)]
            self.state.changes.note_now((p, "delete") for p in paths)
            await trio.to_thread.run_sync(self.tree.remove, paths)
            self.state.clear_gone(gone)
        return True

    @disk_error_aborts_cycle
    async def sync_once(self, *, feed: bool = True) -> CycleReport:
        """One cycle.  ``feed=False`` only works through what is already queued
        (deferred projects, repairs from ``mirror verify``)."""
        report = CycleReport(started=time.time())
        t0 = trio.current_time()
        self.tree.forget_dirs()
        self.feed.refilter_if_changed()
        if feed:
            report.upstream_serial = await self.feed.read()
        root_error: DiskError | None = None
        try:
            async with self._download_processes():
                await self.sync_projects(report)
        finally:
            # Even when a disk error aborts the cycle, projects published so
            # far are listed in the root once the disk allows it.
            with trio.CancelScope(shield=True):
                try:
                    await self.publish_root(report)
                except DiskError as e:
                    log.error("root index not written: %s", e)
                    root_error = e
        if root_error is not None:
            raise root_error  # the root stays marked dirty: the next cycle writes it
        report.files_deleted = await cycle_end.retire_due(self.state, self.tree,
                                                          retire_after=self.cfg.mirror.retire_after)
        self.metrics.files_retired.inc(report.files_deleted)
        if report.changed or report.files_deleted:
            stamp = time.strftime("%Y%m%dT%H:%M:%S\n", time.gmtime()).encode()
            self.state.changes.note_now([(layout.LAST_MODIFIED, "replace")])
            await trio.to_thread.run_sync(self.tree.write_files, [(layout.LAST_MODIFIED, stamp)])
        report.serial = self.state.serial
        report.synced_serial = self.state.synced_serial()
        report.duration = trio.current_time() - t0
        report.generation = await cycle_end.publish_changes(
            self.state, self.tree, mirror_name=self.cfg.mirror.name, upstream=self.cfg.upstream.url,
            keep=self.cfg.mirror.retire_after, serial=report.synced_serial, started=report.started,
            duration=report.duration,
        )
        self.state.set_meta(synced_serial=report.synced_serial, last_cycle=report.started,
                            **({"last_success": time.time()} if not (report.failed or report.blocked) else {}),
                            # for `mirror status`, which reads the state only
                            **({"upstream_serial": report.upstream_serial} if report.upstream_serial else {}))
        self.update_gauges(report)
        return report

    def update_gauges(self, report: CycleReport) -> None:
        m = self.metrics
        if report.upstream_serial is not None:
            m.upstream_serial.set(report.upstream_serial)
            m.serial_lag.set(max(0, report.upstream_serial - report.synced_serial))
        m.synced_serial.set(report.synced_serial)
        m.cycle_duration.observe(report.duration)
        m.cycles.labels("partial" if report.failed or report.blocked else "ok").inc()
        if not (report.failed or report.blocked):
            m.last_success.set(time.time())
        self.update_state_gauges()

    def update_state_gauges(self) -> None:
        """The gauges read from the state DB (cheap queries; also used at daemon start)."""
        m = self.metrics
        m.projects_pending.set(self.state.todo_count())
        m.projects_failed.set(self.state.failure_count())
        m.pending_retirement.set(self.state.retire_count())
        files, nbytes = self.state.tree_totals()
        m.tree_files.set(files)
        m.tree_bytes.set(nbytes)
        m.projects.set(self.state.project_count())
