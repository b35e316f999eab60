"""The only writer under ``web/``.

Theory of operation
-------------------
Readers (nginx, pip, rsync secondaries) may look at ``web/`` at any instant,
so every change is a ``rename(2)`` of a complete, fsynced file:

* a file is written to ``state/tmp/`` (same filesystem, never inside
  ``web/`` so rsync never copies a half-written temp), fsynced, then renamed
  to its final path and the directory is fsynced;
* pages are written the same way, a project's three pages in one go;
* the caller orders the calls: files, then project pages, then the root
  index, then the trace and serial.  This module gives each step atomicity;
  ordering is the sync engine's job.

Paths handed to this module are relative to ``web/`` and are validated again
here (defence in depth: upstream data is untrusted).  Directories are created
one component at a time and an existing component that is a symlink is
refused, so no write ever follows a link out of the tree.  Directories found
safe are remembered until ``forget_dirs`` (the sync engine calls it at the
start of every cycle), which saves a first sync tens of thousands of
``mkdir``/``lstat`` calls; a rename that fails because such a directory went
away forgets them and walks the path again.

Every method is synchronous and blocking: callers run one method per
``trio.to_thread.run_sync`` hop.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path

from mirror.errors import DiskError, UnsafePath
from mirror.layout import Layout, PullLayout, new_temp_name
from mirror.model import safe_relpath

log = logging.getLogger(__name__)

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Tree:
    """The filesystem tree rooted at ``web`` (a ``Layout``'s ``web/``, or a
    secondary's DEST), with its temp files in ``tmp`` on the same filesystem."""

    def __init__(self, web: Path, tmp: Path) -> None:
        self.web = web
        self.tmp = tmp
        # web-relative directories checked to be plain directories ("" = web).
        # Shared by worker threads: set.add and membership are atomic.
        self._safe_dirs: set[str] = set()
        # Directories holding an entry made by mkdir whose fsync was left to
        # some caller's ``sync_dirs`` that may not have run yet.  Another
        # project committing below such a directory must sync it too, or its
        # page could be published before the path to its file is durable.
        self._unsynced: set[Path] = set()

    @classmethod
    def at(cls, layout: Layout | PullLayout) -> Tree:
        return cls(layout.web, layout.tmp)

    def forget_dirs(self) -> None:
        """Check every directory again from now on (a cycle's start: an
        operator may have changed the tree between cycles)."""
        self._safe_dirs = set()

    def prepare(self) -> int:
        """Create the layout and remove temp files a killed run left behind."""
        try:
            self.web.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir(parents=True, exist_ok=True)
            removed = 0
            for entry in os.scandir(self.tmp):
                if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                    os.unlink(entry.path)
                    removed += 1
            if os.stat(self.web).st_dev != os.stat(self.tmp).st_dev:
                raise DiskError(f"{self.web} and {self.tmp} are on different filesystems; rename would not be atomic")
        except OSError as e:
            raise DiskError.of(e, f"preparing {self.web}") from None
        return removed

    # -- temp files ---------------------------------------------------------
    def new_temp(self, suffix: str = "") -> Path:
        return self.tmp / new_temp_name(suffix)

    def discard(self, tmp: Path) -> None:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError as e:  # pragma: no cover - best effort
            log.warning("could not remove temp file %s: %s", tmp, e)

    # -- paths ------------------------------------------------------------
    def path(self, rel: str) -> Path:
        return self.web / safe_relpath(rel)

    def _ensure_parent(self, rel: str, dirs: set[Path] | None = None) -> Path:
        """Create the parents of ``rel`` under web/, refusing symlinks.

        A new directory's entry is made durable by fsyncing its parent, now,
        or later by ``sync_dirs`` when the caller collects them in ``dirs``.
        Parents that another caller created and has not synced yet are
        synced (or collected) too: that caller's project may publish later
        than this one."""
        safe = safe_relpath(rel)
        parent, _, _ = safe.rpartition("/")
        dest = self.web / safe
        if parent not in self._safe_dirs:
            cur = self.web
            for part in safe.split("/")[:-1]:
                cur = cur / part
                try:
                    os.mkdir(cur)
                    if dirs is None:
                        _fsync_dir(cur.parent)
                    else:
                        self._unsynced.add(cur.parent)
                except FileExistsError:
                    if cur.is_symlink() or not cur.is_dir():
                        raise UnsafePath(f"{cur} exists and is not a plain directory") from None
            self._safe_dirs.add(parent)
        if self._unsynced:
            pending = [d for d in dest.parents if d in self._unsynced]
            if dirs is not None:
                dirs.update(pending)
            else:
                self.sync_dirs(pending)
        return dest

    def _replace(self, tmp: Path, rel: str, dirs: set[Path] | None) -> Path:
        """``os.replace`` into ``rel``, creating its parents."""
        dest = self._ensure_parent(rel, dirs)
        try:
            os.replace(tmp, dest)
        except FileNotFoundError:
            if not os.path.exists(tmp):
                raise
            # A remembered directory is gone (pruned, or removed by hand).
            self.forget_dirs()
            dest = self._ensure_parent(rel, dirs)
            os.replace(tmp, dest)
        return dest

    def _existing_parent(self, rel: str) -> Path | None:
        """The directory holding ``rel`` if it exists and every component
        under web/ is a plain directory; None if it does not exist.

        Deleting (or adopting) through a symlinked directory would act on
        something outside the tree, so a symlink raises UnsafePath."""
        parts = safe_relpath(rel).split("/")
        cur = self.web
        for part in parts[:-1]:
            cur = cur / part
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                return None
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafePath(f"{cur} exists and is not a plain directory")
        return cur

    # -- commits ------------------------------------------------------------
    def commit_file(self, tmp: Path, rel: str, *, dirs: set[Path] | None = None) -> None:
        """Rename a verified, fsynced temp file to its final place.

        With ``dirs``, the directories whose entries changed are collected
        there instead of fsynced one by one; the caller passes them to
        ``sync_dirs`` before publishing any page that links the file.  Issued
        back to back, the first of those fsyncs commits the filesystem journal
        and the rest find nothing left to do, where one fsync per file would
        each wait for a commit of its own."""
        try:
            dest = self._replace(tmp, rel, dirs)
            if dirs is None:
                _fsync_dir(dest.parent)
            else:
                dirs.add(dest.parent)
        except UnsafePath:
            self.discard(tmp)
            raise
        except OSError as e:
            self.discard(tmp)
            raise DiskError.of(e, f"publishing {rel}") from None

    def commit_received(self, src: Path, rel: str, *, dirs: set[Path]) -> None:
        """Publish a complete file that another program wrote (rsync, for
        ``mirror pull``): fsync it, then rename it into place like
        ``commit_file``.  ``src`` must be on the tree's filesystem."""
        try:
            fd = os.open(src, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise DiskError.of(e, f"publishing {rel}") from None
        self.commit_file(src, rel, dirs=dirs)

    def write_files(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Atomically replace each ``rel`` with its bytes (temp, fsync, rename).

        All temps are written and fsynced before the first rename, so a full
        disk leaves the old pages untouched.  An item whose bytes are the very
        object of an earlier item's (a project's ``index.html`` and
        ``index.v1_html``) becomes a hard link to that temp: one write and
        one fsync fewer per page.
        """
        temps: list[tuple[Path, str]] = []
        written: dict[int, Path] = {}
        try:
            for rel, data in items:
                tmp = self.new_temp()
                temps.append((tmp, rel))  # before writing: a full disk fails mid-write
                same = written.get(id(data))
                if same is not None:
                    try:
                        os.link(same, tmp)
                        continue
                    except OSError:
                        pass  # no hard links here (or too many): write a copy
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                written[id(data)] = tmp
            dirs: dict[Path, None] = {}
            for tmp, rel in temps:
                dest = self._replace(tmp, rel, None)
                dirs[dest.parent] = None
            for d in dirs:
                _fsync_dir(d)
        except UnsafePath:
            for tmp, _ in temps:
                self.discard(tmp)
            raise
        except OSError as e:
            for tmp, _ in temps:
                self.discard(tmp)
            raise DiskError.of(e, f"writing {items[0][0] if items else 'pages'}") from None

    def sync_dirs(self, dirs: Iterable[Path]) -> None:
        """fsync directories collected by ``commit_file(..., dirs=...)``."""
        try:
            for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                _fsync_dir(d)
                self._unsynced.discard(d)
        except OSError as e:
            raise DiskError.of(e, "syncing directories") from None

    def existing(self, rels: Iterable[str]) -> set[str]:
        """Which of ``rels`` already exist as plain files (one stat each).

        Lets a sync look for files a killed run left in place with one
        thread hop per project instead of one per file."""
        found = set()
        for rel in rels:
            try:
                if stat.S_ISREG(os.lstat(self.web / rel).st_mode):
                    found.add(rel)
            except OSError:
                pass
        return found

    def read(self, rel: str) -> bytes | None:
        try:
            return self.path(rel).read_bytes()
        except FileNotFoundError:
            return None

    def adopt(self, rel: str, size: int | None, sha256: str) -> int | None:
        """If ``rel`` already holds the right bytes (a run killed after the
        rename but before the state commit), return its size."""
        p = self.path(rel)
        try:
            if self._existing_parent(rel) is None:
                return None
            st = os.lstat(p)
            if not stat.S_ISREG(st.st_mode) or (size is not None and st.st_size != size):
                return None
            with open(p, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except (OSError, UnsafePath):
            return None
        return st.st_size if digest == sha256 else None

    def remove(self, rels: Iterable[str], *, prune: bool = True) -> list[str]:
        """Delete files and then any directories they leave empty; return
        the paths that were deleted (a symlinked directory on the way is
        refused and logged, never followed)."""
        removed: list[str] = []
        parents: set[Path] = set()
        for rel in rels:
            p = self.path(rel)
            try:
                if self._existing_parent(rel) is None:
                    continue
                os.unlink(p)
                removed.append(rel)
            except UnsafePath as e:
                log.error("not removing %s: %s", rel, e)
                continue
            except FileNotFoundError:
                pass
            except OSError as e:
                raise DiskError.of(e, f"removing {rel}") from None
            parents.add(p.parent)
        if prune and parents:
            self.forget_dirs()
            for d in sorted(parents, key=lambda x: len(x.parts), reverse=True):
                self._prune(d)
        return removed

    def _prune(self, d: Path) -> None:
        while d != self.web and self.web in d.parents:
            try:
                os.rmdir(d)
            except OSError:
                return
            d = d.parent
