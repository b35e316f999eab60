"""`mirror.publish.tree.Tree` (the only writer under web/) and `mirror.publish.state.State`."""

from __future__ import annotations

import hashlib
import ctypes
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirror.errors import DiskError, UnsafePath
from mirror.model import NormalizedName, ProjectSnapshot, ReleaseFile, Serial
from mirror.publish.state import State, decode_snapshot, encode_snapshot
from mirror.publish.tree import FileTree, Tree
from mirror.layout import Layout

# -- Tree ---------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    t = FileTree.at(Layout(tmp_path / "mirror"))
    t.prepare()
    return t


def temp_with(tree: Tree, data: bytes) -> Path:
    tmp = tree.new_temp()
    tmp.write_bytes(data)
    return tmp


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir() or p.is_symlink())


def test_prepare_creates_layout(tmp_path: Path) -> None:
    t = FileTree.at(Layout(tmp_path / "mirror"))
    assert t.prepare() == 0
    assert t.web.is_dir()
    assert t.tmp.is_dir()
    assert t.tmp.parent.parent == tmp_path / "mirror"
    assert t.web not in t.tmp.parents


def test_prepare_removes_stale_temps(tree: Tree, tmp_path: Path) -> None:
    (tree.tmp / "a.part").write_bytes(b"x")
    (tree.tmp / "b.part").write_bytes(b"y")
    target = tmp_path / "keep-me"
    target.write_bytes(b"precious")
    os.symlink(target, tree.tmp / "link.part")
    (tree.tmp / "subdir").mkdir()
    assert tree.prepare() == 3
    assert sorted(os.listdir(tree.tmp)) == ["subdir"]
    assert target.read_bytes() == b"precious"  # the link was removed, not followed
    assert tree.prepare() == 0


def test_new_temp_is_under_tmp_and_unique(tree: Tree) -> None:
    a, b = tree.new_temp(), tree.new_temp(".x")
    assert a.parent == tree.tmp == b.parent
    assert a != b
    assert b.name.endswith(".x.part")


def test_write_files_creates_and_replaces_atomically(tree: Tree) -> None:
    tree.write_files([("simple/demo/index.html", b"old"), ("simple/index.html", b"root")])
    page = tree.web / "simple/demo/index.html"
    assert page.read_bytes() == b"old"
    ino = page.stat().st_ino
    with open(page, "rb") as reader:
        tree.write_files([("simple/demo/index.html", b"new page")])
        # A reader that opened the old page still sees it whole: it was
        # replaced by a rename, not rewritten in place.
        assert reader.read() == b"old"
    assert page.read_bytes() == b"new page"
    assert page.stat().st_ino != ino
    assert (tree.web / "simple/index.html").read_bytes() == b"root"
    assert os.listdir(tree.tmp) == []
    assert tree.read("simple/demo/index.html") == b"new page"
    assert tree.read("simple/nope/index.html") is None


def test_write_files_links_items_that_share_their_bytes(tree: Tree) -> None:
    html, json_ = b"<html>page</html>", b"{}"
    tree.write_files([("simple/d/index.html", html), ("simple/d/index.v1_html", html), ("simple/d/index.v1_json", json_)])
    d = tree.web / "simple/d"
    assert os.path.samefile(d / "index.html", d / "index.v1_html")
    assert not os.path.samefile(d / "index.html", d / "index.v1_json")
    assert (d / "index.v1_html").read_bytes() == html and (d / "index.v1_json").read_bytes() == json_
    # Equal bytes in two objects are written twice: only the same object links.
    tree.write_files([("simple/d/index.html", b"new"), ("simple/d/index.v1_html", bytes(bytearray(b"new")))])
    assert not os.path.samefile(d / "index.html", d / "index.v1_html")
    assert (d / "index.html").read_bytes() == (d / "index.v1_html").read_bytes() == b"new"
    assert os.listdir(tree.tmp) == []


