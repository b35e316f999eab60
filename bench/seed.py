"""Pre-seeded mirror states: a mirror that already follows N projects.

Syncing 200 000 projects for real would take the benchmark longer than the
thing it measures, so the scale scenarios write the SQLite state directly:
one ``projects`` row per project (serial ``i + 1``), one verified file with
its ``refs`` row each (so the tables have a realistic shape), the feed
position, and the root index under ``web/simple/``.  The files themselves
are not on disk: a no-change cycle never looks at them, and a one-change
cycle only downloads what the state does not list.

The same function seeds the regular scalability test (tests/test_scale.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from mirror.publish import render
from mirror.model import NormalizedName, RootEntry, Serial
from mirror.publish.state import State
from mirror.publish.tree import FileTree
from mirror.layout import Layout


@dataclass(frozen=True)
class SeededProject:
    name: str
    serial: int
    file_path: str  # relative to web/, as the state records it
    file_url_path: str  # the upstream URL path of that file
    filename: str
    sha256: str
    size: int


def project_name(i: int) -> str:
    return f"scale-{i:06d}"


def seeded_project(i: int) -> SeededProject:
    """The i-th seeded project, recomputable by whoever serves its upstream page."""
    name = project_name(i)
    filename = f"{name.replace('-', '_')}-1.0.0.tar.gz"
    sha = hashlib.sha256(name.encode()).hexdigest()
    b2 = hashlib.blake2b(name.encode(), digest_size=32).hexdigest()
    rel = f"packages/{b2[:2]}/{b2[2:4]}/{b2[4:]}/{filename}"
    return SeededProject(name, i + 1, rel, "/" + rel, filename, sha, 1000)


def seed_state(directory: Path, projects: int, *, files: bool = True, root: bool = True) -> int:
    """Write a state that follows ``projects`` projects; return the feed serial."""
    tree = FileTree.at(Layout(directory))
    tree.prepare()
    state = State.open(Layout(directory).db)
    db = state.db
    serial = projects
    try:
        with db:
            db.executemany(
                "INSERT INTO projects(name, display, serial, page_sha256, snapshot) VALUES(?, ?, ?, ?, NULL)",
                ((project_name(i), project_name(i), i + 1, "0" * 64) for i in range(projects)),
            )
            if files:
                rows = [seeded_project(i) for i in range(projects)]
                db.executemany("INSERT INTO files(path, size, sha256) VALUES(?, ?, ?)",
                               ((p.file_path, p.size, p.sha256) for p in rows))
                db.executemany("INSERT INTO refs(project, path) VALUES(?, ?)",
                               ((p.name, p.file_path) for p in rows))
                db.execute("UPDATE totals SET files=?, bytes=? WHERE id=0",
                           (projects, sum(p.size for p in rows)))
        state.set_meta(serial=serial, synced_serial=serial, upstream_serial=serial)
        if root:
            entries = [RootEntry(NormalizedName(n), d, Serial(s)) for n, d, s in
                       db.execute("SELECT name, display, serial FROM projects ORDER BY name")]
            html = render.root_html(entries)
            tree.write_files([
                ("simple/index.html", html),
                ("simple/index.v1_html", html),
                ("simple/index.v1_json", render.root_json(entries, serial=serial)),
            ])
    finally:
        state.close()
    return serial
