"""``mirror verify``: check the published tree against the state, in bounded memory.

Theory of operation
-------------------
The state knows every file the mirror verified (``files``) and every project
it published (``projects``); ``web/`` is what clients see.  Verify compares
them and reports each disagreement as one line, as soon as it is found:

* *files*: every row, streamed from SQLite in keyset-paged batches, must be a
  regular file of the recorded size (with ``--hash``, of the recorded
  sha256), reached through plain directories only;
* *pages*: every published project has its three pages, the two HTML pages
  are the same bytes, and every link of the JSON page (the HTML page must
  list the same files with the same hashes) is a file the state verified
  with the hash the page promises;
* *root*: the root index is byte for byte what the state renders (at the
  serial the root was written with), compared while both stream;
* *orphans* (``--orphans``): an iterative ``os.scandir`` walk of
  ``packages/``, ``simple/`` and ``pypi/`` reports what no row accounts for,
  and any symlink.

Memory is bounded by one batch of rows, one project page and the scandir
stack.

A running mirror holds ``state/lock`` for its whole life, so the checks take
no lock: they read through a read-only SQLite connection, each batch its own
short transaction, and check every problem a second time before reporting it
(the mirror may have replaced or retired that file in between).  Changes
need more care:

* ``--repair`` queues the work in the state (``State.queue_repair``: forget
  the bad files, clear the page digests, put the projects in ``todo``).  With
  no mirror running, verify takes the lock and works through the queue with
  the sync engine itself (fresh pages, verified downloads, ordered publish);
  a running mirror picks the queue up on its next cycle instead.  A queue,
  not a second writer, so the one-writer rule of the tree holds.
* ``--orphans delete`` needs the lock: a file that a running mirror renamed
  into place a moment ago is not recorded yet and looks like an orphan.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import stat
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

import trio

from mirror import __version__, planner, render
from mirror.config import Config
from mirror.errors import UnsafePath
from mirror.metrics import Metrics
from mirror.model import safe_relpath
from mirror.state import State
from mirror.sync import CycleReport, Syncer
from mirror.tree import Tree
from mirror.upstream import open_client

log = logging.getLogger(__name__)

# Problems that a fresh download fixes, and problems that a rewritten page fixes.
FILE_KINDS = frozenset({"missing", "size", "hash", "not_a_file"})
PAGE_KINDS = frozenset({"page_missing", "page_mismatch", "page_unreadable", "link_broken", "link_hash"})
# In live mode a file this recent may be one the mirror is committing right now
# (it records a project's files together, once the project's downloads end).
_RECENT = 3600.0
_PAGES = ("index.html", "index.v1_html", "index.v1_json")
_ROOT_SERIAL = re.compile(rb'^\{"meta":\{"api-version":"[0-9.]+","_last-serial":(\d+)\}')


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str
    path: str  # relative to web/
    detail: str = ""
    project: str | None = None

    def line(self) -> str:
        return f"{self.kind}\t{self.path}\t{self.detail}".rstrip("\t")


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        href = dict(attrs).get("href")
        if tag == "a" and href is not None:
            self.hrefs.append(href)


def _sha256_file(p: str) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Verifier:
    """The checks; each is a generator of problems.  ``live`` means a mirror
    may be writing at the same time."""

    def __init__(self, tree: Tree, state: State, *, hash: bool = False, live: bool = True, batch: int = 1000) -> None:
        self.tree = tree
        self.web = tree.web
        # Plain strings on the hot paths: pathlib parses (and interns) every
        # component of every path, which costs time and memory per file.
        self.root = str(tree.web)
        self.state = state
        self.hash = hash
        self.live = live
        self.batch = batch
        self.stats: Counter[str] = Counter()
        self._dirs: dict[str, bool] = {}

    # -- files ------------------------------------------------------------------
    def check_files(self) -> Iterator[Problem]:
        for path, size, sha in self.state.iter_files(self.batch):
            self.stats["files"] += 1
            if self._check_file(path, size, sha) is not None:
                # Second look: the row may have changed or gone meanwhile.
                row = self.state.known_files([path]).get(path)
                problem = None if row is None else self._check_file(path, *row)
                if problem is not None:
                    yield problem

    def _check_file(self, path: str, size: int, sha: str) -> Problem | None:
        if not self._plain_dir(posixpath.dirname(path)):
            return Problem("not_a_file", path, "a directory on its path is a symlink or not a directory")
        p = os.path.join(self.root, path)
        try:
            st = os.lstat(p)
        except OSError as e:
            return Problem("missing", path, "" if isinstance(e, FileNotFoundError) else str(e.strerror))
        if not stat.S_ISREG(st.st_mode):
            return Problem("not_a_file", path, "not a regular file")
        if st.st_size != size:
            return Problem("size", path, f"{st.st_size} bytes, the state says {size}")
        if self.hash:
            self.stats["bytes_hashed"] += size
            try:
                digest = _sha256_file(p)
            except OSError as e:
                return Problem("missing", path, str(e.strerror))
            if digest != sha:
                return Problem("hash", path, f"sha256 {digest}, the state says {sha}")
        return None

    def _plain_dir(self, rel: str) -> bool:
        """Is web/<rel> reached through real directories only (a missing one
        is fine: the file's own check reports it)?  Cached: files come in
        path order, so their parents repeat."""
        if rel in ("", "."):
            return True
        hit = self._dirs.get(rel)
        if hit is not None:
            return hit
        ok = self._plain_dir(posixpath.dirname(rel))
        if ok:
            try:
                ok = stat.S_ISDIR(os.lstat(os.path.join(self.root, rel)).st_mode)
            except FileNotFoundError:
                ok = True
            except OSError:
                ok = False
        if len(self._dirs) > 10_000:
            self._dirs.clear()
        self._dirs[rel] = ok
        return ok

    # -- pages ------------------------------------------------------------------
    def check_pages(self) -> Iterator[Problem]:
        for name in self.state.iter_projects(self.batch):
            self.stats["projects"] += 1
            # Checked twice when wrong: a live mirror may be rewriting it.
            if self._check_project(name):
                yield from self._check_project(name)

    def _read(self, rel: str) -> bytes | None:
        p = self.web / rel
        try:
            if not self._plain_dir(posixpath.dirname(rel)) or not stat.S_ISREG(os.lstat(p).st_mode):
                return None
            return p.read_bytes()
        except OSError:
            return None

    def _resolve(self, page_dir: str, href: object) -> str | None:
        """The web/-relative path a relative link of a page points at."""
        if not isinstance(href, str):
            return None
        parts = urlsplit(href)
        if parts.scheme or parts.netloc:
            return None  # our pages link our copies, never another host
        rel = posixpath.normpath(posixpath.join(page_dir, unquote(parts.path)))
        return None if rel.startswith("../") or rel.startswith("/") or rel == ".." else rel

    def _check_project(self, name: str) -> list[Problem]:
        page_dir = f"simple/{name}"
        html_rel, v1h_rel, json_rel = planner.page_paths(name)
        blobs = {rel: self._read(rel) for rel in (html_rel, v1h_rel, json_rel)}
        problems = [Problem("page_missing", rel, project=name) for rel, b in blobs.items() if b is None]
        html, v1h, raw = blobs[html_rel], blobs[v1h_rel], blobs[json_rel]
        if html is not None and v1h is not None and html != v1h:
            problems.append(Problem("page_mismatch", v1h_rel, "differs from index.html", project=name))
        if raw is None:
            return problems
        try:
            files = json.loads(raw)["files"]
            if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
                raise ValueError("'files' is not a list of objects")
        except (ValueError, KeyError, TypeError) as e:
            return [*problems, Problem("page_unreadable", json_rel, str(e)[:200], project=name)]
        links: dict[str, str | None] = {}  # rel -> the sha256 the page promises (None: any)
        dists: set[tuple[str | None, Any]] = set()
        for f in files:
            rel = self._resolve(page_dir, f.get("url"))
            sha = (f.get("hashes") or {}).get("sha256")
            dists.add((rel, sha))
            if rel is None:
                problems.append(Problem("link_broken", json_rel, f"{f.get('url')!r:.200} leaves the tree", project=name))
                continue
            links[rel] = sha if isinstance(sha, str) else None
            md = f.get("core-metadata")
            if md:
                links[rel + ".metadata"] = md.get("sha256") if isinstance(md, dict) else None
            if f.get("provenance"):
                prov = self._resolve(page_dir, f["provenance"])
                if prov is None:
                    problems.append(Problem("link_broken", json_rel, f"provenance {f['provenance']!r:.200} leaves the tree",
                                            project=name))
                else:
                    links[prov] = None
        known = self.state.known_files(links)
        for rel, sha in links.items():
            row = known.get(rel)
            if row is None:
                problems.append(Problem("link_broken", json_rel, f"links {rel}, which the state does not hold",
                                        project=name))
            elif sha is not None and row[1] != sha:
                problems.append(Problem("link_hash", json_rel, f"promises sha256 {sha} for {rel}, the state holds {row[1]}",
                                        project=name))
        if html is not None:
            parser = _Anchors()
            parser.feed(html.decode("utf-8", "replace"))
            in_html = set()
            for href in parser.hrefs:
                path, _, frag = href.partition("#")
                in_html.add((self._resolve(page_dir, path), frag.removeprefix("sha256=") or None))
            if in_html != dists:
                problems.append(Problem("page_mismatch", html_rel, "HTML and JSON pages list different files",
                                        project=name))
        return problems

    # -- root -------------------------------------------------------------------
    def check_root(self) -> Iterator[Problem]:
        """The root must be, byte for byte, what the state renders now (with
        the serial it was written at): streamed, like the writer does it."""
        dirty = any(self.state.root_dirty())
        if dirty and self.live:
            return  # pages went out after the root was written: a mirror is at work
        if self.state.project_count() == 0:
            return  # nothing published, no root needed yet
        paths = [posixpath.join(self.root, "simple", n) for n in _PAGES]
        missing = [n for n, p in zip(_PAGES, paths) if self._read_head(p) is None]
        for n in missing:
            yield Problem("root", f"simple/{n}", "missing")
        if missing:
            return
        if dirty:
            yield Problem("root", "simple/index.v1_json", "out of date: a run stopped before rewriting it")
            return
        m = _ROOT_SERIAL.match(self._read_head(paths[2]) or b"")
        if m is None:
            yield Problem("root", "simple/index.v1_json", "unreadable: no meta with _last-serial at its start")
            return
        with open(paths[0], "rb") as html, open(paths[1], "rb") as v1h, open(paths[2], "rb") as js:
            same = [True, True, True]
            for html_chunk, json_chunk in render.iter_root(self.state.root_entries(), serial=int(m.group(1))):
                for i, (f, chunk) in enumerate(((html, html_chunk), (v1h, html_chunk), (js, json_chunk))):
                    if same[i] and f.read(len(chunk)) != chunk:
                        same[i] = False
            for i, f in enumerate((html, v1h, js)):
                if same[i] and f.read(1):
                    same[i] = False
        for n, ok in zip(_PAGES, same):
            if not ok:
                yield Problem("root", f"simple/{n}", "does not list exactly the published projects")

    def _read_head(self, path: str) -> bytes | None:
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return None
            with open(path, "rb") as f:
                return f.read(256)
        except OSError:
            return None

    # -- orphans ----------------------------------------------------------------
    def find_orphans(self) -> Iterator[Problem]:
        """Files under packages/ that no ``files`` row accounts for, project
        directories under simple/ and pypi/ that no ``projects`` row does,
        and symlinks anywhere there."""
        now = time.time()
        pending: list[tuple[str, int]] = []
        stack = [os.path.join(self.root, "packages")]
        while stack:
            d = stack.pop()
            try:
                entries = os.scandir(d)
            except (FileNotFoundError, NotADirectoryError):
                continue
            with entries:
                for e in entries:
                    rel = e.path[len(self.root) + 1 :]
                    self.stats["walked"] += 1
                    if e.is_symlink():
                        yield Problem("symlink", rel, "-> " + os.readlink(e.path))
                    elif e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    else:
                        st = e.stat(follow_symlinks=False)
                        if self.live and now - st.st_mtime < _RECENT:
                            self.stats["too_recent"] += 1  # maybe being committed right now
                            continue
                        pending.append((rel, st.st_size))
                        if len(pending) >= self.batch:
                            yield from self._unknown(pending)
                            pending = []
        yield from self._unknown(pending)
        gone = set(self.state.gone())  # pages waiting for the next root rewrite
        for top in ("simple", "pypi"):
            yield from self._orphan_pages(top, gone)

    def _unknown(self, files: list[tuple[str, int]]) -> Iterator[Problem]:
        known = self.state.known_files(rel for rel, _ in files)
        for rel, size in files:
            if rel not in known:
                yield Problem("orphan", rel, f"{size} bytes")

    def _orphan_pages(self, top: str, gone: set[str]) -> Iterator[Problem]:
        try:
            entries = os.scandir(self.web / top)
        except (FileNotFoundError, NotADirectoryError):
            return
        now = time.time()
        with entries:
            batch: list[str] = []
            for e in entries:
                if e.is_symlink():
                    yield Problem("symlink", f"{top}/{e.name}", "-> " + os.readlink(e.path))
                elif self.live and now - e.stat(follow_symlinks=False).st_mtime < _RECENT:
                    # A live mirror writes a project's pages, then records it.
                    self.stats["too_recent"] += 1
                elif e.is_dir(follow_symlinks=False) and e.name not in gone:
                    batch.append(e.name)
                    if len(batch) >= self.batch:
                        yield from self._unpublished(top, batch)
                        batch = []
            yield from self._unpublished(top, batch)

    def _unpublished(self, top: str, names: list[str]) -> Iterator[Problem]:
        for name in names:
            if self.state.project(name) is None:
                yield Problem("orphan_page", f"{top}/{name}", "no published project of that name", project=name)


# -- the command ---------------------------------------------------------------------


@dataclass
class VerifyReport:
    problems: Counter[str] = field(default_factory=Counter)
    stats: Counter[str] = field(default_factory=Counter)
    bad_files: int = 0  # to download again
    bad_pages: int = 0  # projects whose pages must be rewritten (files' projects not included)
    queued: int = 0  # projects put in todo (a project may count once per batch)
    root: bool = False
    deleted: int = 0
    undeletable: list[str] = field(default_factory=list)
    repair: CycleReport | None = None

    def summary(self) -> str:
        found = ", ".join(f"{k}={v}" for k, v in sorted(self.problems.items())) or "none"
        s = self.stats
        hashed = f" ({s['bytes_hashed'] / 1e6:.1f} MB hashed)" if s["bytes_hashed"] else ""
        text = f"{s['files']} file(s){hashed} and {s['projects']} project(s) checked; problems: {found}"
        if s["walked"]:
            text += f"; {s['walked']} entries walked"
        if s["too_recent"]:
            text += f" ({s['too_recent']} too recent to call orphans: a running mirror may be writing them)"
        return text


def verify(
    cfg: Config, out: TextIO, *, hash: bool = False, repair: bool = False, dry_run: bool = False,
    orphans: str | None = None, exclusive: bool = False, batch: int = 1000,
) -> VerifyReport:
    """Run the checks, print one line per problem to ``out``, and apply what
    was asked.  ``exclusive``: the caller holds ``state/lock``."""
    directory = cfg.mirror.directory
    tree = Tree(directory)
    ro = State.open_readonly(directory / "state")
    rw = State.open(directory / "state") if repair and not dry_run else None
    report = VerifyReport()
    v = Verifier(tree, ro, hash=hash, live=not exclusive, batch=batch)
    try:
        # Orphans first: queueing a repair forgets the bad files' rows, which
        # would make them look orphaned.
        if orphans is not None:
            delete: list[str] = []
            for problem in v.find_orphans():
                out.write(problem.line() + "\n")
                report.problems[problem.kind] += 1
                if orphans == "delete" and problem.kind in ("orphan", "orphan_page"):
                    delete.extend(_orphan_paths(problem, report))
                    if len(delete) >= batch and not dry_run:
                        report.deleted += tree.remove(delete)
                        delete = []
            if orphans == "delete" and not dry_run:
                report.deleted += tree.remove(delete)
        queue = _RepairQueue(rw, batch, report)
        for problem in _chain(v.check_files(), v.check_pages(), v.check_root()):
            out.write(problem.line() + "\n")
            report.problems[problem.kind] += 1
            queue.add(problem)
        queue.flush()
        report.stats = v.stats
        if rw is not None and exclusive and (report.queued or report.root):
            report.repair = trio.run(_work_queue, cfg, tree, rw)
    finally:
        ro.close()
        if rw is not None:
            rw.close()
    return report


def _chain(*gens: Iterable[Problem]) -> Iterator[Problem]:
    for g in gens:
        yield from g


def _orphan_paths(problem: Problem, report: VerifyReport) -> list[str]:
    """What deleting an orphan means, for names the tree may touch at all."""
    if problem.kind == "orphan":
        paths = [problem.path]
    elif problem.path.startswith("pypi/"):
        paths = [f"{problem.path}/json"]
    else:
        paths = list(planner.page_paths(problem.project or ""))
    try:
        for p in paths:
            safe_relpath(p)
    except UnsafePath:
        report.undeletable.append(problem.path)  # a name we never write: left for a human
        return []
    return paths


class _RepairQueue:
    """Hands problems to ``State.queue_repair`` a batch at a time, so memory
    stays bounded however many problems there are.  ``state=None``: count only."""

    def __init__(self, state: State | None, batch: int, report: VerifyReport) -> None:
        self.state = state
        self.batch = batch
        self.report = report
        self.paths: list[str] = []
        self.names: list[str] = []

    def add(self, problem: Problem) -> None:
        if problem.kind in FILE_KINDS:
            self.paths.append(problem.path)
            self.report.bad_files += 1
        elif problem.kind in PAGE_KINDS and problem.project:
            if self.names[-1:] != [problem.project]:  # a project's problems come together
                self.names.append(problem.project)
                self.report.bad_pages += 1
        elif problem.kind == "root":
            self.report.root = True
        if len(self.paths) + len(self.names) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.state is not None and (self.paths or self.names or self.report.root):
            self.report.queued += len(self.state.queue_repair(self.paths, self.names, root=self.report.root))
        self.paths, self.names = [], []


async def _work_queue(cfg: Config, tree: Tree, state: State) -> CycleReport:
    """What ``mirror sync`` does, minus the feed: the queued projects are
    fetched, their files verified and their pages republished in order."""
    await trio.to_thread.run_sync(tree.prepare)
    async with open_client(cfg.upstream, workers=cfg.mirror.workers, version=__version__) as client:
        syncer = Syncer(cfg, client=client, state=state, tree=tree, metrics=Metrics())
        return await syncer.sync_once(feed=False)