def test_write_files_unsafe_path_leaves_nothing(tree: Tree) -> None:
    with pytest.raises(UnsafePath):
        tree.write_files([("../escape.html", b"x")])
    assert not (tree.web.parent / "escape.html").exists()
    assert os.listdir(tree.tmp) == []
    assert all_files(tree.web) == []


def test_commit_file_creates_dirs(tree: Tree) -> None:
    tmp = temp_with(tree, b"wheel bytes")
    tree.commit_file(tmp, "packages/ab/cd/ef/demo-1.0-py3-none-any.whl")
    dest = tree.web / "packages/ab/cd/ef/demo-1.0-py3-none-any.whl"
    assert dest.read_bytes() == b"wheel bytes"
    assert not tmp.exists()
    assert os.listdir(tree.tmp) == []


def test_commit_file_replaces_existing(tree: Tree) -> None:
    tree.commit_file(temp_with(tree, b"one"), "packages/x/f.tar.gz")
    tree.commit_file(temp_with(tree, b"two"), "packages/x/f.tar.gz")
    assert (tree.web / "packages/x/f.tar.gz").read_bytes() == b"two"


@pytest.mark.parametrize("link_at", ["packages", "packages/ab"])
def test_commit_file_refuses_symlinked_directory(tree: Tree, tmp_path: Path, link_at: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    link = tree.web / link_at
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside, link)
    tmp = temp_with(tree, b"evil")
    with pytest.raises(UnsafePath):
        tree.commit_file(tmp, "packages/ab/cd/x.whl")
    assert all_files(outside) == []
    assert os.listdir(tree.tmp) == []  # the temp is not leaked


def test_commit_file_refuses_dangling_symlink(tree: Tree, tmp_path: Path) -> None:
    os.symlink(tmp_path / "does-not-exist", tree.web / "packages")
    with pytest.raises(UnsafePath):
        tree.commit_file(temp_with(tree, b"evil"), "packages/x.whl")
    assert not (tmp_path / "does-not-exist").exists()


def test_write_files_refuses_symlinked_directory(tree: Tree, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, tree.web / "simple")
    with pytest.raises(UnsafePath):
        tree.write_files([("simple/demo/index.html", b"page")])
    assert all_files(outside) == []
    assert os.listdir(tree.tmp) == []


def test_commit_file_refuses_file_as_directory(tree: Tree) -> None:
    (tree.web / "packages").write_bytes(b"i am a file")
    with pytest.raises(UnsafePath):
        tree.commit_file(temp_with(tree, b"x"), "packages/x.whl")


@pytest.mark.parametrize(
    "rel", ["../x", "packages/../../x", "/etc/passwd", "a//b", "a\\b", "a/\x00", "", "packages/%2e%2e/x", "a/"]
)
def test_commit_file_refuses_unsafe_rel(tree: Tree, rel: str) -> None:
    tmp = temp_with(tree, b"x")
    with pytest.raises(UnsafePath):
        tree.commit_file(tmp, rel)
    assert all_files(tree.web) == []
    assert sorted(p.name for p in tree.web.parent.iterdir()) == ["state", "web"]


@pytest.mark.parametrize("rel", ["../x", "/abs", "a/../b"])
def test_read_and_path_refuse_unsafe_rel(tree: Tree, rel: str) -> None:
    with pytest.raises(UnsafePath):
        tree.path(rel)
    with pytest.raises(UnsafePath):
        tree.read(rel)


