"""`mirror verify`: finds each kind of damage, repairs it, changes nothing on
--dry-run, coexists with a running mirror, and runs in bounded memory."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest

from mirror import cli
from mirror.publish.lock import DirectoryLock
from mirror.publish.state import State
from mirror.publish.tree import FileTree
from mirror.ops.verify import Verifier, verify
from mirror.layout import Layout
from tests.harness.e2e import make_config, write_config
from tests.harness.fakepypi import FakePyPI, populate
from tests.harness.reliability import mirror_problems


@pytest.fixture
def mirror(upstream: FakePyPI, tmp_path: Path) -> Path:
    """A synced mirror of 6 projects; returns its config path."""
    populate(upstream, 6, seed=4)
    conf = write_config(tmp_path / "mirror.toml", upstream.url, tmp_path / "m")
    assert cli.main(["sync", "--config", str(conf)]) == 0
    return conf


def run(conf: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str], str]:
    capsys.readouterr()
    rc = cli.main(["verify", "--config", str(conf), *args])
    out, err = capsys.readouterr()
    return rc, sorted(line for line in out.splitlines() if line), err


def kinds(lines: list[str]) -> list[tuple[str, str]]:
    return sorted((line.split("\t")[0], line.split("\t")[1]) for line in lines)


def tree_files(web: Path) -> list[Path]:
    return sorted(p for p in (web / "packages").rglob("*") if p.is_file() and not p.is_symlink())


def age(path: Path) -> None:
    """Older than the window in which a live mirror may be committing it."""
    old = time.time() - 3600
    os.utime(path, (old, old), follow_symlinks=False)


def test_clean_mirror_is_clean(mirror: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, lines, err = run(mirror, "--hash", "--orphans", "list", capsys=capsys)
    assert (rc, lines) == (0, [])
    assert "problems: none" in err


def test_each_kind_of_damage_is_found(mirror: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    web = tmp_path / "m/web"
    files = [p.relative_to(web).as_posix() for p in tree_files(web)]
    dists = [f for f in files if not f.endswith((".metadata", ".provenance"))]
    missing, short, corrupt, linked = dists[0], dists[1], dists[2], dists[3]
    (web / missing).unlink()
    (web / short).write_bytes((web / short).read_bytes()[:-1])
    data = (web / corrupt).read_bytes()
    (web / corrupt).write_bytes(bytes([data[0] ^ 1]) + data[1:])
    (web / linked).unlink()
    (web / linked).symlink_to("/etc/hostname")
    (web / "simple/pkg-00001/index.v1_json").unlink()
    # index.v1_html is a hard link to index.html: replace it, do not edit both.
    (web / "simple/pkg-00002/index.v1_html").unlink()
    (web / "simple/pkg-00002/index.v1_html").write_text("<html>other</html>")
    (web / "simple/pkg-00003/index.v1_json").write_text("{not json")
    page4 = web / "simple/pkg-00004/index.v1_json"
    page4.write_text(page4.read_text().replace('"url":"../../packages/', '"url":"../../packages/x', 1))
    (web / "packages/zz").mkdir()
    (web / "packages/zz/stray.tar.gz").write_bytes(b"stray")
    (web / "packages/zz/link").symlink_to(tmp_path)
    (web / "simple/ghost").mkdir()
    (web / "simple/ghost/index.html").write_text("ghost")
    for p in (web / "packages/zz/stray.tar.gz", web / "packages/zz/link", web / "simple/ghost"):
        age(p)

    rc, lines, _ = run(mirror, "--orphans", "list", capsys=capsys)
    assert rc == 1
    expected = [
        ("missing", missing), ("size", short), ("not_a_file", linked), ("symlink", linked),
        ("page_missing", "simple/pkg-00001/index.v1_json"),
        ("page_mismatch", "simple/pkg-00002/index.v1_html"),
        ("page_unreadable", "simple/pkg-00003/index.v1_json"),
        ("link_broken", "simple/pkg-00004/index.v1_json"),
        ("page_mismatch", "simple/pkg-00004/index.html"),  # HTML still lists the real file
        ("orphan", "packages/zz/stray.tar.gz"), ("symlink", "packages/zz/link"),
        ("orphan_page", "simple/ghost"),
    ]
    got = kinds(lines)
    # (A wheel's broken link also breaks its .metadata link: same kind, same page.)
    assert set(got) == set(expected), "\n".join(map(str, got))
    # Only --hash reads the bytes.
    rc, lines, _ = run(mirror, "--hash", capsys=capsys)
    assert ("hash", corrupt) in kinds(lines)
    # The root index: compared byte for byte with what the state lists.
    html = web / "simple/index.html"  # index.v1_html is a hard link to it
    html.write_text(html.read_text().replace("pkg-00002", "pkg-99999"))
    rc, lines, _ = run(mirror, capsys=capsys)
    assert {p for k, p in kinds(lines) if k == "root"} == {"simple/index.html", "simple/index.v1_html"}
    (web / "simple/index.v1_json").unlink()
    rc, lines, _ = run(mirror, capsys=capsys)
    assert ("root", "simple/index.v1_json") in kinds(lines)


def test_repair_restores_the_mirror(
    upstream: FakePyPI, mirror: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    web = tmp_path / "m/web"
    dists = [p for p in tree_files(web) if not p.name.endswith((".metadata", ".provenance"))]
    dists[0].unlink()
    data = dists[1].read_bytes()
    dists[1].write_bytes(bytes([data[0] ^ 1]) + data[1:])
    (web / "simple/pkg-00001/index.v1_json").unlink()
    (web / "simple/index.html").unlink()
    upstream.reset_log()
    rc, lines, err = run(mirror, "--hash", "--repair", capsys=capsys)
    assert rc == 0, err
    assert {k for k, _ in kinds(lines)} == {"missing", "hash", "page_missing", "root"}
    assert mirror_problems(web, upstream) == []
    # Exactly the two damaged files came again, nothing else.
    got = sorted(r[1] for r in upstream.requests if r[1].startswith("/packages/"))
    assert got == sorted("/" + p.relative_to(web).as_posix() for p in dists[:2])
    assert run(mirror, "--hash", "--orphans", "list", capsys=capsys)[:2] == (0, [])


def _snapshot(directory: Path) -> dict[str, object]:
    """Every file's mtime and bytes, and the state database's content (its
    -wal/-shm companions are SQLite's business, even for a reader)."""
    out: dict[str, object] = {}
    for dirpath, _, files in os.walk(directory):
        for f in files:
            p = Path(dirpath) / f
            if not p.is_symlink() and not f.endswith(("-wal", "-shm")):
                out[str(p.relative_to(directory))] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).digest())
    db = sqlite3.connect(directory / "state/mirror.sqlite3")
    out["db"] = list(db.iterdump())
    db.close()
    return out


