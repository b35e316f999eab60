"""One project's sync, as an object: from the snapshot upstream gave us to
the pages we publish.

Theory of operation
-------------------
``ProjectSync`` carries one project through four steps, each its own method:

1. ``plan``: apply the filters, ask the state which files are already
   verified in the tree, and list the fetches (``planner.plan_project``).  A
   fetch that would overwrite a file a published page links with other
   bytes is refused (an upstream listing one path with two hashes).
2. ``download``: every fetch concurrently, through the shared limiter.  A
   file a killed run left in place is adopted after a hash check instead.
   Each verified file stays a temp until the publisher places it, with the
   rest of its batch, in one thread hop.
3. ``prepare_pages``: ``planner.finalize`` builds the snapshot to publish
   (only files that are in the tree), the pages are rendered, and their
   digest says whether anything changed.  With ``json_api`` and a changed
   page, the legacy JSON API document is fetched from upstream here, before
   anything is written.
4. ``publication``: what the ``Publisher`` (``mirror.sync.publisher``)
   makes durable and records, in a batch with other projects: the files,
   then the pages, then the project row.  No network.

The caller (``mirror.sync.cycle``) decides whether the pages go out now or
wait for the safety valve (``unreferenced`` > 0); the files are recorded
either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from mirror import layout
from mirror.config import Config
from mirror.errors import DownloadError, UnsafeInput, UpstreamError
from mirror.fetch.attempt import FileJob, Outcome, Verified
from mirror.fetch.downloader import Downloader
from mirror.metrics import Metrics
from mirror.model import ProjectSnapshot
from mirror.plan import filters, planner
from mirror.publish import render
from mirror.publish.state import State
from mirror.publish.tree import Tree
from mirror.upstream.client import Upstream

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


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


@dataclass
class Publication:
    """What one project hands the publisher."""

    name: str
    # verified temps to place at their paths
    temps: list[tuple[Path, str]] = field(default_factory=list)
    # the files to record once durable (placed temps and adopted files): (path, size, sha256)
    files: list[tuple[str, int, str]] = field(default_factory=list)
    # the pages to write, and the change-list operation for them
    pages: list[tuple[str, bytes]] = field(default_factory=list)
    op: str = "replace"
    # the project row to record once its pages are durable (None: files only)
    published: ProjectSnapshot | None = None
    upstream: ProjectSnapshot | None = None
    digest: str = ""
    refs: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Deps:
    """What a project's sync works with; built once per cycle by the Syncer."""

    cfg: Config
    state: State
    tree: Tree
    upstream: Upstream
    downloader: Downloader
    metrics: Metrics
    progress: Progress | None = None


