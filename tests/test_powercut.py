"""A power cut at any moment of a real ``mirror sync`` leaves a consistent tree.

The file-system calls of real syncs (a first sync, then a cycle that adds,
yanks, removes a file and removes a project) are recorded with strace, and
every state a power cut could leave is rebuilt from them under two models
(``tests.harness.powercut``): ext4 with ``data=ordered``, and a strict model
in which a name persists only when an fsync of its own directory, or a
syncfs, covers it.  In every state:

* every page under ``simple/`` is one that was written whole;
* every file a page links is there, complete, with the hash the page
  promises (``.metadata`` and provenance included);
* every project the root lists has its page;
* the state database opens, and every file and project it records is in
  the tree (the next run trusts those rows).

The same check must fail on a sync whose publisher skips the barrier
between a batch's files and its pages.
"""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

from mirror.layout import Layout
from mirror.publish import pagelinks
from tests.harness.e2e import write_config
from tests.harness.fakepypi import FakePyPI, populate
from tests.harness.powercut import Model, Op, record

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (Debian package strace)"),
]

# The child: `mirror sync`, with the helpers forced on for a small corpus,
# and, "broken", a publisher that places each batch's pages right after its
# files, before the barrier that makes the files durable.
CHILD = """
import sys
from mirror import cli
from mirror.sync import publisher
from mirror.sync.cycle import Syncer
Syncer.pool_min_projects = 1
if sys.argv[1] == "broken":
    real = publisher._stage
    def stage(tree, batch):
        unsafe, temps = real(tree, batch)
        publisher._place_pages(tree, [item for item in batch if item.name not in unsafe], temps)
        return unsafe, []
    publisher._stage = stage
sys.exit(cli.main(["--log-level", "warning", "sync", "--config", sys.argv[2]]))
"""


def check(state: dict[str, bytes], layout: Layout, placed: dict[str, set[bytes]], tmp: Path) -> list[str]:
    """Everything wrong with the tree and state a power cut left."""
    web = str(layout.web) + "/"
    problems: list[str] = []
    files = {p[len(web):]: d for p, d in state.items() if p.startswith(web)}

    def complete(rel: str) -> bool:
        return rel in files and files[rel] in placed.get(web + rel, ())

    for rel in files:
        if rel.startswith("simple/") and not complete(rel):
            problems.append(f"page {rel} is not a page that was written whole ({len(files[rel])} bytes)")
    for rel in [r for r in files if r.startswith("simple/") and r.count("/") == 2 and complete(r)]:
        for link in pagelinks.links(rel, files[rel]):
            if link.rel is None or link.escapes:
                problems.append(f"{rel} links {link.href} outside the tree")
            elif not complete(link.rel):
                problems.append(f"{rel} links {link.rel}, which is missing or short")
            elif link.sha256 and hashlib.sha256(files[link.rel]).hexdigest() != link.sha256:
                problems.append(f"{rel} links {link.rel} with sha256 {link.sha256}, the file has other bytes")
    root = files.get("simple/index.v1_json")
    if root is not None and complete("simple/index.v1_json"):
        for name in pagelinks.root_names("simple/index.v1_json", root):
            if not complete(f"simple/{name}/index.v1_json"):
                problems.append(f"the root lists {name}, whose page is missing")
    db = str(layout.db)
    if db in state:
        d = tmp / "db"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        (d / "m.sqlite3").write_bytes(state[db])
        if db + "-wal" in state:
            (d / "m.sqlite3-wal").write_bytes(state[db + "-wal"])
        con = sqlite3.connect(d / "m.sqlite3")
        try:
            if con.execute("PRAGMA integrity_check").fetchone() != ("ok",):
                problems.append("the state database is damaged")
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "files" in tables:
                for path, size, sha in con.execute("SELECT path, size, sha256 FROM files"):
                    data = files.get(path)
                    if data is None or len(data) != size or hashlib.sha256(data).hexdigest() != sha:
                        problems.append(f"the state records {path}, which is missing or different")
            if "projects" in tables:
                for (name,) in con.execute("SELECT name FROM projects"):
                    if not complete(f"simple/{name}/index.v1_json"):
                        problems.append(f"the state records project {name} as published, its page is missing")
        except sqlite3.DatabaseError as e:
            problems.append(f"the state database does not open: {e}")
        finally:
            con.close()
    return problems


