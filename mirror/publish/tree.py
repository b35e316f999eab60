"""The only writer under ``web/``: the filesystem implementation of the tree.

Theory of operation
-------------------
Readers (nginx, pip, rsync secondaries) may look at ``web/`` at any instant,
and the machine may lose power at any instant.  So every change is a
``rename(2)`` of a complete file, and nothing links a file before that
file is durable.  Durability comes in two forms:

* **Batched** (a sync's files and project pages).  ``place`` renames a
  verified temp into place without any fsync; ``write_temps`` writes page
  bytes to temps without fsync; ``barrier`` then makes *everything written
  so far* durable at once with one ``syncfs(2)`` of the tree's filesystem:
  file data, temp data, new names and new directories, in every directory
  (the state database under ``state/`` is on the same filesystem and rides
  along).  The protocol for one batch of projects, run by
  ``mirror.sync.publisher``:

  1. the files are downloaded, checked and ``place``-d (no page links them);
  2. the batch's page bytes go to temps (``write_temps``);
  3. ``barrier``: the files, their directory entries and the page temps are
     durable;
  4. the page temps are ``place``-d over the old pages;
  5. ``barrier``: the new pages are durable;
  6. only then are the files and the projects recorded in the state, so a
     row that says "published" never outlives, in a power cut, the bytes or
     the page it describes.

  A page is therefore written only after every file it links, and that
  file's directory entry, is durable, even on filesystems that do not order
  metadata across directories.  ``syncfs`` is one call per barrier however
  many files the batch holds; where it is missing (not Linux) ``os.sync``
  does the same for every filesystem.
* **One at a time** (the root index, ``last-modified``, change lists, the
  trace: a few per cycle).  ``write_files`` and ``commit_file`` fsync each
  temp, rename it, and fsync the directories whose entries changed
  (including those of directories they create).

Temps live in ``state/tmp/`` (same filesystem, never inside ``web/``, so
rsync never copies a half-written one).  The caller orders the calls:
files, then project pages, then the root index, then the trace and serial.

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

import ctypes
import ctypes.util
import functools
import hashlib
import logging
import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mirror.errors import DiskError, UnsafePath
from mirror.layout import Layout, PullLayout, new_temp_name
from mirror.model import safe_relpath

log = logging.getLogger(__name__)


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _syncfs() -> Callable[[int], int] | None:
    """libc's ``syncfs(2)`` (Linux), or None."""
    name = ctypes.util.find_library("c")
    try:
        fn = ctypes.CDLL(name, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def sync_filesystem(path: Path) -> None:
    """Make every write on ``path``'s filesystem durable (data and metadata)."""
    fn = _syncfs()
    if fn is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


class Tree(ABC):
    """The published tree's contract, whatever holds it.

    Paths are web-relative (``simple/<name>/index.html``, ``packages/..``)
    and untrusted: every implementation validates them again.  Temp files
    are always local, in ``tmp`` (``state/tmp``): downloads and page bytes
    are written there, and a tree *places* a complete, verified temp at its
    path.  The guarantees every implementation gives:

    * ``place`` and ``place_all`` publish each object whole or not at all
      (a rename, a PUT); it may only be linked after the next ``barrier``
      returns, which makes everything placed so far durable;
    * ``commit_file`` and ``write_files`` are durable when they return;
    * ``remove`` deletes (retirement calls it after the grace period only);
    * ``existing`` and ``adopt`` look for objects a killed run left in
      place, so that a resumed run does not fetch them again.

    ``FileTree`` (this module) is the filesystem; ``mirror.publish.s3tree``
    is object storage.  Every method blocks: callers run each one in a
    worker thread."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.barriers = 0  # how many barrier() calls completed (for tests and stats)

    # -- local temps (shared by every implementation) -----------------------
    def new_temp(self, suffix: str = "") -> Path:
        return self.tmp / new_temp_name(suffix)

    def discard(self, tmp: Path) -> None:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        except OSError as e:  # pragma: no cover - best effort
            log.warning("could not remove temp file %s: %s", tmp, e)

    def discard_all(self, temps: Iterable[tuple[Path, str]]) -> None:
        for tmp, _ in temps:
            self.discard(tmp)

    def sweep_temps(self) -> int:
        """Create ``tmp`` and remove the temp files a killed run left there."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        removed = 0
        for entry in os.scandir(self.tmp):
            if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                os.unlink(entry.path)
                removed += 1
        return removed

    @contextmanager
    def _or_discard(self, temps: Sequence[tuple[Path, str]], what: str) -> Iterator[None]:
        """On any failure the temps go (those already placed are gone
        anyway), and an OS error is a ``DiskError`` saying ``what`` failed."""
        try:
            yield
        except UnsafePath:
            self.discard_all(temps)
            raise
        except OSError as e:
            self.discard_all(temps)
            raise DiskError.of(e, what) from None

    def write_temps(self, items: Sequence[tuple[str, bytes]]) -> list[tuple[Path, str]]:
        """Each ``(rel, bytes)`` into a temp of its own (no fsync: a barrier
        follows); ``(temp, rel)`` pairs for ``place_all``.  An item whose
        bytes are the very object of an earlier item's (a project's
        ``index.html`` and ``index.v1_html``) becomes a hard link to that
        temp: one write fewer per page."""
        temps: list[tuple[Path, str]] = []
        written: dict[int, Path] = {}
        with self._or_discard(temps, f"writing {items[0][0] if items else 'pages'}"):
            for rel, data in items:
                safe_relpath(rel)
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
                written[id(data)] = tmp
        return temps

    def place_all(self, temps: Sequence[tuple[Path, str]]) -> None:
        """``place`` every temp of ``write_temps``, in order; on an error the
        rest are discarded (the ones placed stay: each is complete)."""
        for i, (tmp, rel) in enumerate(temps):
            try:
                self.place(tmp, rel)
            except BaseException:
                self.discard_all(temps[i + 1:])
                raise

    def write_files(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Durably replace each ``rel`` with its bytes, for the few files a
        cycle writes one at a time (every temp is written before the first
        one is committed, so a full disk leaves the old files untouched)."""
        self.commit_files(self.write_temps(items))

    # -- what each implementation provides ---------------------------------------
    @abstractmethod
    def prepare(self) -> int:
        """Check the tree can be written, create what it needs, and clean up
        after a killed run (temps, unfinished uploads); the number of temp
        files removed."""

    def close(self) -> None:
        """Release what the tree holds (threads, connections); nothing to do on disk."""

    def check(self) -> None:
        """Raise a one-line ``ConfigError`` if the tree cannot be used at all
        (a bucket that is missing or refuses the credentials); cheap, and
        changes nothing, so ``mirror verify`` calls it beside a running mirror."""

    def forget_dirs(self) -> None:
        """Drop any cached knowledge of the tree (a cycle's start: an
        operator may have changed it between cycles)."""

    @abstractmethod
    def place(self, tmp: Path, rel: str, sha256: str | None = None) -> None:
        """Publish a complete, verified temp at ``rel`` (the temp is gone
        afterwards); durable only once a later ``barrier`` returns.
        ``sha256``: the temp's digest when the caller knows it."""

    @abstractmethod
    def barrier(self) -> None:
        """Everything placed so far is durable when this returns."""

    @abstractmethod
    def commit_files(self, temps: Sequence[tuple[Path, str]]) -> None:
        """Publish complete temps, in order, durably before returning; on an
        error the temps not committed are discarded."""

    def commit_file(self, tmp: Path, rel: str) -> None:
        self.commit_files([(tmp, rel)])

    @abstractmethod
    def existing(self, rels: Iterable[str]) -> set[str]:
        """Which of ``rels`` are already in the tree."""

    @abstractmethod
    def adopt(self, rel: str, size: int | None, sha256: str) -> int | None:
        """If ``rel`` already holds the right bytes, its size."""

    @abstractmethod
    def read(self, rel: str) -> bytes | None:
        """The object at ``rel``, or None if there is none."""

    @abstractmethod
    def remove(self, rels: Iterable[str], *, prune: bool = True) -> list[str]:
        """Delete these paths; the ones that were deleted."""

    @property
    def description(self) -> str:
        """Where the tree is, for logs and ``mirror status``."""
        return str(self.tmp)


class FileTree(Tree):
    """The filesystem tree rooted at ``web`` (a ``Layout``'s ``web/``, or a
    secondary's DEST), with its temp files in ``tmp`` on the same filesystem."""

    def __init__(self, web: Path, tmp: Path) -> None:
        super().__init__(tmp)
        self.web = web
        self._root = str(web)
        # web-relative directories checked to be plain directories ("" = web).
        # Shared by worker threads: set.add and membership are atomic.
        self._safe_dirs: set[str] = set()

    @classmethod
    def at(cls, layout: Layout | PullLayout) -> FileTree:
        return cls(layout.web, layout.tmp)

    @property
    def description(self) -> str:
        return str(self.web)

    def forget_dirs(self) -> None:
        self._safe_dirs = set()

    def prepare(self) -> int:
        """Create the layout and remove temp files a killed run left behind."""
        try:
            self.web.mkdir(parents=True, exist_ok=True)
            removed = self.sweep_temps()
            if os.stat(self.web).st_dev != os.stat(self.tmp).st_dev:
                raise DiskError(f"{self.web} and {self.tmp} are on different filesystems; rename would not be atomic")
        except OSError as e:
            raise DiskError.of(e, f"preparing {self.web}") from None
        return removed

    # -- paths ------------------------------------------------------------
    def path(self, rel: str) -> Path:
        return self.web / safe_relpath(rel)

    def _ensure_parent(self, rel: str, *, durable: bool) -> str:
        """Create the parents of ``rel`` under web/, refusing symlinks; the
        destination path (a plain string: this runs once per file, and
        pathlib parses every component again on every join).

        ``durable``: each new directory's entry is fsynced in its parent now;
        otherwise the next ``barrier`` covers it."""
        safe = safe_relpath(rel)
        parent, _, _ = safe.rpartition("/")
        dest = f"{self._root}/{safe}"
        if parent and parent not in self._safe_dirs:
            parts = parent.split("/")
            # Start below the deepest directory already known to be safe:
            # files live in directories of their own (packages/aa/bb/<hash>/),
            # so usually one mkdir is all a new file costs.
            start = len(parts) - 1
            while start > 0 and "/".join(parts[:start]) not in self._safe_dirs:
                start -= 1
            for i in range(start, len(parts)):
                sub = "/".join(parts[:i + 1])
                cur = f"{self._root}/{sub}"
                try:
                    os.mkdir(cur)
                    if durable:
                        _fsync_dir(os.path.dirname(cur))
                except FileExistsError:
                    st = os.lstat(cur)
                    if not stat.S_ISDIR(st.st_mode):
                        raise UnsafePath(f"{cur} exists and is not a plain directory") from None
                self._safe_dirs.add(sub)
        return dest

    def _replace(self, tmp: Path, rel: str, *, durable: bool) -> str:
        """``os.replace`` into ``rel``, creating its parents."""
        dest = self._ensure_parent(rel, durable=durable)
        try:
            os.replace(tmp, dest)
        except FileNotFoundError:
            if not os.path.exists(tmp):
                raise
            # A remembered directory is gone (pruned, or removed by hand).
            self.forget_dirs()
            dest = self._ensure_parent(rel, durable=durable)
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

    # -- batched durability ------------------------------------------------------
    def place(self, tmp: Path, rel: str, sha256: str | None = None) -> None:
        """Rename a complete, verified temp into ``rel``; durable only once a
        later ``barrier`` returns (nothing may link it before that)."""
        with self._or_discard([(tmp, rel)], f"publishing {rel}"):
            self._replace(tmp, rel, durable=False)

    def barrier(self) -> None:
        """Everything written, placed or created in this tree so far is durable
        when this returns (``syncfs(2)`` of the tree's filesystem)."""
        try:
            sync_filesystem(self.web)
        except OSError as e:
            raise DiskError.of(e, "making the tree durable") from None
        self.barriers += 1

    # -- one at a time ------------------------------------------------------------
    def commit_files(self, temps: Sequence[tuple[Path, str]]) -> None:
        """Fsync every temp (a hard link's inode once), then rename each into
        place and fsync the directories whose entries changed."""
        with self._or_discard(temps, f"writing {temps[0][1] if temps else 'pages'}"):
            fsynced: set[int] = set()
            for tmp, _ in temps:
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    st = os.fstat(fd)
                    if st.st_ino not in fsynced:
                        os.fsync(fd)
                        fsynced.add(st.st_ino)
                finally:
                    os.close(fd)
            dirs: dict[str, None] = {}
            for tmp, rel in temps:
                dirs[os.path.dirname(self._replace(tmp, rel, durable=True))] = None
            for d in dirs:
                _fsync_dir(d)

    def existing(self, rels: Iterable[str]) -> set[str]:
        """Which of ``rels`` already exist as plain files (one stat each).

        Lets a sync look for files a killed run left in place with one
        thread hop per project instead of one per file."""
        found = set()
        for rel in rels:
            try:
                if stat.S_ISREG(os.lstat(f"{self._root}/{rel}").st_mode):
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