def test_place_and_write_temps_need_a_barrier_to_be_durable(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched path never fsyncs on its own: one syncfs of the tree's
    filesystem (the barrier) covers every file, temp and directory."""
    synced: list[int] = []
    monkeypatch.setattr("mirror.publish.tree._syncfs", lambda: lambda fd: synced.append(fd) or 0)
    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd))[1])
    tree.place(temp_with(tree, b"1"), "packages/aa/bb/one.whl")
    temps = tree.write_temps([("simple/one/index.html", b"<a>"), ("simple/one/index.v1_json", b"{}")])
    tree.place_all(temps)
    assert fsyncs == [] and synced == []
    tree.barrier()
    assert len(synced) == 1 and tree.barriers == 1
    assert all_files(tree.web) == ["packages/aa/bb/one.whl", "simple/one/index.html", "simple/one/index.v1_json"]


def test_barrier_failure_is_a_disk_error(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr("mirror.publish.tree._syncfs", lambda: failing)
    with pytest.raises(DiskError, match="making the tree durable: Input/output error"):
        tree.barrier()


def test_remembered_directory_removed_by_hand_is_created_again(tree: Tree) -> None:
    tree.commit_file(temp_with(tree, b"1"), "packages/ab/cd/one.whl")
    shutil.rmtree(tree.web / "packages")  # behind the tree's back, mid-cycle
    tree.commit_file(temp_with(tree, b"2"), "packages/ab/cd/two.whl")
    tree.write_files([("packages/ab/cd/three.whl", b"3")])
    assert all_files(tree.web) == ["packages/ab/cd/three.whl", "packages/ab/cd/two.whl"]
    assert os.listdir(tree.tmp) == []


def test_pruned_directory_is_not_remembered(tree: Tree) -> None:
    tree.commit_file(temp_with(tree, b"1"), "packages/ab/one.whl")
    assert len(tree.remove(["packages/ab/one.whl"])) == 1
    assert not (tree.web / "packages").exists()
    tree.commit_file(temp_with(tree, b"2"), "packages/ab/two.whl")
    assert (tree.web / "packages/ab/two.whl").read_bytes() == b"2"


def test_symlink_planted_between_cycles_is_refused(tree: Tree, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tree.commit_file(temp_with(tree, b"1"), "packages/ab/one.whl")
    shutil.rmtree(tree.web / "packages/ab")
    os.symlink(outside, tree.web / "packages/ab")
    tree.forget_dirs()  # what the sync engine does at every cycle's start
    with pytest.raises(UnsafePath):
        tree.commit_file(temp_with(tree, b"evil"), "packages/ab/two.whl")
    assert all_files(outside) == []


def test_remove_prunes_empty_parents_but_not_web(tree: Tree) -> None:
    tree.write_files([
        ("packages/ab/cd/one.whl", b"1"),
        ("packages/ab/two.whl", b"2"),
        ("simple/demo/index.html", b"p"),
    ])
    assert len(tree.remove(["packages/ab/cd/one.whl"])) == 1
    assert not (tree.web / "packages/ab/cd").exists()
    assert (tree.web / "packages/ab/two.whl").exists()

    assert len(tree.remove(["packages/ab/two.whl", "packages/ab/missing.whl", "simple/demo/index.html"])) == 2
    assert not (tree.web / "packages").exists()
    assert not (tree.web / "simple").exists()
    assert tree.web.is_dir()
    assert all_files(tree.web) == []


def test_remove_without_prune_keeps_dirs(tree: Tree) -> None:
    tree.write_files([("packages/ab/one.whl", b"1")])
    assert len(tree.remove(["packages/ab/one.whl"], prune=False)) == 1
    assert (tree.web / "packages/ab").is_dir()


def test_remove_at_top_level_keeps_web(tree: Tree) -> None:
    tree.write_files([("last-modified", b"x")])
    assert len(tree.remove(["last-modified"])) == 1
    assert tree.web.is_dir()


def test_adopt(tree: Tree, tmp_path: Path) -> None:
    data = b"right bytes"
    sha = hashlib.sha256(data).hexdigest()
    tree.write_files([("packages/x/f.whl", data)])
    assert tree.adopt("packages/x/f.whl", len(data), sha) == len(data)
    assert tree.adopt("packages/x/f.whl", None, sha) == len(data)
    assert tree.adopt("packages/x/f.whl", len(data) + 1, sha) is None
    assert tree.adopt("packages/x/f.whl", len(data), "0" * 64) is None
    assert tree.adopt("packages/x/missing.whl", None, sha) is None

    tree.write_files([("packages/x/f.whl", b"wrong bytes")])
    assert tree.adopt("packages/x/f.whl", None, sha) is None

    outside = tmp_path / "outside.whl"
    outside.write_bytes(data)
    os.symlink(outside, tree.web / "packages/x/link.whl")
    assert tree.adopt("packages/x/link.whl", len(data), sha) is None


# -- State -------------------------------------------------------------------------


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    s = State.open(Layout(tmp_path).db)
    yield s
    s.close()


def rfile(path: str, sha: str = "a" * 64) -> ReleaseFile:
    return ReleaseFile(filename=path.rsplit("/", 1)[-1], url=f"https://files.test/{path}", path=path, sha256=sha)


def project(name: str, serial: int, *files: ReleaseFile) -> ProjectSnapshot:
    return ProjectSnapshot(name=NormalizedName(name), display_name=name.title(), serial=Serial(serial), files=files)


def publish(state: State, name: str, serial: int, refs: set[str], now: float = 1000.0) -> list[str]:
    snap = project(name, serial, *(rfile(p) for p in sorted(refs)))
    return state.publish_project(snap, upstream=snap, page_sha256="d" * 64, refs=refs, now=now)


def todo(state: State) -> dict[str, int]:
    return dict(state.iter_todo())


def test_open_is_idempotent(tmp_path: Path) -> None:
    s = State.open(Layout(tmp_path).db)
    s.add_todo({"a": 3}, position=9)
    s.close()
    s2 = State.open(Layout(tmp_path).db)
    try:
        assert todo(s2) == {"a": 3}
        assert s2.serial == 9
    finally:
        s2.close()


def test_add_todo_keeps_max_serial(state: State) -> None:
    state.add_todo({"a": 5, "b": 2})
    state.add_todo({"a": 3, "c": 1})
    assert todo(state) == {"a": 5, "b": 2, "c": 1}
    state.add_todo({"a": 9})
    assert todo(state)["a"] == 9
    assert state.todo_count() == 3


def test_add_todo_sets_position_and_meta(state: State) -> None:
    assert state.serial == 0
    state.add_todo({"a": 5}, position=10, root_etag='"x"')
    assert state.serial == 10
    assert state.meta("root_etag") == '"x"'
    state.add_todo({})
    assert state.serial == 10


def test_synced_serial(state: State) -> None:
    state.set_meta(serial=100)
    assert state.synced_serial() == 100
    state.add_todo({"a": 40, "b": 70})
    assert state.synced_serial() == 39
    publish(state, "a", 40, set())
    assert state.synced_serial() == 69
    publish(state, "b", 70, set())
    assert state.synced_serial() == 100
    # A todo above the feed position cannot push the synced serial past it.
    state.add_todo({"c": 500})
    assert state.synced_serial() == 100


def test_publish_clears_todo_only_up_to_its_serial(state: State) -> None:
    state.add_todo({"a": 10})
    publish(state, "a", 9, set())
    assert todo(state) == {"a": 10}
    publish(state, "a", 10, set())
    assert todo(state) == {}


def test_iter_todo_pages_past_batch(state: State) -> None:
    names = {f"p{i:05d}": i for i in range(2500)}
    state.add_todo(names)
    got = list(state.iter_todo())
    assert len(got) == 2500
    assert dict(got) == names
    assert [n for n, _ in got] == sorted(names)
    small = list(state.iter_todo(batch=7))
    assert small == got


def test_publish_project_refs_and_orphans(state: State) -> None:
    assert publish(state, "a", 1, {"f/1", "f/2", "shared"}) == []
    assert publish(state, "b", 1, {"shared", "f/3"}) == []
    assert state.refs("a") == {"f/1", "f/2", "shared"}

    # "a" drops f/1 (only it referenced it) and "shared" (b still does).
    orphans = publish(state, "a", 2, {"f/2", "f/4"})
    assert sorted(orphans) == ["f/1"]
    assert state.refs("a") == {"f/2", "f/4"}
    assert state.refs("b") == {"shared", "f/3"}
    assert state.retire_count() == 1

    # Re-referencing an orphan takes it off the retirement list.
    assert publish(state, "a", 3, {"f/1", "f/2", "f/4"}) == []
    assert state.retire_count() == 0
    assert state.project("a") == (3, "d" * 64)


def test_remove_project_and_gone(state: State) -> None:
    publish(state, "a", 1, {"f/1", "shared"})
    publish(state, "b", 1, {"shared"})
    state.add_todo({"a": 5})
    orphans = state.remove_project("a")
    assert orphans == ["f/1"]
    assert state.project("a") is None
    assert state.refs("a") == set()
    assert todo(state) == {}
    assert state.gone() == ["a"]
    assert [name for name, _, _ in state.root_entries()] == ["b"]
    assert state.project_count() == 1

    # Removing a project we never published does not mark it gone.
    state.add_todo({"never": 3})
    assert state.remove_project("never") == []
    assert state.gone() == ["a"]
    assert todo(state) == {}

    # Publishing it again takes it off the gone list.
    publish(state, "a", 6, set())
    assert state.gone() == []

    state.remove_project("b")
    assert state.gone() == ["b"]
    state.clear_gone(["b"])
    assert state.gone() == []


def test_record_file_totals(state: State) -> None:
    assert state.tree_totals() == (0, 0)
    state.record_file("f/1", 100, "a" * 64)
    state.record_file("f/2", 50, "b" * 64)
    assert state.tree_totals() == (2, 150)
    # Replacing an existing path counts it once, with its new size.
    state.record_file("f/1", 30, "c" * 64)
    assert state.tree_totals() == (2, 80)
    assert state.known_files(["f/1", "f/2", "f/3"]) == {"f/1": (30, "c" * 64), "f/2": (50, "b" * 64)}


def test_known_files_many_paths(state: State) -> None:
    for i in range(1200):
        state.record_file(f"f/{i}", i, "a" * 64)
    got = state.known_files(f"f/{i}" for i in range(0, 2400, 2))
    assert len(got) == 600
    assert got["f/1198"] == (1198, "a" * 64)


def test_record_file_unretires(state: State) -> None:
    publish(state, "a", 1, {"f/1"})
    publish(state, "a", 2, set())
    assert state.retire_count() == 1
    state.record_file("f/1", 1, "a" * 64)
    assert state.retire_count() == 0


def test_defer_and_failures(state: State) -> None:
    state.add_todo({"a": 3, "b": 4}, position=10)
    state.defer("a", "boom")
    state.defer("a", "boom again")
    assert state.failures() == [("a", 3, 2, "boom again")]
    # A deferred project holds the synced serial back.
    assert state.synced_serial() == 2


def test_snapshot_round_trip(state: State) -> None:
    f1 = ReleaseFile(
        filename="demo-1.0-py3-none-any.whl", url="https://files.test/p/demo-1.0-py3-none-any.whl",
        path="packages/p/demo-1.0-py3-none-any.whl", sha256="a" * 64, size=10, requires_python=">=3.8",
        yanked="bad", upload_time="2024-01-01T00:00:00Z", core_metadata=True, core_metadata_sha256="b" * 64,
        provenance="https://files.test/prov",
    )
    f2 = ReleaseFile(filename="demo-0.9.tar.gz", url="https://files.test/p/demo-0.9.tar.gz",
                     path="packages/p/demo-0.9.tar.gz", sha256="c" * 64, yanked=True)
    snap = ProjectSnapshot(
        name=NormalizedName("demo"), display_name="Demo", serial=Serial(42), files=(f1, f2),
        versions=("0.9", "1.0"), status="archived", status_reason="old", api_version="1.1",
        rejected=(("path", "dropped something"),),
    )
    back = decode_snapshot(encode_snapshot(snap))
    assert back == snap
    assert back.files == (f1, f2)
    assert back.versions == ("0.9", "1.0")
    assert back.rejected == ()

    no_serial = ProjectSnapshot(name=NormalizedName("x"), display_name="x", serial=None)
    assert decode_snapshot(encode_snapshot(no_serial)) == no_serial

    state.publish_project(snap, upstream=snap, page_sha256="e" * 64, refs=set())
    assert state.snapshot("demo") == snap
    assert state.snapshot("missing") is None