class ProjectSync:
    def __init__(self, deps: Deps, upstream_snap: ProjectSnapshot, report: CycleReport) -> None:
        self.d = deps
        self.report = report
        self.name = upstream_snap.name
        self.upstream_snap = upstream_snap
        self.snap = upstream_snap
        # path -> (size, sha256) of what is verified in the tree
        self.present: dict[str, tuple[int, str]] = {}
        self.fetches: list[planner.Fetch] = []
        self.errors: list[str] = []
        # Verified temps, to be placed at their paths by the publisher.
        self.temps: list[tuple[Path, str]] = []
        # Files downloaded (in ``temps``) or adopted in place, to record.
        self.recorded: list[tuple[str, int, str]] = []
        # Set by prepare_pages:
        self.published = upstream_snap
        self.refs: set[str] = set()
        self.digest = ""
        self.current: tuple[int, str] | None = None
        self.pages: list[tuple[str, bytes]] = []

    @property
    def error(self) -> str:
        e = self.errors
        return "; ".join(e[:3]) + (f" (+{len(e) - 3} more)" if len(e) > 3 else "")

    @property
    def unreferenced(self) -> int:
        """Paths the project's current page links that the new one drops."""
        return len(self.d.state.refs(self.name) - self.refs)

    # -- 1 ------------------------------------------------------------------------
    def plan(self) -> None:
        f = self.d.cfg.mirror_filters
        if f.active:
            self.snap, dropped = filters.apply(f, self.upstream_snap)
            if dropped:
                log.debug("%s: %d file(s) excluded by the filters", self.name, len(dropped))
        wanted = [p for rf in self.snap.files for p in (rf.path, rf.metadata_path, rf.provenance_path)]
        self.present = self.d.state.known_files(wanted)
        self.fetches = [j for j in planner.plan_project(self.snap, self.present) if not self._overwrites_linked(j)]

    def _overwrites_linked(self, job: planner.Fetch) -> bool:
        """True (and reported) when ``job`` would replace a verified file that a
        published page links with other bytes.

        On PyPI a path never changes content, so this is an upstream listing
        one path with two hashes (in one project or two): overwriting would
        break the page that links the old bytes.  The new entry is left out."""
        if job.rel not in self.present or not self.d.state.is_referenced(job.rel):
            return False
        self.d.metrics.rejected.labels("path").inc()
        log.warning("%s: refused %s: %s already holds a different file that a page links",
                    self.name, job.filename, job.rel)
        return True

    # -- 2 ------------------------------------------------------------------------
    async def download(self) -> bool:
        """Fetch everything planned; True when nothing failed."""
        tree = self.d.tree
        self.report.files_planned += len(self.fetches)
        # Left in place by a killed run?  One stat hop for the whole project.
        existing = await trio.to_thread.run_sync(tree.existing, [j.rel for j in self.fetches]) if self.fetches else set()
        up = self.d.cfg.upstream
        try:
            adopted: set[str] = set()
            if candidates := [j for j in self.fetches if j.sha256 is not None and j.rel in existing]:
                # A run killed between rename and state commit left the right
                # bytes in place: adopt them after a hash check instead of
                # downloading.
                async with trio.open_nursery() as nursery:
                    for job in candidates:
                        nursery.start_soon(self._adopt, job, adopted)
            todo = [j for j in self.fetches if j.rel not in adopted]
            # Only bodies of unknown size are capped (a known size is
            # enforced exactly): sidecars are documents, cut at the page cap.
            # Provenance has no hash to hold a download mirror's bytes to:
            # fetch_file takes it from upstream's index host.
            outcomes = await self.d.downloader.fetch_batch([
                FileJob(j.url, j.rel, j.sha256, j.size, up.max_unknown_file_bytes if j.kind == "dist" else up.max_page_bytes)
                for j in todo
            ]) if todo else []
            # From here each temp is this project's until the publisher places it.
            self.temps += [(o.tmp, j.rel) for j, o in zip(todo, outcomes) if isinstance(o, Verified)]
            for job, outcome in zip(todo, outcomes):
                await self._settle(job, outcome)
        except BaseException:
            # A disk error, or a stop: a long-running daemon must not leak
            # verified temps into state/tmp.
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(tree.discard_all, self.temps)
            self.temps.clear()
            raise
        return not self.errors

    async def _adopt(self, job: planner.Fetch, adopted: set[str]) -> None:
        assert job.sha256 is not None
        size = await trio.to_thread.run_sync(self.d.tree.adopt, job.rel, job.size, job.sha256)
        if size is not None:
            adopted.add(job.rel)
            self.recorded.append((job.rel, size, job.sha256))
            self.present[job.rel] = (size, job.sha256)
            self._done()

    def _done(self) -> None:
        self.report.files_done += 1
        if self.d.progress:
            self.d.progress("files", self.report.files_done, self.report.files_planned)
            self.d.progress("bytes", self.report.bytes_downloaded, 0)

    def _refuse(self, job: planner.Fetch, e: UnsafeInput) -> None:
        self.d.metrics.rejected.labels("path").inc()
        log.warning("%s: refused to write %s: %s", self.name, job.rel, e)
        self.errors.append(f"{job.filename}: unsafe path")

    async def _settle(self, job: planner.Fetch, outcome: Outcome) -> None:
        """Take one file's outcome: a verified temp is recorded (provenance
        only if it is JSON), an error noted."""
        try:
            if isinstance(outcome, UnsafeInput):
                self._refuse(job, outcome)
            elif isinstance(outcome, DownloadError):
                if job.kind != "dist" and outcome.reason == "http_status" and outcome.detail in ("HTTP 404", "HTTP 410"):
                    # A missing sidecar is simply not advertised.
                    log.info("%s: %s not available upstream (%s)", self.name, job.filename, outcome.detail)
                else:
                    log.warning("%s: %s failed: %s", self.name, job.filename, outcome)
                    self.errors.append(f"{job.filename}: {outcome.reason}")
            elif job.kind == "provenance" and not await trio.to_thread.run_sync(_is_json_file, outcome.tmp):
                self.d.metrics.rejected.labels("malformed").inc()
                log.warning("%s: provenance for %s is not valid JSON; not mirrored", self.name, job.filename[:-11])
                self.temps.remove((outcome.tmp, job.rel))
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self.d.tree.discard, outcome.tmp)
            else:
                self.recorded.append((job.rel, outcome.size, outcome.sha256))
                self.present[job.rel] = (outcome.size, outcome.sha256)
                self.report.files_downloaded += 1
                self.report.bytes_downloaded += outcome.size
        finally:
            self._done()

    # -- 3 ------------------------------------------------------------------------
    async def prepare_pages(self) -> None:
        state, name = self.d.state, self.name
        published, self.refs = planner.finalize(self.snap, self.present)
        shown = state.display_name(name)
        if shown is not None and shown != published.display_name:
            published = replace(published, display_name=shown)
        self.published = published
        page_json = render.project_json(published)
        page_html = render.project_html(published)
        self.digest = hashlib.sha256(page_json + b"\0" + page_html).hexdigest()
        self.current = state.project(name)
        if self.current is None or self.current[1] != self.digest:
            h, v1h, v1j = layout.project_pages(name)
            self.pages = [(h, page_html), (v1h, page_html), (v1j, page_json)]
        if self.d.cfg.mirror.json_api and (self.pages or self.current is None):
            self.pages.append((layout.api_json(name), self._api_json(await self._api_doc())))

    async def _api_doc(self) -> dict[str, Any] | None:
        try:
            return await self.d.upstream.project_api_json(self.name)
        except UpstreamError as e:
            log.info("%s: JSON API unavailable (%s); writing a minimal document", self.name, e)
            return None

    def _api_json(self, doc: dict[str, Any] | None) -> bytes:
        try:
            return render.project_api_json(self.published, doc)
        except ValueError:
            return render.project_api_json(self.published, None)

    # -- 4 ------------------------------------------------------------------------
    def publication(self, *, pages: bool = True) -> Publication:
        """What the publisher records: the files, and (``pages``) the pages
        and the project row."""
        # Handed over: the publisher places (or discards) the temps and records the files.
        temps, self.temps = self.temps, []
        files, self.recorded = self.recorded, []
        if not pages:
            return Publication(self.name, temps=temps, files=files)
        return Publication(
            self.name, temps=temps, files=files, pages=self.pages, op="add" if self.current is None else "replace",
            published=self.published, upstream=self.upstream_snap, digest=self.digest, refs=self.refs,
        )


def _is_json_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            json.load(f)
        return True
    except (OSError, ValueError):
        return False
