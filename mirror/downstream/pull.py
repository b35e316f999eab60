"""``mirror pull SOURCE DEST``: keep a secondary copy of a primary's ``web/``.

Theory of operation
-------------------
The primary keeps publishing while we copy, so a plain ``rsync`` of the tree
can copy a page that links a file it has not copied (Debian's "index files
will reference files not yet mirrored").  The primary promises two things
(``mirror.sync.cycle``): a page only links files published before it, and a file is
deleted only ``retire_after`` after the last page stopped linking it.  A pull:

Every path is ``mirror.layout.PullLayout``'s, and every write into DEST
that is not rsync's own goes through ``mirror.publish.tree.Tree``, with the
same symlink refusal and durability barriers as on a primary.

1. copies the source's ``trace/`` and picks the source's trace; when its
   epoch and generation equal those of our own trace, there is nothing to do;
2. *stage 1*: copies new files (``packages/``) straight into DEST, deleting
   nothing.  When our generation is covered by the source's change lists
   (``mirror.downstream.changes``) only the listed paths are sent (``--files-from``);
   otherwise one full ``rsync -r`` of ``packages/``;
3. *stage 2*: copies the changed pages (listed ones, or every page that
   differs) into a staging directory, ``DEST/.~pull~/stage``, not into DEST;
4. *closure*: reads the staged pages.  Copies of one page that disagree (rsync
   read them across a rewrite) are fetched again; projects the new root lists
   without a page are fetched; then every file a staged page links that is
   not in DEST yet (published upstream after stage 1 began) is fetched;
5. renames the staged pages into DEST: project pages first, then the root
   index, then the rest; each rename is atomic, and each page's files are
   already there;
6. deletes the paths the lists say were retired or deleted (or, in full mode,
   what the source no longer has) - only those the source really no longer
   has, and never the page of a project our root still lists;
7. copies ``changes/`` (so another site can pull from us the same way), the
   source's traces, and writes our own trace, ``DEST/trace/<name>``, last.

The blocking steps on DEST and the stage are ``mirror.downstream.staging``'s.

A pull killed at any point leaves DEST consistent (every step before 5 only
adds unreferenced files; step 5 renames pages whose files are in place) and
its trace unchanged, so the next pull does the same work again.  This is why
stage 2 does not use ``--delay-updates``: it narrows the window but cannot
close it while the primary is mid-cycle, and the closure step can.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from mirror import __version__, layout
from mirror.downstream import changes, staging, trace
from mirror.downstream.rsync import EXACT_TIMES, VANISHED, Rsync
from mirror.errors import ConfigError, DiskError, PullError, UnsafePath
from mirror.layout import PullLayout
from mirror.model import safe_component
from mirror.publish.lock import DirectoryLock
from mirror.publish.tree import FileTree

log = logging.getLogger(__name__)

# Attempts at getting coherent copies of pages that change under us.
COHERENCE_TRIES = 5


@dataclass
class PullReport:
    mode: str = "up-to-date"  # "up-to-date", "lists" or "full"
    source_trace: str = ""
    generation: int = 0
    serial: int = 0
    files: list[str] = field(default_factory=list)  # stage 1
    pages: list[str] = field(default_factory=list)  # published from the stage
    closure: list[str] = field(default_factory=list)  # files fetched for new pages
    deleted: list[str] = field(default_factory=list)
    duration: float = 0.0

    def summary(self) -> str:
        if self.mode == "up-to-date":
            return f"up to date at generation {self.generation} (serial {self.serial}, trace {self.source_trace})"
        return (
            f"{self.mode}: now at generation {self.generation} (serial {self.serial}); "
            f"{len(self.files)} file(s) in stage 1, {len(self.pages)} page(s), "
            f"{len(self.closure)} late file(s), {len(self.deleted)} deleted, {self.duration:.2f}s"
        )


def source_url(source: str) -> str:
    """``rsync://host[:port]/module/path``, ``host::module/path``, ``host:/path`` or a
    local directory, always with the trailing slash rsync needs to copy contents."""
    if not source.strip():
        raise PullError("empty SOURCE")
    return source if source.endswith("/") else source + "/"


def pick_trace(
    traces: dict[str, dict[str, str]], *, want: str | None, own: str, mtimes: dict[str, int] | None = None,
) -> tuple[str, trace.Position]:
    """The source's own trace among those in its ``trace/``.

    With ``want``, that one; otherwise the newest trace that carries a
    position (a secondary's ``trace/`` also holds its primary's, and maybe
    old ones): latest ``Date``, then the file written last (the source
    writes its own trace after copying the others)."""
    found = {
        n: p for n, f in traces.items() if n != own and (p := trace.position(f)) is not None
    }
    if want is not None:
        if want not in found:
            raise PullError(f"the source has no usable trace/{want} (has: {', '.join(sorted(traces)) or 'none'})")
        return want, found[want]
    if not found:
        if own in traces and trace.position(traces[own]) is not None:
            # The source's trace has this host's own name: a primary and a
            # secondary on one host, or containers with the same host name.
            raise PullError(
                f"the source's only trace is trace/{own}, this secondary's own name (a primary and a secondary "
                f"on one host, or containers with one host name): give this secondary another name with "
                f"--name, or the primary another [mirror] name")
        raise PullError("the source's trace/ holds no trace written by mirror: has it finished a cycle?")
    mtimes = mtimes or {}
    name = max(found, key=lambda n: (found[n].date, mtimes.get(n, 0), n))
    return name, found[name]


class _Pull:
    def __init__(self, source: str, dest: Path, *, name: str, rsync: Rsync, want: str | None) -> None:
        try:
            safe_component(name)
        except UnsafePath:
            raise ConfigError(f"--name: letters, digits, '.', '_' and '-' only, got {name!r}") from None
        self.src = source_url(source)
        self.dest = dest
        self.layout = PullLayout(dest)
        self.tree = FileTree.at(self.layout)
        self.name = name
        self.rsync = rsync
        self.want = want
        self.work = self.layout.work
        self.stage = self.layout.stage
        self.meta = self.layout.meta
        self.tmp = self.layout.tmp
        self.report = PullReport()
        self._lists = 0

    def reset(self) -> None:
        for d in (self.stage, self.meta, self.tmp):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)

    async def fetch(self, paths: list[str], target: Path, *, what: str, compare: bool = False,
                    ignore_missing: bool = True, always: bool = False) -> list[str]:
        self._lists += 1
        res = await self.rsync.fetch_list(
            self.src, paths, target, listfile=self.work / f"list.{self._lists}", temp_dir=self.tmp, what=what,
            compare_dest=self.dest if compare else None, ignore_missing=ignore_missing, always=always,
        )
        return res.received

    # -- 1: where are we --------------------------------------------------------
    async def positions(self) -> tuple[str, trace.Position, trace.Position | None]:
        await self.rsync.run(["-rt", "--delete", self.src + layout.TRACES, f"{self.meta}/{layout.TRACES}"],
                             what="reading the source's trace/", source=self.src)
        traces = await trio.to_thread.run_sync(staging.read_traces, self.meta / layout.TRACES)
        mtimes = await trio.to_thread.run_sync(staging.mtimes, self.meta / layout.TRACES)
        name, pos = pick_trace(traces, want=self.want, own=self.name, mtimes=mtimes)
        local = await trio.to_thread.run_sync(staging.read_traces, self.dest / layout.TRACES, self.name)
        mine = trace.position(local[self.name]) if self.name in local else None
        return name, pos, mine

    async def read_lists(self, have: trace.Position, want: trace.Position) -> changes.Net | None:
        """Net changes from the source's lists after our generation, or None (not covered)."""
        await self.fetch([layout.CHANGES_INDEX], self.meta, what=f"reading {layout.CHANGES_INDEX}")
        index = self.meta / layout.CHANGES_INDEX
        if not index.exists():
            return None
        try:
            epoch, entries = changes.parse_index(index.read_bytes())
        except ValueError as e:
            log.warning("unusable change index on the source (%s); doing a full pull", e)
            return None
        needed = changes.covering(entries, after=have.generation, upto=want.generation)
        if epoch != want.epoch or needed is None:
            log.info("the source's change lists do not reach back to generation %d; doing a full pull", have.generation)
            return None
        rels = [layout.CHANGES + e.name for e in needed]
        # A list may expire between the index and this read: then go full.
        await self.fetch(rels, self.meta, what="reading change lists")
        try:
            lists = [changes.parse_list((self.meta / r).read_bytes()) for r in rels]
        except (OSError, ValueError) as e:
            log.warning("unusable change list on the source (%s); doing a full pull", e)
            return None
        net = changes.net_changes(lists)
        if net is None:
            log.info("a change list after generation %d is incomplete (too many changes); doing a full pull",
                     have.generation)
        return net

    # -- 2 and 3: files, then pages into the stage --------------------------------
    async def stage_one(self, net: changes.Net | None) -> None:
        if net is not None:
            files = staging.valid({p for p in net.fetch if layout.is_package_path(p)}, "change list")
            self.report.files = await self.fetch(files, self.dest, what="stage 1 (listed files)")
        else:
            res = await self.rsync.run(
                ["-rt", f"--temp-dir={self.tmp}", self.src + layout.PACKAGES, f"{self.dest}/{layout.PACKAGES}"],
                what="stage 1 (all files)", source=self.src, ok=(0, VANISHED),
            )
            self.report.files = [layout.PACKAGES + p for p in res.received]
        await self.sync_received(self.report.files)

    async def sync_received(self, rels: Iterable[str]) -> None:
        """Files rsync put into DEST, and their directory entries, are durable
        before any page that links them is renamed into place (one barrier:
        this holds even for an rsync without ``--fsync``)."""
        if rels:
            await trio.to_thread.run_sync(self.tree.barrier)

    async def stage_two(self, net: changes.Net | None) -> None:
        if net is not None:
            pages = staging.valid({p for p in net.fetch if not p.startswith(staging.NOT_PAGES)}, "change list")
            await self.fetch(pages, self.stage, what="stage 2 (listed pages)", compare=True)
        else:
            excludes = [f"--exclude=/{p}" for p in staging.NOT_PAGES]
            await self.rsync.run(
                ["-rt", EXACT_TIMES, f"--temp-dir={self.tmp}", f"--compare-dest={self.dest}/", *excludes,
                 self.src, f"{self.stage}/"],
                what="stage 2 (all pages)", source=self.src, ok=(0, VANISHED),
            )

    # -- 4: closure -------------------------------------------------------------
    async def close(self) -> None:
        for _ in range(COHERENCE_TRIES):
            again, missing = await trio.to_thread.run_sync(staging.examine, self.stage, self.dest)
            if again:
                log.info("fetching %d page(s) again (changed while copied, or new in the root)", len(again))
                await self.fetch(staging.valid(again, "page"), self.stage, what="stage 2 (pages again)", always=True)
                continue
            if missing:
                got = await self.fetch(staging.valid(missing, "page link"), self.dest, what="files linked by new pages",
                                       ignore_missing=False)
                self.report.closure = got
                await self.sync_received(got)
            return
        raise PullError(
            f"pages kept changing while being copied ({COHERENCE_TRIES} tries); nothing was published, retry later"
        )

    # -- 6: deletions -----------------------------------------------------------
    async def delete(self, net: changes.Net | None) -> None:
        if net is None:
            res = await self.rsync.run(
                ["-r", "--delete", "--existing", "--ignore-existing", self.src + layout.PACKAGES,
                 f"{self.dest}/{layout.PACKAGES}"],
                what="deleting files the source no longer has", source=self.src, ok=(0, VANISHED),
            )
            self.report.deleted += [layout.PACKAGES + p for p in res.deleted]
        candidates = await trio.to_thread.run_sync(staging.deletion_candidates, self.dest, net)
        if not candidates:
            return
        # Delete only what the source no longer has: a path retired and then
        # published again upstream stays.
        empty = self.work / "empty"
        empty.mkdir(exist_ok=True)
        self._lists += 1
        res = await self.rsync.fetch_list(
            self.src, candidates, empty, listfile=self.work / f"list.{self._lists}", temp_dir=self.tmp,
            what="checking deletions", compare_dest=None, ignore_missing=True,
        )
        still = set(res.received)
        gone = [p for p in candidates if p not in still]
        self.report.deleted += await trio.to_thread.run_sync(self.tree.remove, gone)

    # -- 7: lists and traces --------------------------------------------------------
    async def finish(self, source_name: str, pos: trace.Position, started: float, t0: float) -> None:
        try:
            await self.rsync.run(
                ["-rt", EXACT_TIMES, "--delete", f"--temp-dir={self.tmp}", self.src + layout.CHANGES,
                 f"{self.dest}/{layout.CHANGES}"],
                what="copying changes/", source=self.src, ok=(0, VANISHED),
            )
        except PullError as e:
            log.warning("change lists not copied (a site pulling from here will do full pulls): %s", e)
        fields: dict[str, str | int | float] = {
            "Date": trace.format_date(time.time()),
            "Date-Started": trace.format_date(started),
            "Creator": f"mirror {__version__} (pull)",
            "Mirror": self.name,
            "Upstream": self.src,
            "Source-Trace": source_name,
            "Serial": pos.serial,
            "Epoch": pos.epoch,
            "Generation": pos.generation,
            "Mode": self.report.mode,
            "Files-Transferred": len(self.report.files) + len(self.report.closure),
            "Cycle-Seconds": float(trio.current_time() - t0),
        }
        await trio.to_thread.run_sync(staging.write_traces, self.tree, self.meta / layout.TRACES, self.name,
                                      trace.render_trace(fields))

    async def run(self) -> PullReport:
        started, t0 = time.time(), trio.current_time()
        await trio.to_thread.run_sync(self.reset)
        source_name, pos, mine = await self.positions()
        r = self.report
        r.source_trace, r.generation, r.serial = source_name, pos.generation, pos.serial
        if pos.same_as(mine):
            return r
        net = None
        if mine is not None and mine.epoch == pos.epoch and mine.generation < pos.generation:
            net = await self.read_lists(mine, pos)
        r.mode = "full" if net is None else "lists"
        log.info("pulling %s (trace %s, generation %d) in %s mode", self.src, source_name, pos.generation, r.mode)
        await self.stage_one(net)
        await self.stage_two(net)
        await self.close()
        r.pages = await trio.to_thread.run_sync(staging.publish, self.tree, self.stage)
        await self.delete(net)
        await self.finish(source_name, pos, started, t0)
        r.duration = trio.current_time() - t0
        return r


async def pull(source: str, dest: Path, *, name: str, rsync: Rsync | None = None, want: str | None = None) -> PullReport:
    dest = dest.absolute()
    job = _Pull(source, dest, name=name, rsync=rsync or Rsync(), want=want)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PullError(f"cannot create {dest}: {e.strerror or e}") from None
    with DirectoryLock(job.layout.lock):
        try:
            return await job.run()
        except OSError as e:
            # The local side failed (full disk, permissions): say where.
            raise DiskError(f"{e.filename2 or e.filename or dest}: {e.strerror or e}") from None
