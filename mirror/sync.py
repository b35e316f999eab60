"""One sync cycle: feed -> plan -> download -> publish -> commit.

Theory of operation
-------------------
1. *Feed.*  The changelog (or the root index diff) names the projects that
   changed and the serial each must reach.  They go into the ``todo`` table
   together with the new feed position, in one transaction: from then on a
   crash loses nothing, the next run simply finds them in ``todo``
   (``feed.py``).
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
   index, and ``trace/<name>`` is written last of all (``downstream.py``).

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

import errno
import functools
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Concatenate, ParamSpec

import httpx
import trio

from mirror import downstream, filters, planner, render, rootindex, valve
from mirror.config import Config
from mirror.download import Downloader
from mirror.errors import (
    DiskError,
    DownloadError,
    ProjectNotFound,
    UnsafeInput,
    UnsafePath,
    UnsupportedAPIVersion,
    UpstreamError,
)
from mirror.feed import Feed
from mirror.fetchpool import FetchPool
from mirror.metrics import Metrics
from mirror.model import NormalizedName, ProjectSnapshot, Serial
from mirror.state import State
from mirror.tree import Tree, disk_error
from mirror.upstream import Upstream

log = logging.getLogger(__name__)
_P = ParamSpec("_P")

# Projects to sync from which a cycle downloads in helper processes (when
# ``download_processes`` asks for them).
POOL_MIN_PROJECTS = 200

# SQLite primary result codes that mean the disk, not the data, is at fault.
_SQLITE_DISK_CODES = {
    13,  # SQLITE_FULL
    10,  # SQLITE_IOERR
    8,  # SQLITE_READONLY
    14,  # SQLITE_CANTOPEN
}
# Narrower than the tree's list: a stray EACCES that no tree method wrapped is
# more likely a bug than the disk.
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT}


def disk_error_of(exc: BaseException) -> tuple[DiskError, int] | None:
    """(the first DiskError, how many operations failed) when ``exc`` is
    nothing but disk trouble, else None.

    ``exc`` may be an exception group from nested nurseries, where each task
    that hit the full disk reports it once."""
    if isinstance(exc, BaseExceptionGroup):
        found = [f for e in exc.exceptions if (f := disk_error_of(e)) is not None]
        if not found or len(found) != len(exc.exceptions):
            return None
        return found[0][0], sum(n for _, n in found)
    if isinstance(exc, DiskError):
        return exc, 1
    if isinstance(exc, sqlite3.Error) and (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in _SQLITE_DISK_CODES:
        return DiskError(f"state database: {exc}"), 1
    if isinstance(exc, OSError) and exc.errno in _DISK_ERRNOS:
        return disk_error(exc, "disk"), 1
    return None


def _disk_error_aborts_cycle(
    cycle: Callable[Concatenate[Syncer, _P], Awaitable[CycleReport]],
) -> Callable[Concatenate[Syncer, _P], Awaitable[CycleReport]]:
    async def run(self: Syncer, /, *args: _P.args, **kwargs: _P.kwargs) -> CycleReport:
        try:
            return await cycle(self, *args, **kwargs)
        except BaseException as e:
            found = disk_error_of(e)
            if found is None:
                raise
            self.metrics.download_errors.labels("disk").inc(found[1])
            raise found[0] from None

    functools.update_wrapper(run, cycle)
    return run


@dataclass
class CycleReport:
    started: float = 0.0
    duration: float = 0.0
    upstream_serial: int | None = None
    serial: int = 0
    synced_serial: int = 0
    projects_synced: int = 0
    projects_removed: int = 0
    pages_written: int = 0
    files_downloaded: int = 0
    bytes_downloaded: int = 0
    files_retired: int = 0
    files_deleted: int = 0
    root_written: bool = False
    generation: int | None = None
    blocked: str = ""
    failed: dict[str, str] = field(default_factory=dict)
    # for the progress line: files planned so far, and finished either way
    files_planned: int = 0
    files_done: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.pages_written or self.projects_removed or self.root_written)

    def summary(self) -> str:
        return (
            f"serial {self.synced_serial} (upstream {self.upstream_serial}), "
            f"{self.projects_synced} project(s) synced, {self.projects_removed} removed, "
            f"{self.files_downloaded} file(s) / {self.bytes_downloaded / 1e6:.1f} MB downloaded, "
            f"{len(self.failed)} deferred, {self.duration:.2f}s"
        )


Progress = Callable[[str, int, int], None]


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
        self.downloader = Downloader(client, tree, cfg=cfg.upstream, metrics=metrics, limiter=self.limiter)
        self.feed = Feed(cfg, state=state, upstream=self.upstream, metrics=metrics)
        self.progress = progress
        # Set by the daemon on SIGTERM: projects already started finish, no
        # new one is handed out.
        self.stop_requested = False
        # One-shot: consumed by the first cycle the safety valve would block.
        self.allow_mass_delete = allow_mass_delete
        self.held: list[_Held] = []

    # -- projects -------------------------------------------------------------
    @asynccontextmanager
    async def _download_processes(self) -> AsyncIterator[None]:
        """Helper processes for the downloads of a large cycle.  Starting
        them costs a few hundred ms of CPU, more than a usual cycle needs."""
        n = self.cfg.mirror.download_processes
        if n == 0 or self.state.todo_count() < self.pool_min_projects:
            yield
            return
        async with FetchPool.open(self.cfg.upstream, self.cfg.mirror.directory, processes=n,
                                  workers=self.cfg.mirror.workers) as pool:
            log.info("downloading in %d helper process(es)", n)
            self.downloader.pool = pool
            try:
                yield
            finally:
                self.downloader.pool = None

    async def sync_projects(self, report: CycleReport) -> None:
        self.held = []
        total = self.state.todo_count()
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
                    self.metrics.projects_pending.set(max(0, total - done))
                    if self.progress:
                        self.progress("projects", done, total)

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
            snap = await self.upstream.project_page(name, min_serial=promised)
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

    async def publish_snapshot(self, upstream_snap: ProjectSnapshot, report: CycleReport) -> None:
        name = upstream_snap.name
        snap = upstream_snap
        if self.cfg.mirror_filters.active:
            snap, dropped = filters.apply(self.cfg.mirror_filters, upstream_snap)
            if dropped:
                log.debug("%s: %d file(s) excluded by the filters", name, len(dropped))
        wanted = [p for f in snap.files for p in (f.path, f.metadata_path, f.provenance_path)]
        present = self.state.known_files(wanted)
        fetches = [j for j in planner.plan_project(snap, present) if not self._overwrites_linked(name, j, present)]
        errors: list[str] = []
        # Files are recorded in one transaction per project, and even when a
        # disk error aborts the others; one that is renamed but not recorded
        # (killed in between) is adopted after a hash check next time.
        recorded: list[tuple[str, int, str]] = []
        # Left in place by a killed run?  One stat hop for the whole project.
        existing = await trio.to_thread.run_sync(self.tree.existing, [j.rel for j in fetches]) if fetches else set()
        dirs: set[Path] = set()
        try:
            async with trio.open_nursery() as nursery:
                report.files_planned += len(fetches)
                for job in fetches:
                    nursery.start_soon(self._fetch_counted, name, job, present, errors, report, recorded,
                                       job.rel in existing, dirs)
            # Directory entries of the new files are durable before any page links them.
            if dirs:
                await trio.to_thread.run_sync(self.tree.sync_dirs, dirs)
        finally:
            self.state.record_files(recorded)
        if errors:
            self._defer(name, "; ".join(errors[:3]) + (f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""), report)
            return
        published, refs = planner.finalize(snap, present)
        shown = self.state.display_name(name)
        if shown is not None and shown != published.display_name:
            published = replace(published, display_name=shown)
        page_json = render.project_json(published)
        page_html = render.project_html(published)
        digest = hashlib.sha256(page_json + b"\0" + page_html).hexdigest()
        current = self.state.project(name)
        pages: list[tuple[str, bytes]] = []
        if current is None or current[1] != digest:
            h, v1h, v1j = planner.page_paths(name)
            pages = [(h, page_html), (v1h, page_html), (v1j, page_json)]
        if self.cfg.mirror.json_api and (pages or current is None):
            api = None
            try:
                api = await self.upstream.project_api_json(name)
            except UpstreamError as e:
                log.info("%s: JSON API unavailable (%s); writing a minimal document", name, e)
            try:
                pages.append((f"pypi/{name}/json", render.project_api_json(published, api)))
            except ValueError:
                pages.append((f"pypi/{name}/json", render.project_api_json(published, None)))

        async def commit() -> None:
            if pages:
                # Noted before the write: a crash in between lists a page
                # that did not change, never the other way round.
                self.state.note_changes((rel, "add" if current is None else "replace") for rel, _ in pages)
                await trio.to_thread.run_sync(self.tree.write_files, pages)
                report.pages_written += 1
            orphans = self.state.publish_project(published, upstream=upstream_snap, page_sha256=digest, refs=refs)
            report.files_retired += len(orphans)
            report.projects_synced += 1

        unreferenced = len(self.state.refs(name) - refs)
        if unreferenced:
            self.held.append(_Held(name, unreferenced, removal=False, commit=commit))
        else:
            await commit()

    def _overwrites_linked(self, name: str, job: planner.Fetch, present: dict[str, tuple[int, str]]) -> bool:
        """True (and reported) when ``job`` would replace a verified file that a
        published page links with other bytes.

        On PyPI a path never changes content, so this is an upstream listing
        one path with two hashes (in one project or two): overwriting would
        break the page that links the old bytes.  The new entry is left out."""
        if job.rel not in present or not self.state.is_referenced(job.rel):
            return False
        self.metrics.rejected.labels("path").inc()
        log.warning("%s: refused %s: %s already holds a different file that a page links",
                    name, job.filename, job.rel)
        return True

    async def _fetch_counted(
        self, name: str, job: planner.Fetch, present: dict[str, tuple[int, str]], errors: list[str],
        report: CycleReport, recorded: list[tuple[str, int, str]], on_disk: bool, dirs: set[Path],
    ) -> None:
        try:
            await self._fetch(name, job, present, errors, report, recorded, on_disk, dirs)
        finally:
            report.files_done += 1
            if self.progress:
                self.progress("files", report.files_done, report.files_planned)
                self.progress("bytes", report.bytes_downloaded, 0)

    async def _fetch(
        self, name: str, job: planner.Fetch, present: dict[str, tuple[int, str]], errors: list[str],
        report: CycleReport, recorded: list[tuple[str, int, str]], on_disk: bool, dirs: set[Path],
    ) -> None:
        # A run killed between rename and state commit left the right bytes
        # in place: adopt them after a hash check instead of downloading.
        if job.sha256 is not None and on_disk:
            size = await trio.to_thread.run_sync(self.tree.adopt, job.rel, job.size, job.sha256)
            if size is not None:
                recorded.append((job.rel, size, job.sha256))
                present[job.rel] = (size, job.sha256)
                return
        try:
            # Only bodies of unknown size are capped (a known size is enforced
            # exactly): sidecars are documents, cut at the page cap.
            up = self.cfg.upstream
            limit = up.max_unknown_file_bytes if job.kind == "dist" else up.max_page_bytes
            # Files are committed by the tree in the download's last thread hop;
            # provenance is checked as JSON first.
            commit = None if job.kind == "provenance" else functools.partial(self.tree.commit_file, rel=job.rel, dirs=dirs)
            v = await self.downloader.fetch(job.url, sha256=job.sha256, size=job.size, limit=limit, commit=commit)
        except UnsafeInput as e:
            self.metrics.rejected.labels("path").inc()
            log.warning("%s: refused to write %s: %s", name, job.rel, e)
            errors.append(f"{job.filename}: unsafe path")
            return
        except DownloadError as e:
            if job.kind != "dist" and e.reason == "http_status" and e.detail in ("HTTP 404", "HTTP 410"):
                # A missing sidecar is simply not advertised.
                log.info("%s: %s not available upstream (%s)", name, job.filename, e.detail)
                return
            log.warning("%s: %s failed: %s", name, job.filename, e)
            errors.append(f"{job.filename}: {e.reason}")
            return
        committed = commit is not None
        try:
            if job.kind == "provenance" and not await trio.to_thread.run_sync(_is_json_file, v.tmp):
                self.metrics.rejected.labels("malformed").inc()
                log.warning("%s: provenance for %s is not valid JSON; not mirrored", name, job.filename[:-11])
                return
            try:
                if not committed:
                    await trio.to_thread.run_sync(functools.partial(self.tree.commit_file, v.tmp, job.rel, dirs=dirs))
            except UnsafeInput as e:
                # e.g. a directory on the path is a symlink: refuse this file only.
                self.metrics.rejected.labels("path").inc()
                log.warning("%s: refused to write %s: %s", name, job.rel, e)
                errors.append(f"{job.filename}: unsafe path")
                return
            committed = True
        finally:
            if not committed:
                # Also when a sibling's disk error cancels us: a long-running
                # daemon must not leak verified temps into state/tmp.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.tree.discard, v.tmp)
        recorded.append((job.rel, v.size, v.sha256))
        present[job.rel] = (v.size, v.sha256)
        report.files_downloaded += 1
        report.bytes_downloaded += v.size

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
    async def publish_root(self, report: CycleReport) -> None:
        gone = self.state.gone()
        json_dirty, html_dirty = self.state.root_dirty()
        if not (json_dirty or html_dirty or gone):
            return
        # One streaming pass in a worker thread: the root is the only page
        # whose size grows with the index (600k projects on PyPI).
        html = html_dirty or bool(gone)
        self.state.note_changes((p, "replace") for p in rootindex.ROOT_PAGES if html or p.endswith("v1_json"))
        await trio.to_thread.run_sync(
            functools.partial(rootindex.write_root, self.tree, self.state.path, self.state.serial, html=html)
        )
        self.state.clear_root_dirty()
        report.root_written = True
        if gone:
            paths = [p for n in gone for p in (*planner.page_paths(n), f"pypi/{n}/json")]
            self.state.note_changes((p, "delete") for p in paths)
            await trio.to_thread.run_sync(self.tree.remove, paths)
            self.state.clear_gone(gone)

    @_disk_error_aborts_cycle
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
        report.files_deleted = await downstream.retire_due(self.state, self.tree, retire_after=self.cfg.mirror.retire_after)
        self.metrics.files_retired.inc(report.files_deleted)
        if report.changed or report.files_deleted:
            stamp = time.strftime("%Y%m%dT%H:%M:%S\n", time.gmtime()).encode()
            self.state.note_changes([("last-modified", "replace")])
            await trio.to_thread.run_sync(self.tree.write_files, [("last-modified", stamp)])
        report.serial = self.state.serial
        report.synced_serial = self.state.synced_serial()
        report.duration = trio.current_time() - t0
        report.generation = await downstream.publish_changes(
            self.state, self.tree, self.cfg, serial=report.synced_serial, started=report.started,
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
        m.projects_failed.set(len(self.state.failures()))
        m.pending_retirement.set(self.state.retire_count())
        files, nbytes = self.state.tree_totals()
        m.tree_files.set(files)
        m.tree_bytes.set(nbytes)
        m.projects.set(self.state.project_count())


def _is_json_file(path: object) -> bool:
    try:
        with open(path, "rb") as f:  # type: ignore[call-overload]
            json.load(f)
        return True
    except (OSError, ValueError):
        return False
