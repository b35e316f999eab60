"""The checks of ``mirror verify``: the published tree against the state,
in bounded memory.  ``mirror.ops.verify`` runs them and applies repairs.

Theory of operation
-------------------
The state knows every file the mirror verified (``files``) and every project
it published (``projects``); ``web/`` is what clients see.  The checks
compare them and yield each disagreement as a ``Problem``, as soon as it is
found:

* *files*: every row, streamed from SQLite in keyset-paged batches, must be a
  regular file of the recorded size (with ``--hash``, of the recorded
  sha256), reached through plain directories only;
* *pages*: every published project has its three pages, the two HTML pages
  are the same bytes, and every link of the JSON page (the HTML page must
  list the same files with the same hashes) is a file the state verified
  with the hash the page promises (pages are read by ``pagelinks``, the same
  parser ``mirror pull`` uses);
* *root*: the root index is byte for byte what the state renders (at the
  serial the root was written with), compared while both stream;
* *orphans* (``--orphans``): an iterative ``os.scandir`` walk of
  ``packages/``, ``simple/`` and ``pypi/`` reports what no row accounts for,
  and any symlink.

Memory is bounded by one batch of rows, one project page and the scandir
stack.  With ``live``, a mirror may be writing at the same time: each
problem is looked at a second time before it is reported, and files and
page directories younger than an hour are not called orphans.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import stat
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from mirror import layout
from mirror.publish import pagelinks, render
from mirror.publish.state import State
from mirror.publish.tree import FileTree

log = logging.getLogger(__name__)

# Problems that a fresh download fixes, and problems that a rewritten page fixes.
FILE_KINDS = frozenset({"missing", "size", "hash", "not_a_file"})
PAGE_KINDS = frozenset({"page_missing", "page_mismatch", "page_unreadable", "link_broken", "link_hash"})
# In live mode a file this recent may be one the mirror is committing right now
# (it records a project's files together, once the project's downloads end).
_RECENT = 3600.0
_ROOT_SERIAL = re.compile(rb'^\{"meta":\{"api-version":"[0-9.]+","_last-serial":(\d+)\}')


@dataclass(frozen=True, slots=True)
class Problem:
    kind: str
    path: str  # relative to web/
    detail: str = ""
    project: str | None = None

    def line(self) -> str:
        return f"{self.kind}\t{self.path}\t{self.detail}".rstrip("\t")


def _dists(links: list[pagelinks.Link]) -> set[tuple[str | None, str | None]]:
    """The distributions a page lists, as (path, promised sha256)."""
    return {(link.rel, link.sha256) for link in links if link.kind == "dist"}


class Verifier:
    """The checks; each is a generator of problems.  ``live`` means a mirror
    may be writing at the same time."""

    def __init__(self, tree: FileTree, state: State, *, hash: bool = False, live: bool = True, batch: int = 1000) -> None:
        self._setup(state, hash=hash, live=live, batch=batch)
        self.tree = tree
        self.web = tree.web
        # Plain strings on the hot paths: pathlib parses (and interns) every
        # component of every path, which costs time and memory per file.
        self.root = str(tree.web)
        self._dirs: dict[str, bool] = {}

    def _setup(self, state: State, *, hash: bool, live: bool, batch: int) -> None:
        """What every verifier has, whatever holds the tree."""
        self.state = state
        self.hash = hash
        self.live = live
        self.batch = batch
        self.stats: Counter[str] = Counter()

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
                with open(p, "rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
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

    def _check_project(self, name: str) -> list[Problem]:
        html_rel, v1h_rel, json_rel = layout.project_pages(name)
        blobs = {rel: self._read(rel) for rel in (html_rel, v1h_rel, json_rel)}
        problems = [Problem("page_missing", rel, project=name) for rel, b in blobs.items() if b is None]
        html, v1h, raw = blobs[html_rel], blobs[v1h_rel], blobs[json_rel]
        if html is not None and v1h is not None and html != v1h:
            problems.append(Problem("page_mismatch", v1h_rel, "differs from index.html", project=name))
        if raw is None:
            return problems
        try:
            json_links = pagelinks.links(json_rel, raw)
        except ValueError as e:
            return [*problems, Problem("page_unreadable", json_rel, str(e)[:200], project=name)]
        promised: dict[str, str | None] = {}  # rel -> the sha256 the page promises (None: any)
        for link in json_links:
            if link.rel is None:
                what = "" if link.kind == "dist" else f"{link.kind} "
                problems.append(Problem("link_broken", json_rel, f"{what}{link.href!r:.200} leaves the tree",
                                        project=name))
            else:
                promised[link.rel] = link.sha256
        known = self.state.known_files(promised)
        for rel, sha in promised.items():
            row = known.get(rel)
            if row is None:
                problems.append(Problem("link_broken", json_rel, f"links {rel}, which the state does not hold",
                                        project=name))
            elif sha is not None and row[1] != sha:
                problems.append(Problem("link_hash", json_rel, f"promises sha256 {sha} for {rel}, the state holds {row[1]}",
                                        project=name))
        if html is not None and _dists(pagelinks.links(html_rel, html)) != _dists(json_links):
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
        heads = [self._read_head(rel) for rel in layout.ROOT_PAGES]
        missing = [rel for rel, head in zip(layout.ROOT_PAGES, heads) if head is None]
        for rel in missing:
            yield Problem("root", rel, "missing")
        if missing:
            return
        if dirty:
            yield Problem("root", layout.ROOT_JSON, "out of date: a run stopped before rewriting it")
            return
        m = _ROOT_SERIAL.match(heads[2] or b"")
        if m is None:
            yield Problem("root", layout.ROOT_JSON, "unreadable: no meta with _last-serial at its start")
            return
        streams = [self._open(rel) for rel in layout.ROOT_PAGES]
        if any(f is None for f in streams):
            for f in streams:
                if f is not None:
                    f.close()
            yield Problem("root", layout.ROOT_JSON, "went away while being read")
            return
        with contextlib.ExitStack() as stack:
            html, v1h, js = (stack.enter_context(contextlib.closing(f)) for f in streams if f is not None)
            same = [True, True, True]
            for html_chunk, json_chunk in render.iter_root(self.state.root_entries(), serial=int(m.group(1))):
                for i, (f, chunk) in enumerate(((html, html_chunk), (v1h, html_chunk), (js, json_chunk))):
                    if same[i] and f.read(len(chunk)) != chunk:
                        same[i] = False
            for i, f in enumerate((html, v1h, js)):
                if same[i] and f.read(1):
                    same[i] = False
        for rel, ok in zip(layout.ROOT_PAGES, same):
            if not ok:
                yield Problem("root", rel, "does not list exactly the published projects")

    def _open(self, rel: str) -> IO[bytes] | None:
        """A plain file of the tree, open for reading, or None."""
        path = os.path.join(self.root, rel)
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return None
            return open(path, "rb")
        except OSError:
            return None

    def _read_head(self, rel: str) -> bytes | None:
        f = self._open(rel)
        if f is None:
            return None
        with f:
            try:
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
        stack = [os.path.join(self.root, layout.PACKAGES.rstrip("/"))]
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
        for top in layout.PAGE_TOPS:
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
