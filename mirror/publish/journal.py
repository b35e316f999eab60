"""The change journal: paths written or deleted under ``web/``, sealed into
numbered change lists (``mirror.downstream.changes`` gives them their text).

Tables (created by ``mirror.publish.state``)
  changes  (gen, path, op): gen 0 holds what the current cycle noted; a
           sealed list holds generation N until it is written out
  lists    the change lists: generation, serial range, time, written yet

Notes are taken inside the same transaction as the state change they
describe (a file's row, a page about to be written), so a crash never loses
a change that reached the tree; at worst it lists a page that did not change.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

from mirror.publish.db import Connection


def get_meta(db: Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return None if row is None else str(row[0])


def put_meta(db: Connection, values: Mapping[str, str | int | float]) -> None:
    """Inside the caller's transaction: set ``meta`` keys."""
    db.executemany(
        "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
        [(k, str(v)) for k, v in values.items()],
    )


class Journal:
    def __init__(self, db: Connection) -> None:
        self.db = db

    def note(self, items: Iterable[tuple[str, str]]) -> None:
        """Inside the caller's transaction: paths written or deleted, for the
        next list.  The last operation on a path within a cycle counts."""
        self.db.executemany(
            "INSERT INTO changes(gen, path, op) VALUES(0, ?, ?) ON CONFLICT(gen, path) DO UPDATE SET op=excluded.op",
            items,
        )

    def note_now(self, items: Iterable[tuple[str, str]]) -> None:
        """Record pages about to be written or deleted, in a transaction of their own."""
        with self.db:
            self.note(items)

    def epoch(self) -> str:
        """Random id of this state: generations restart when the state is recreated."""
        value = get_meta(self.db, "epoch")
        if value is None:
            value = secrets.token_hex(8)
            with self.db:
                put_meta(self.db, {"epoch": value})
        return value

    def generation(self) -> int:
        return int(get_meta(self.db, "generation") or 0)

    def seal(self, *, serial: int, now: float) -> int | None:
        """Give the pending changes the next generation number; None if there are none."""
        with self.db:
            if self.db.execute("SELECT 1 FROM changes WHERE gen=0 LIMIT 1").fetchone() is None:
                return None
            gen = self.generation() + 1
            serial_from = int(get_meta(self.db, "generation_serial") or 0)
            self.db.execute("UPDATE changes SET gen=? WHERE gen=0", (gen,))
            self.db.execute(
                "INSERT OR REPLACE INTO lists(gen, serial_from, serial_to, created) VALUES(?, ?, ?, ?)",
                (gen, serial_from, serial, now),
            )
            put_meta(self.db, {"generation": gen, "generation_serial": serial})
        return gen

    def unwritten(self) -> list[tuple[int, int, int, float]]:
        """(generation, serial from, serial to, time) of sealed lists not yet on disk."""
        return [
            (int(g), int(a), int(b), float(t))
            for g, a, b, t in self.db.execute(
                "SELECT gen, serial_from, serial_to, created FROM lists WHERE written=0 ORDER BY gen"
            )
        ]

    def count(self, gen: int) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM changes WHERE gen=?", (gen,)).fetchone()[0])

    def sealed(self, gen: int, *, after: str = "", limit: int = 10_000) -> list[tuple[str, str]]:
        """(op, path) of one sealed generation, in path order, one page at a time."""
        return [(str(op), str(p)) for p, op in self.db.execute(
            "SELECT path, op FROM changes WHERE gen=? AND path > ? ORDER BY path LIMIT ?", (gen, after, limit)
        )]

    def written(self, gen: int) -> None:
        with self.db:
            self.db.execute("UPDATE lists SET written=1 WHERE gen=?", (gen,))
            self.db.execute("DELETE FROM changes WHERE gen=?", (gen,))

    def lists(self) -> list[tuple[int, int, int, float]]:
        return [
            (int(g), int(a), int(b), float(t))
            for g, a, b, t in self.db.execute(
                "SELECT gen, serial_from, serial_to, created FROM lists WHERE written=1 ORDER BY gen"
            )
        ]

    def drop(self, gens: Iterable[int]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM lists WHERE gen=?", [(g,) for g in gens])
