"""How the state database is opened: the one place that knows the pragmas.

* ``open_readwrite``: the mirror's own connection, in WAL mode, with
  ``synchronous=NORMAL`` (a process crash loses nothing; a power cut may lose
  the last commits, which only makes the next run redo work: files found on
  disk are adopted after a hash check) and a busy timeout, so a second
  writer (``mirror verify --repair`` next to a daemon) waits instead of
  failing.
* ``open_readonly``: for everything that must answer next to a running
  mirror (``mirror status``, ``mirror verify``'s checks, the root index
  writer's own thread).  In WAL mode a reader sees the last committed state
  and never blocks the writer.

Both return a connection on which ``with db:`` is one transaction.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import TracebackType
from typing import Literal

BUSY_TIMEOUT_MS = 10_000


class Connection(sqlite3.Connection):
    """A connection on which ``with db:`` is one transaction.

    The connection runs in autocommit mode (``isolation_level=None``), where
    sqlite3's own context manager commits but never begins: each statement in
    it was its own transaction, and a kill -9 between two of them left half an
    update (a file counted in ``totals`` but absent from ``files``, a project
    recorded without its refs).  BEGIN IMMEDIATE takes the write lock up front,
    so a second writer waits on busy_timeout instead of failing halfway.
    Nested blocks join the outer one.
    """

    depth = 0

    def __enter__(self) -> Connection:
        if self.depth == 0:
            self.execute("BEGIN IMMEDIATE")
        self.depth += 1
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None,
    ) -> Literal[False]:
        self.depth -= 1
        if self.depth == 0 and self.in_transaction:
            if et is None:
                try:
                    self.execute("COMMIT")
                except BaseException:
                    if self.in_transaction:  # e.g. the disk filled at commit
                        self.execute("ROLLBACK")
                    raise
            else:
                self.execute("ROLLBACK")
        return False


def open_readwrite(path: Path) -> Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=True, factory=Connection)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return db


def open_readonly(path: Path, *, check_same_thread: bool = True) -> Connection:
    """A connection that cannot write.  Each query is its own short read
    transaction, so a long reader never holds back the writer's checkpoints."""
    db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None,
                         check_same_thread=check_same_thread, factory=Connection)
    db.execute("PRAGMA query_only=1")
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return db
