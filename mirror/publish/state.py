"""The mirror's memory: one SQLite database in WAL mode under ``state/``.

Tables
  meta      key/value: feed position (``serial``), root ETag, counters
  projects  every published project: display name, serial, page digest,
            and a compressed copy of the upstream snapshot (so a filter change
            can be replayed without asking upstream again)
  files     every file present under ``web/`` that we verified (path, size,
            sha256).  A row exists only after the file was renamed into place.
  refs      which project page references which path
  todo      projects the feed says changed and that are not yet published,
            with the serial the feed promised; deferred ones stay here
  retire    paths no page references any more, with the time that happened
  gone      projects whose pages must be deleted once the root index no
            longer lists them
  upstream  every project the feed has shown us with its last serial, mirrored
            or filtered out, so a filter change knows what upstream has
            without asking it again
  changes,  the change journal (``mirror.publish.journal``)
  lists

Only the trio thread touches the connection.  Every method is one short
transaction; none of them reads a whole table into memory except through
generators that page with ``LIMIT``.  (One class over one schema, a little
over 400 lines: each method is a transaction across several of these
tables, and splitting them apart would split what must commit together.
The change journal, which has tables of its own, is ``journal.Journal``.)
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import fields
from pathlib import Path

from mirror.model import NormalizedName, ProjectSnapshot, ReleaseFile, RootRow, Serial
from mirror.publish.db import Connection, open_readonly, open_readwrite
from mirror.publish.journal import Journal, get_meta, put_meta

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS projects(
    name TEXT PRIMARY KEY, display TEXT NOT NULL, serial INTEGER NOT NULL,
    page_sha256 TEXT NOT NULL, snapshot BLOB);
CREATE TABLE IF NOT EXISTS files(path TEXT PRIMARY KEY, size INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS refs(project TEXT NOT NULL, path TEXT NOT NULL, PRIMARY KEY(project, path)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refs_path ON refs(path);
CREATE TABLE IF NOT EXISTS todo(
    name TEXT PRIMARY KEY, serial INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT, display TEXT);
CREATE TABLE IF NOT EXISTS retire(path TEXT PRIMARY KEY, since REAL NOT NULL);
CREATE INDEX IF NOT EXISTS retire_since ON retire(since);
CREATE TABLE IF NOT EXISTS gone(name TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS upstream(name TEXT PRIMARY KEY, display TEXT, serial INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS totals(id INTEGER PRIMARY KEY CHECK (id = 0), files INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals(id, files, bytes) VALUES(0, 0, 0);
CREATE TABLE IF NOT EXISTS changes(gen INTEGER NOT NULL, path TEXT NOT NULL, op TEXT NOT NULL,
    PRIMARY KEY(gen, path)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lists(gen INTEGER PRIMARY KEY, serial_from INTEGER NOT NULL,
    serial_to INTEGER NOT NULL, created REAL NOT NULL, written INTEGER NOT NULL DEFAULT 0);
"""


_SNAPSHOT_FIELDS = tuple(f.name for f in fields(ProjectSnapshot) if f.name != "rejected")
_FILE_FIELDS = tuple(f.name for f in fields(ReleaseFile))


def encode_snapshot(snap: ProjectSnapshot) -> bytes:
    # What ``dataclasses.asdict`` gives (the same JSON, byte for byte), at a
    # fifth of its cost: every field of both classes is a plain value.
    d: dict[str, object] = {k: getattr(snap, k) for k in _SNAPSHOT_FIELDS}
    d["files"] = [{k: getattr(f, k) for k in _FILE_FIELDS} for f in snap.files]
    return zlib.compress(json.dumps(d, separators=(",", ":")).encode(), 6)


def decode_snapshot(blob: bytes) -> ProjectSnapshot:
    d = json.loads(zlib.decompress(blob))
    files = tuple(ReleaseFile(**f) for f in d.pop("files"))
    d["versions"] = tuple(d["versions"])
    return ProjectSnapshot(files=files, **d)