def test_dry_run_changes_nothing(mirror: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    web = tmp_path / "m/web"
    tree_files(web)[0].unlink()
    (web / "simple/pkg-00002/index.v1_json").unlink()
    (web / "packages/stray.whl").write_bytes(b"x")
    age(web / "packages/stray.whl")
    before = _snapshot(tmp_path / "m")
    rc, lines, err = run(mirror, "--repair", "--dry-run", "--orphans", "delete", capsys=capsys)
    assert rc == 1 and len(lines) == 3
    assert "would download 1 file(s) again and rewrite the pages of 1 project(s)" in err
    assert "would delete 1 orphan(s)" in err
    assert _snapshot(tmp_path / "m") == before


def test_repair_is_queued_for_a_running_mirror(
    upstream: FakePyPI, mirror: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    web = tmp_path / "m/web"
    gone = tree_files(web)[0]
    gone.unlink()
    (web / "simple/pkg-00003/index.v1_json").unlink()
    # This process plays the running daemon: it holds the lock.
    with DirectoryLock(tmp_path / "m/state/lock"):
        rc, lines, err = run(mirror, capsys=capsys)  # read-only checks need no lock
        assert rc == 1 and len(lines) == 2
        rc, lines, err = run(mirror, "--repair", capsys=capsys)
        assert rc == 1 and f"mirror pid {os.getpid()} is running: queued 2 project(s)" in err
        assert not gone.exists()  # nothing written by verify
        state = State.open(Layout(tmp_path / "m").db)
        assert state.todo_count() == 2
        state.close()
        rc, _, err = run(mirror, "--orphans", "delete", capsys=capsys)
        assert rc == 3 and "--orphans delete needs the mirror stopped" in err
    # The daemon's next cycle (here: a sync) does the work.
    assert cli.main(["sync", "--config", str(mirror)]) == 0
    assert gone.exists() and mirror_problems(web, upstream) == []
    assert run(mirror, "--hash", capsys=capsys)[:2] == (0, [])


@pytest.mark.slow
def test_verify_next_to_a_live_sync_reports_nothing(tmp_path: Path) -> None:
    """While a real `mirror sync` publishes, every verify sees a consistent
    tree: a problem is only reported if it is still there on a second look."""
    with FakePyPI(seed=9) as up:
        populate(up, 40, seed=9)
        up.add_fault("slow", match="/packages/", delay=0.02)
        conf = write_config(tmp_path / "mirror.toml", up.url, tmp_path / "m", mirror={"workers": 4})
        cmd = [sys.executable, "-m", "mirror"]
        sync = subprocess.Popen([*cmd, "sync", "--config", str(conf)], stderr=subprocess.DEVNULL)
        runs = 0
        deadline = time.monotonic() + 60
        while sync.poll() is None and time.monotonic() < deadline:
            if not (tmp_path / "m/state/mirror.sqlite3").exists():
                time.sleep(0.05)
                continue
            r = subprocess.run([*cmd, "verify", "--config", str(conf), "--orphans", "list"],
                               capture_output=True, text=True, timeout=60)
            assert (r.returncode, r.stdout) == (0, ""), r.stderr[-2000:]
            runs += 1
        assert sync.wait(60) == 0
        assert runs >= 2, runs
        r = subprocess.run([*cmd, "verify", "--config", str(conf), "--hash"], capture_output=True, text=True)
        assert (r.returncode, r.stdout) == (0, "")


def test_verify_streams_in_bounded_memory(tmp_path: Path) -> None:
    """25 000 rows whose files are all missing and 1 000 orphans on disk: the
    checks hold one batch (about 1 MB), not one object per problem (5 MB)."""
    directory = tmp_path / "m"
    tree = FileTree.at(Layout(directory))
    tree.prepare()
    state = State.open(Layout(directory).db)
    rows = [(f"packages/{i % 256:02x}/{i:06d}/f{i}.whl", 10, "0" * 64) for i in range(25_000)]
    with state.db:
        state.db.executemany("INSERT INTO files(path, size, sha256) VALUES(?, ?, ?)", rows)
    del rows
    for i in range(1000):
        d = tree.web / "packages" / f"o{i % 50}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"orphan{i}.whl").write_bytes(b"x")
    v = Verifier(tree, state, live=False, batch=500)
    tracemalloc.start()
    try:
        found = sum(1 for _ in v.check_files())
        orphans = sum(1 for p in v.find_orphans() if p.kind == "orphan")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    state.close()
    assert (found, orphans) == (25_000, 1000)
    assert peak < 5 << 19, f"peak {peak / 1e6:.1f} MB"
    # The whole command, queueing a repair for every row batch by batch
    # (no page links these files, so there is nothing to download).
    cfg = make_config("http://127.0.0.1:9", directory)
    tracemalloc.start()
    try:
        with open(os.devnull, "w") as out:
            report = verify(cfg, out, repair=True, orphans="list", exclusive=True, batch=500)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.problems == {"missing": 25_000, "orphan": 1000} and report.repair is None
    assert peak < 5 << 19, f"peak {peak / 1e6:.1f} MB"
    state = State.open(Layout(directory).db)
    assert state.db.execute("SELECT COUNT(*) FROM files").fetchone() == (0,)
    state.close()


def test_verify_without_state_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = write_config(tmp_path / "mirror.toml", "http://127.0.0.1:9", tmp_path / "nothing")
    assert cli.main(["verify", "--config", str(conf)]) == 2
    assert "no mirror state to verify" in capsys.readouterr().err
