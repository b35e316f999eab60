"""The checks of ``mirror verify`` for a tree in a bucket (``S3Tree``).

The same checks as ``mirror.ops.checks.Verifier``, whose page and root
checks this class inherits; what differs is how an object is looked at:

* *files*: the state's rows (path order) are merged with a streamed
  ``ListObjectsV2`` of ``packages/`` (key order: both are byte order of the
  UTF-8 path, and every key has the same prefix), so a missing object or a
  wrong size costs no request of its own.  Each object that is there is
  then compared with the sha256 it was stored with (a HEAD, ``concurrency``
  at a time): no byte is downloaded.  ``--hash`` downloads and hashes
  instead.
* *orphans*: the same two listings, against the ``files`` and ``projects``
  rows.  A bucket has no symlinks and no directories, so those checks go.

Memory is bounded by one batch of rows and one page of the listing.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from typing import IO

from mirror import layout
from mirror.ops.checks import _RECENT, Problem, Verifier
from mirror.publish.s3tree import S3Tree
from mirror.publish.state import State


class BucketVerifier(Verifier):
    def __init__(self, tree: S3Tree, state: State, *, hash: bool = False, live: bool = True,
                 batch: int = 1000) -> None:
        self._setup(state, hash=hash, live=live, batch=batch)
        self.bucket = tree

    # -- files ------------------------------------------------------------------
    def check_files(self) -> Iterator[Problem]:
        listing = self.bucket.listing(layout.PACKAGES.rstrip("/"))
        obj = next(listing, None)
        present: list[tuple[str, int, str]] = []
        for path, size, sha in self.state.iter_files(self.batch):
            self.stats["files"] += 1
            while obj is not None and obj[0] < path:
                obj = next(listing, None)
            if obj is None or obj[0] != path:
                problem: Problem | None = Problem("missing", path)
            elif obj[1] != size:
                problem = Problem("size", path, f"{obj[1]} bytes, the state says {size}")
            else:
                problem = None
                present.append((path, size, sha))
            if problem is not None and self._still(problem):
                yield problem
            if len(present) >= self.batch:
                yield from self._contents(present)
                present = []
        yield from self._contents(present)

    def _contents(self, rows: list[tuple[str, int, str]]) -> Iterator[Problem]:
        """The bytes (``--hash``) or the stored checksums of objects that are there."""
        if self.hash:
            for path, size, sha in rows:
                problem = self._hash(path, size, sha)
                if problem is not None and self._still(problem):
                    yield problem
            return
        wanted = {path: sha for path, _, sha in rows}
        for path, head in self.bucket.heads(wanted):
            problem = self._stored(path, head, wanted[path])
            if problem is not None and self._still(problem):
                yield problem

    def _stored(self, path: str, head: dict[str, object] | None, sha: str) -> Problem | None:
        if head is None:
            return Problem("missing", path)
        stored = S3Tree.stored_sha256(head)
        if stored is None:
            return Problem("hash", path, "the object carries no sha256 to compare (try --hash)")
        if stored != sha:
            return Problem("hash", path, f"stored with sha256 {stored}, the state says {sha}")
        return None

    def _hash(self, path: str, size: int, sha: str) -> Problem | None:
        body = self.bucket.open(path)
        if body is None:
            return Problem("missing", path)
        with body:
            digest = hashlib.sha256()
            got = 0
            while chunk := body.read(1 << 20):
                digest.update(chunk)
                got += len(chunk)
        self.stats["bytes_hashed"] += got
        if got != size:
            return Problem("size", path, f"{got} bytes, the state says {size}")
        if digest.hexdigest() != sha:
            return Problem("hash", path, f"sha256 {digest.hexdigest()}, the state says {sha}")
        return None

    def _still(self, problem: Problem) -> bool:
        """Second look (a live mirror may have changed the row or the object)."""
        if not self.live:
            return True
        row = self.state.known_files([problem.path]).get(problem.path)
        if row is None:
            return False
        size, sha = row
        if self.hash:
            return self._hash(problem.path, size, sha) is not None
        head = self.bucket.head(problem.path)
        if head is not None and int(str(head.get("ContentLength", -1))) != size:
            return True
        return self._stored(problem.path, head, sha) is not None

    # -- pages and root: the inherited checks, through these two --------------------
    def _read(self, rel: str) -> bytes | None:
        return self.bucket.read(rel)

    def _open(self, rel: str) -> IO[bytes] | None:
        return self.bucket.open(rel)

    # -- orphans ----------------------------------------------------------------
    def find_orphans(self) -> Iterator[Problem]:
        now = time.time()
        pending: list[tuple[str, int]] = []
        for rel, size, mtime in self.bucket.listing(layout.PACKAGES.rstrip("/")):
            self.stats["walked"] += 1
            if self.live and now - mtime < _RECENT:
                self.stats["too_recent"] += 1
                continue
            pending.append((rel, size))
            if len(pending) >= self.batch:
                yield from self._unknown(pending)
                pending = []
        yield from self._unknown(pending)
        gone = set(self.state.gone())
        for top in layout.PAGE_TOPS:
            names: list[str] = []
            last: str | None = None
            newest = 0.0
            for rel, _, mtime in self.bucket.listing(top):
                self.stats["walked"] += 1
                parts = rel.split("/")
                if len(parts) < 3:
                    continue  # the root pages
                if parts[1] != last:
                    if last is not None:
                        self._page_dir(top, last, newest, now, gone, names)
                    last, newest = parts[1], 0.0
                newest = max(newest, mtime)
                if len(names) >= self.batch:
                    yield from self._unpublished(top, names)
                    names = []
            if last is not None:
                self._page_dir(top, last, newest, now, gone, names)
            yield from self._unpublished(top, names)

    def _page_dir(self, top: str, name: str, newest: float, now: float, gone: set[str], names: list[str]) -> None:
        if self.live and now - newest < _RECENT:
            self.stats["too_recent"] += 1
        elif name not in gone:
            names.append(name)