class State:
    def __init__(self, db: Connection, path: Path) -> None:
        self.db = db
        self.path = path
        self.changes = Journal(db)

    @classmethod
    def open(cls, path: Path) -> State:
        """The mirror's own read-write connection to the database at ``path``
        (``Layout.db``), creating the schema on first use."""
        db = open_readwrite(path)
        db.executescript(_SCHEMA)
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version == 0:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return cls(db, path)

    @classmethod
    def open_readonly(cls, path: Path) -> State:
        """A connection that cannot write, for checks next to a live mirror
        (``mirror status``, ``mirror verify``)."""
        return cls(open_readonly(path), path)

    def close(self) -> None:
        self.db.close()

    # -- meta -------------------------------------------------------------
    def meta(self, key: str, default: str | None = None) -> str | None:
        value = get_meta(self.db, key)
        return default if value is None else value

    def set_meta(self, **values: str | int | float) -> None:
        with self.db:
            put_meta(self.db, values)

    @property
    def serial(self) -> Serial:
        """The feed position: every event up to here is published or in todo."""
        return Serial(int(self.meta("serial", "0") or 0))

    def synced_serial(self) -> Serial:
        """The highest serial up to which everything is published."""
        row = self.db.execute("SELECT MIN(serial) FROM todo").fetchone()
        if row[0] is None:
            return self.serial
        return Serial(min(self.serial, int(row[0]) - 1))

    # -- todo -------------------------------------------------------------
    def add_todo(
        self, targets: Mapping[NormalizedName, int], *, position: int | None = None,
        display: Mapping[NormalizedName, str] | None = None, seen: Mapping[NormalizedName, int] | None = None,
        **meta: str | int,
    ) -> None:
        """Record what the feed promised, and the new feed position, atomically.

        ``display`` keeps the project's display name (pages only carry the
        normalized one) for the root index.  ``seen`` is every project the
        feed mentioned, including filtered-out ones, for the ``upstream`` table."""
        display = display or {}
        with self.db:
            self.db.executemany(
                "INSERT INTO upstream(name, display, serial) VALUES(?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET serial=MAX(serial, excluded.serial), "
                "display=COALESCE(excluded.display, display)",
                [(n, display.get(n), s) for n, s in (seen if seen is not None else targets).items()],
            )
            self.db.executemany(
                "INSERT INTO todo(name, serial, display) VALUES(?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET serial=MAX(serial, excluded.serial), "
                "display=COALESCE(excluded.display, display)",
                [(n, s, display.get(n)) for n, s in targets.items()],
            )
            values: dict[str, str | int] = dict(meta)
            if position is not None:
                values["serial"] = position
            put_meta(self.db, values)

    def _paged(self, table: str, batch: int) -> Iterator[tuple[NormalizedName, Serial]]:
        """(name, serial) rows of ``table`` in name order, ``batch`` at a time.

        No cursor stays open across a yield, so callers may write to the
        database (even to this table) while they iterate."""
        after = ""
        while True:
            rows = self.db.execute(
                f"SELECT name, serial FROM {table} WHERE name > ? ORDER BY name LIMIT ?", (after, batch)
            ).fetchall()
            if not rows:
                return
            for name, serial in rows:
                yield NormalizedName(name), Serial(serial)
            after = rows[-1][0]

    def iter_todo(self, batch: int = 1000) -> Iterator[tuple[NormalizedName, Serial]]:
        return self._paged("todo", batch)

    def upstream_projects(self, batch: int = 5000) -> Iterator[tuple[NormalizedName, Serial]]:
        """Every project upstream is known to have, in batches (bounded memory)."""
        return self._paged("upstream", batch)

    def forget_upstream(self, name: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM upstream WHERE name=?", (name,))

    def display_name(self, name: str) -> str | None:
        """The display name the feed gave, else the one we published."""
        row = self.db.execute(
            "SELECT display FROM todo WHERE name=? AND display IS NOT NULL "
            "UNION ALL SELECT display FROM projects WHERE name=?", (name, name)
        ).fetchone()
        return None if row is None else str(row[0])

    def drop_todo(self, name: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM todo WHERE name=?", (name,))

    def todo_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM todo").fetchone()[0])

    def defer(self, name: str, error: str) -> None:
        with self.db:
            self.db.execute(
                "UPDATE todo SET attempts=attempts+1, last_error=? WHERE name=?", (error[:2000], name)
            )

    def failure_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM todo WHERE attempts > 0").fetchone()[0])

    def failures(self) -> list[tuple[str, int, int, str]]:
        return [
            (str(n), int(s), int(a), str(e))
            for n, s, a, e in self.db.execute(
                "SELECT name, serial, attempts, last_error FROM todo WHERE attempts > 0 ORDER BY name"
            )
        ]

    # -- projects ---------------------------------------------------------
    def project(self, name: str) -> tuple[Serial, str] | None:
        row = self.db.execute("SELECT serial, page_sha256 FROM projects WHERE name=?", (name,)).fetchone()
        return None if row is None else (Serial(row[0]), str(row[1]))

    def project_serials(self) -> Iterator[tuple[NormalizedName, Serial]]:
        for name, serial in self.db.execute("SELECT name, serial FROM projects"):
            yield NormalizedName(name), Serial(serial)

    def snapshot(self, name: str) -> ProjectSnapshot | None:
        row = self.db.execute("SELECT snapshot FROM projects WHERE name=?", (name,)).fetchone()
        return None if row is None or row[0] is None else decode_snapshot(row[0])

    def refs(self, name: str) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT path FROM refs WHERE project=?", (name,))}

    def known_files(self, paths: Iterable[str]) -> dict[str, tuple[int, str]]:
        """path -> (size, sha256) for the given paths that are in the tree."""
        out: dict[str, tuple[int, str]] = {}
        chunk: list[str] = []
        for p in paths:
            chunk.append(p)
            if len(chunk) == 500:
                out.update(self._known(chunk))
                chunk = []
        if chunk:
            out.update(self._known(chunk))
        return out

    def _known(self, chunk: Sequence[str]) -> dict[str, tuple[int, str]]:
        q = "SELECT path, size, sha256 FROM files WHERE path IN (%s)" % ",".join("?" * len(chunk))
        return {p: (int(s), str(h)) for p, s, h in self.db.execute(q, list(chunk))}

    def is_referenced(self, path: str) -> bool:
        """Does any published page link ``path``?"""
        return self.db.execute("SELECT 1 FROM refs WHERE path=? LIMIT 1", (path,)).fetchone() is not None

    def record_file(self, path: str, size: int, sha256: str) -> None:
        """Called right after the file was renamed into place."""
        self.record_files([(path, size, sha256)])

    def record_files(self, rows: Iterable[tuple[str, int, str]]) -> None:
        """Record files already renamed into place, in one transaction.

        The sync engine calls this once per project rather than once per
        file: a commit per file was a measurable share of the event loop's
        time on a first sync."""
        with self.db:
            for path, size, sha256 in rows:
                row = self.db.execute("SELECT size FROM files WHERE path=?", (path,)).fetchone()
                self.db.execute(
                    "UPDATE totals SET files=files+?, bytes=bytes+? WHERE id=0",
                    (0 if row else 1, size - (row[0] if row else 0)),
                )
                self.db.execute(
                    "INSERT INTO files(path, size, sha256) VALUES(?, ?, ?) "
                    "ON CONFLICT(path) DO UPDATE SET size=excluded.size, sha256=excluded.sha256",
                    (path, size, sha256),
                )
                # A path that is back in use is no longer up for retirement.
                self.db.execute("DELETE FROM retire WHERE path=?", (path,))
                self.changes.note(((path, "replace" if row else "add"),))

    def publish_project(
        self,
        snap: ProjectSnapshot,
        *,
        upstream: ProjectSnapshot,
        page_sha256: str,
        refs: set[str],
        now: float | None = None,
    ) -> list[str]:
        """Record a published page; return the paths that became unreferenced."""
        now = time.time() if now is None else now
        serial = snap.serial or 0
        with self.db:
            old = {r[0] for r in self.db.execute("SELECT path FROM refs WHERE project=?", (snap.name,))}
            row = self.db.execute("SELECT display, serial FROM projects WHERE name=?", (snap.name,)).fetchone()
            # Marked in this transaction, so a kill before the root is rewritten
            # still leads to a rewrite on the next cycle.
            if row is None or row[0] != snap.display_name:
                self._mark_root(html=True)
            elif row[1] != serial:
                self._mark_root(html=False)
            self.db.execute(
                "INSERT INTO projects(name, display, serial, page_sha256, snapshot) VALUES(?, ?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET display=excluded.display, serial=excluded.serial, "
                "page_sha256=excluded.page_sha256, snapshot=excluded.snapshot",
                (snap.name, snap.display_name, serial, page_sha256, encode_snapshot(upstream)),
            )
            dropped = old - refs
            added = refs - old
            self.db.executemany("DELETE FROM refs WHERE project=? AND path=?", [(snap.name, p) for p in dropped])
            self.db.executemany("INSERT INTO refs(project, path) VALUES(?, ?)", [(snap.name, p) for p in added])
            self.db.executemany("DELETE FROM retire WHERE path=?", [(p,) for p in added])
            orphans = self._orphans(dropped, now)
            self.db.execute("DELETE FROM todo WHERE name=? AND serial<=?", (snap.name, serial))
            self.db.execute("DELETE FROM gone WHERE name=?", (snap.name,))
        return orphans

    def remove_project(self, name: str, *, now: float | None = None) -> list[str]:
        """Forget a project; its page goes to ``gone`` until the root is rewritten."""
        now = time.time() if now is None else now
        with self.db:
            old = {r[0] for r in self.db.execute("SELECT path FROM refs WHERE project=?", (name,))}
            existed = self.db.execute("DELETE FROM projects WHERE name=?", (name,)).rowcount
            self.db.execute("DELETE FROM refs WHERE project=?", (name,))
            orphans = self._orphans(old, now)
            self.db.execute("DELETE FROM todo WHERE name=?", (name,))
            if existed:
                self.db.execute("INSERT OR IGNORE INTO gone(name) VALUES(?)", (name,))
                self._mark_root(html=True)
        return orphans

    def _mark_root(self, *, html: bool) -> None:
        """Inside a transaction: the root JSON (and, if names changed, HTML) is stale."""
        keys = ("root_json_dirty", "root_html_dirty") if html else ("root_json_dirty",)
        put_meta(self.db, dict.fromkeys(keys, 1))

    def root_dirty(self) -> tuple[bool, bool]:
        """(JSON root stale, HTML root stale).  The HTML root carries no serials,
        so it only changes when a project appears, goes or is renamed."""
        return self.meta("root_json_dirty") == "1", self.meta("root_html_dirty") == "1"

    def clear_root_dirty(self) -> None:
        self.set_meta(root_json_dirty=0, root_html_dirty=0)

    def _orphans(self, candidates: Iterable[str], now: float) -> list[str]:
        orphans = [
            p for p in candidates
            if self.db.execute("SELECT 1 FROM refs WHERE path=? LIMIT 1", (p,)).fetchone() is None
        ]
        self.db.executemany("INSERT OR IGNORE INTO retire(path, since) VALUES(?, ?)", [(p, now) for p in orphans])
        return orphans

    def gone(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT name FROM gone ORDER BY name")]

    def clear_gone(self, names: Iterable[str]) -> None:
        with self.db:
            self.db.executemany("DELETE FROM gone WHERE name=?", [(n,) for n in names])

    def root_entries(self) -> Iterator[RootRow]:
        """(name, display, serial) rows in name order, as SQLite's own tuples:
        the renderer unpacks them, so no object is built per project."""
        cursor: Iterator[RootRow] = self.db.execute("SELECT name, display, serial FROM projects ORDER BY name")
        return cursor

    def project_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM projects").fetchone()[0])

    # -- retirement -------------------------------------------------------
    def retire_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM retire").fetchone()[0])

    def due_retirements(self, before: float, limit: int) -> list[str]:
        """Paths unreferenced since ``before`` or earlier, oldest first: O(batch)
        through the ``retire_since`` index, whatever the size of the tree."""
        return [r[0] for r in self.db.execute(
            "SELECT path FROM retire WHERE since <= ? "
            "AND NOT EXISTS (SELECT 1 FROM refs WHERE refs.path = retire.path) ORDER BY since LIMIT ?",
            (before, limit),
        )]

    def forget_files(self, paths: Sequence[str]) -> None:
        """Files about to be deleted from the tree: drop their rows, adjust the
        totals and list them in the next change list, in one transaction.
        Their ``retire`` rows stay until ``retired``: a crash between the
        two deletes them again next cycle, and no row ever names a file that
        is gone."""
        with self.db:
            for i in range(0, len(paths), 500):
                chunk = list(paths[i : i + 500])
                marks = ",".join("?" * len(chunk))
                n, b = self.db.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files WHERE path IN ({marks})", chunk
                ).fetchone()
                self.db.execute("UPDATE totals SET files=files-?, bytes=bytes-? WHERE id=0", (n, b))
                self.db.execute(f"DELETE FROM files WHERE path IN ({marks})", chunk)
            self.changes.note((p, "retire") for p in paths)

    def retired(self, paths: Sequence[str]) -> None:
        """The files ``forget_files`` named are deleted from the tree."""
        with self.db:
            for i in range(0, len(paths), 500):
                chunk = list(paths[i : i + 500])
                self.db.execute(f"DELETE FROM retire WHERE path IN ({','.join('?' * len(chunk))})", chunk)

    def tree_totals(self) -> tuple[int, int]:
        """(files, bytes) in the tree, kept as running totals: O(1) at any size."""
        n, b = self.db.execute("SELECT files, bytes FROM totals WHERE id=0").fetchone()
        return int(n), int(b)

    # -- verification ---------------------------------------------------------
    def iter_files(self, batch: int = 1000) -> Iterator[tuple[str, int, str]]:
        """Every (path, size, sha256) in the tree, in path order, paged."""
        after = ""
        while rows := self.db.execute(
            "SELECT path, size, sha256 FROM files WHERE path > ? ORDER BY path LIMIT ?", (after, batch)
        ).fetchall():
            for path, size, sha in rows:
                yield str(path), int(size), str(sha)
            after = rows[-1][0]

    def iter_projects(self, batch: int = 1000) -> Iterator[NormalizedName]:
        """Every published project's name, in order, paged."""
        after = ""
        while rows := self.db.execute(
            "SELECT name FROM projects WHERE name > ? ORDER BY name LIMIT ?", (after, batch)
        ).fetchall():
            for (name,) in rows:
                yield NormalizedName(name)
            after = rows[-1][0]

    def queue_repair(self, paths: Iterable[str] = (), projects: Iterable[str] = (), *, root: bool = False) -> list[str]:
        """Make the next sync fetch ``paths`` again and rewrite the pages of
        ``projects`` and of every project that links one of ``paths``.

        The files' rows go (so the planner sees them missing), each project's
        page digest is cleared (so its pages are written even if upstream did
        not change) and the project joins ``todo`` at its published serial.
        Whoever syncs next (a running daemon, or ``mirror verify --repair``
        itself) does the work; ``root`` has it rewrite the root index too.
        Returns the projects queued."""
        names: set[str] = set(projects)
        with self.db:
            if root:
                self._mark_root(html=True)
            for p in paths:
                row = self.db.execute("SELECT size FROM files WHERE path=?", (p,)).fetchone()
                if row is not None:
                    self.db.execute("DELETE FROM files WHERE path=?", (p,))
                    self.db.execute("UPDATE totals SET files=files-1, bytes=bytes-? WHERE id=0", (row[0],))
                names.update(r[0] for r in self.db.execute("SELECT project FROM refs WHERE path=?", (p,)))
            for name in names:
                self.db.execute("UPDATE projects SET page_sha256='' WHERE name=?", (name,))
                self.db.execute(
                    "INSERT INTO todo(name, serial) SELECT name, serial FROM projects WHERE name=? "
                    "ON CONFLICT(name) DO NOTHING", (name,))
        return sorted(names)