def sweep(model: Model, layout: Layout, kind: str, tmp: Path, *, limit: int = 20) -> list[str]:
    found: list[str] = []
    states = 0
    for k, variant, state in model.crash_states(model=kind):
        states += 1
        for p in check(state, layout, model.placed, tmp):
            what = model.ops[k] if k >= 0 else Op("start")
            found.append(f"after op {k} ({what.kind} {Path(what.dest or what.path).name}), {variant}: {p}")
            if len(found) >= limit:
                return found
    assert states > 100, "too few crash states: did strace record the sync?"
    return found


def run_traced(conf: Path, directory: Path, out: Path, *, mode: str = "ok") -> list[Op]:
    out.mkdir(parents=True, exist_ok=True)
    r, ops = record([sys.executable, "-c", CHILD, mode, str(conf)], directory, out=out,
                    cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(op.kind == "syncfs" for op in ops) or mode != "ok"
    return ops


def two_cycles(up: FakePyPI, tmp_path: Path, *, mode: str = "ok") -> tuple[Layout, Model]:
    populate(up, 6, seed=4)
    if mode == "broken":
        # One project's files arrive three seconds after the others', so
        # they are written after every other batch's barrier: the broken
        # publisher's early page then always has a window in which its
        # files are not durable yet (without this, an other batch's syncfs
        # can happen to cover them: with one second, a fresh-clone CI run on
        # a loaded machine once found no such window).
        last = up.project_names()[-1]
        for filename in up.filenames(last):
            up.add_fault("slow", match=filename, delay=3.0)
    directory = tmp_path / "m"
    conf = write_config(tmp_path / "mirror.toml", up.url, directory,
                        mirror={"workers": 4, "download_processes": 1, "retire_after": 0})
    ops = run_traced(conf, directory, tmp_path / "t1", mode=mode)
    names = up.project_names()
    up.add_release(names[0], "9.0")
    up.yank(names[1], up.versions(names[1])[0])
    up.remove_file(names[2], up.filenames(names[2])[0])
    up.remove_project(names[3])
    # The second cycle starts from a tree that reached the disk whole.
    ops += [Op("syncfs")] + run_traced(conf, directory, tmp_path / "t2", mode=mode)
    return Layout(directory), Model(ops)


@pytest.mark.parametrize("kind", ["ext4", "strict"])
def test_no_power_cut_leaves_a_page_without_its_files(upstream: FakePyPI, tmp_path: Path, kind: str) -> None:
    layout, model = two_cycles(upstream, tmp_path)
    assert sweep(model, layout, kind, tmp_path) == []
    # And without a power cut the tree is simply complete.
    final = model.state(len(model.ops) - 1, model=kind, data="lost", meta="lost")
    assert check(final, layout, model.placed, tmp_path) == []
    assert any(p.endswith(".metadata") for p in final) and any(p.endswith(".provenance") for p in final)


def test_the_check_catches_a_page_published_before_its_files_are_durable(upstream: FakePyPI, tmp_path: Path) -> None:
    layout, model = two_cycles(upstream, tmp_path, mode="broken")
    found = sweep(model, layout, "ext4", tmp_path, limit=100_000)
    # A page out before its files are durable: the files it links can be
    # lost, and so can the page itself.
    kinds = {"link": [p for p in found if " links packages/" in p and "which is missing or short" in p],
             "page": [p for p in found if "is not a page that was written whole" in p]}
    assert all(kinds.values()), {k: len(v) for k, v in kinds.items()}
