"""`mirror pull`: a secondary copies the primary's web/ through a real rsync daemon."""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import trio

from mirror import layout
from mirror import cli
from mirror.downstream import changes
from mirror.downstream import pull
from mirror.config import Config
from mirror.errors import PullError
from mirror.publish.lock import DirectoryLock
from mirror.metrics import Metrics
from mirror.downstream.rsync import Result, Rsync
from mirror.downstream.trace import parse_trace
from mirror.layout import PullLayout
from tests.harness.consistency import check_tree
from tests.harness.e2e import make_config
from tests.harness.fakepypi import FakePyPI
from tests.harness.rsyncd import rsync_daemon

PAGES = ("index.html", "index.v1_html", "index.v1_json")


async def sync(cfg: Config) -> cli.CycleReport:
    report = await cli.run_sync(cfg, metrics=Metrics())
    assert report.failed == {} and not report.blocked
    return report


def served(web: Path) -> dict[str, bytes]:
    """What a client of this tree sees (our own bookkeeping left out)."""
    return {
        p.relative_to(web).as_posix(): p.read_bytes()
        for p in web.rglob("*")
        if p.is_file() and not p.relative_to(web).as_posix().startswith((".~pull~/", "trace/"))
    }


def pkg_paths(up: FakePyPI, name: str, filenames: Sequence[str]) -> set[str]:
    out = {up.file_path(name, f).lstrip("/") for f in filenames}
    return out | {p + ".metadata" for p in out if p.endswith(".whl")}


class Primary:
    def __init__(self, upstream: FakePyPI, tmp_path: Path, **mirror: str) -> None:
        self.cfg = make_config(upstream.url, tmp_path / "m", mirror={"name": "primary", **mirror})
        self.web = self.cfg.mirror.directory / "web"


@pytest.fixture
def primary(upstream: FakePyPI, tmp_path: Path) -> Primary:
    return Primary(upstream, tmp_path)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """Start an rsync daemon serving a given web/ (at most one per test)."""
    started: list[object] = []

    def start(web: Path) -> str:
        web.mkdir(parents=True, exist_ok=True)
        cm = rsync_daemon(web, tmp_path / "rsyncd")
        started.append(cm)
        return cm.__enter__()

    yield start
    for cm in started:
        cm.__exit__(None, None, None)  # type: ignore[attr-defined]


async def first_pull(
    upstream: FakePyPI, primary: Primary, daemon: Callable[[Path], str], tmp_path: Path, projects: int
) -> tuple[str, Path, pull.PullReport]:
    """Publish ``projects`` projects, serve them with rsync, pull them once."""
    for i in range(projects):
        upstream.add_release(f"pkg-{i}", "1.0")
    await sync(primary.cfg)
    source = daemon(primary.web)
    dest = tmp_path / "second"
    return source, dest, await pull.pull(source, dest, name="second")


async def test_pull_copies_everything_then_only_what_changed(
    upstream: FakePyPI, primary: Primary, daemon: Callable[[Path], str], tmp_path: Path
) -> None:
    source, dest, r = await first_pull(upstream, primary, daemon, tmp_path, 4)
    assert r.mode == "full" and r.source_trace == "primary"
    assert check_tree(dest) == []
    assert served(dest) == served(primary.web)
    ours = parse_trace((dest / "trace/second").read_bytes())
    theirs = parse_trace((primary.web / "trace/primary").read_bytes())
    assert (ours["Epoch"], ours["Generation"], ours["Serial"]) == (theirs["Epoch"], theirs["Generation"], theirs["Serial"])
    assert ours["Upstream"] == source and (dest / "trace/primary").read_bytes() == (primary.web / "trace/primary").read_bytes()

    # One small cycle upstream: the pull moves exactly its files and pages.
    new = upstream.add_release("pkg-1", "2.0")
    await sync(primary.cfg)
    r = await pull.pull(source, dest, name="second")
    assert r.mode == "lists"
    assert sorted(r.files) == sorted(pkg_paths(upstream, "pkg-1", new))
    # The set of projects did not change: only the JSON root was rewritten.
    assert set(r.pages) == {f"simple/pkg-1/{p}" for p in PAGES} | {"simple/index.v1_json", "last-modified"}
    assert r.closure == [] and r.deleted == []
    assert check_tree(dest) == [] and served(dest) == served(primary.web)

    # Nothing new: nothing but the trace is read.
    r = await pull.pull(source, dest, name="second")
    assert r.mode == "up-to-date" and r.files == r.pages == []


async def test_pull_propagates_retirement_and_removal(
    upstream: FakePyPI, tmp_path: Path, daemon: Callable[[Path], str]
) -> None:
    primary = Primary(upstream, tmp_path, retire_after="1s")
    upstream.add_release("keep", "1.0")
    upstream.add_release("demo", "1.0")
    upstream.add_release("demo", "2.0")
    upstream.add_release("doomed", "1.0")
    await sync(primary.cfg)
    old = pkg_paths(upstream, "demo", [f for f in upstream.filenames("demo") if "-1.0" in f])
    doomed = pkg_paths(upstream, "doomed", upstream.filenames("doomed"))
    source = daemon(primary.web)
    dest = tmp_path / "second"
    await pull.pull(source, dest, name="second")
    upstream.remove_release("demo", "1.0")
    upstream.remove_project("doomed")
    await sync(primary.cfg)
    r = await pull.pull(source, dest, name="second")
    # Pages are gone; files are kept for the grace period, here as there.
    assert set(r.deleted) == {f"simple/doomed/{p}" for p in PAGES}
    assert all((dest / p).is_file() for p in old | doomed)
    assert check_tree(dest) == []
    await trio.sleep(1.2)
    report = await sync(primary.cfg)
    assert report.files_deleted == len(old | doomed)
    r = await pull.pull(source, dest, name="second")
    assert r.mode == "lists" and set(r.deleted) == old | doomed
    assert not any((dest / p).parent.exists() for p in old | doomed)
    assert [d for d in dest.rglob("*") if d.is_dir() and not any(d.iterdir()) and ".~pull~" not in d.parts] == []
    assert check_tree(dest) == [] and served(dest) == served(primary.web)


async def test_full_pull_when_lists_do_not_cover_us(
    upstream: FakePyPI, primary: Primary, daemon: Callable[[Path], str], tmp_path: Path
) -> None:
    source, dest, _ = await first_pull(upstream, primary, daemon, tmp_path, 3)
    # Leftovers a secondary may hold: a file and a project the source dropped.
    (dest / "packages/zz/old.tar.gz").parent.mkdir(parents=True)
    (dest / "packages/zz/old.tar.gz").write_bytes(b"x")
    shutil.copytree(dest / "simple/pkg-0", dest / "simple/stale")
    upstream.add_release("pkg-2", "2.0")
    await sync(primary.cfg)
    # The lists we would need are gone (expired on the primary).
    for p in (primary.web / "changes").glob("0000000002-*"):
        p.unlink()
    r = await pull.pull(source, dest, name="second")
    assert r.mode == "full"
    assert "packages/zz/old.tar.gz" in r.deleted and {f"simple/stale/{p}" for p in PAGES} <= set(r.deleted)
    assert check_tree(dest) == [] and served(dest) == served(primary.web)


class HookedRsync(Rsync):
    """Runs ``hook(what)`` after each rsync step: lets a test act between stages."""

    def __init__(self, hook: Callable[[str, Path], object]) -> None:
        super().__init__()
        self.hook = hook
        self.steps: list[str] = []

    async def run(self, args: Sequence[str], *, what: str, source: str = "", ok: object = (0,)) -> Result:
        res = await super().run(args, what=what, source=source, ok=ok)  # type: ignore[arg-type]
        self.steps.append(what)
        out = self.hook(what, Path(args[-1]))
        if inspect.isawaitable(out):
            await out
        return res


@pytest.mark.parametrize("mode", ["lists", "full"])
async def test_pages_newer_than_stage_one_get_their_files(
    upstream: FakePyPI, primary: Primary, daemon: Callable[[Path], str], tmp_path: Path, mode: str
) -> None:
    """The primary publishes a cycle between stage 1 and stage 2 of a pull."""
    source, dest, _ = await first_pull(upstream, primary, daemon, tmp_path, 1)
    name = "second" if mode == "lists" else "other"
    upstream.add_release("pkg-0", "2.0")
    await sync(primary.cfg)
    late: list[str] = []

    async def hook(what: str, target: Path) -> None:
        if what.startswith("stage 1") and not late:
            late.extend(upstream.add_release("pkg-0", "3.0"))
            upstream.add_release("newcomer", "1.0")
            await sync(primary.cfg)

    r = await pull.pull(source, dest, name=name, rsync=HookedRsync(hook))
    assert r.mode == mode and late
    expected = pkg_paths(upstream, "pkg-0", late)
    assert expected <= set(r.closure) | set(r.files)
    if mode == "lists":
        assert expected <= set(r.closure)
    assert check_tree(dest) == []


async def test_incoherent_copies_of_a_page_are_fetched_again(
    upstream: FakePyPI, primary: Primary, daemon: Callable[[Path], str], tmp_path: Path
) -> None:
    source, dest, _ = await first_pull(upstream, primary, daemon, tmp_path, 1)
    upstream.add_release("pkg-0", "2.0")
    await sync(primary.cfg)
    torn: list[str] = []

    def hook(what: str, target: Path) -> None:
        # As if rsync read index.html before the primary's rewrite and
        # index.v1_json after it: the copies disagree.
        page = dest / ".~pull~/stage/simple/pkg-0/index.html"
        if what.startswith("stage 2") and page.exists() and not torn:
            torn.append(what)
            page.write_bytes(page.read_bytes().replace(b"2.0", b"9.9"))

    rsync = HookedRsync(hook)
    r = await pull.pull(source, dest, name="second", rsync=rsync)
    assert torn and "stage 2 (pages again)" in rsync.steps
    assert "simple/pkg-0/index.html" in r.pages and check_tree(dest) == []
    assert (dest / "simple/pkg-0/index.html").read_bytes() == (primary.web / "simple/pkg-0/index.html").read_bytes()


async def test_pull_errors_are_clear(tmp_path: Path, daemon: Callable[[Path], str]) -> None:
    empty = tmp_path / "empty-web"
    source = daemon(empty)
    with pytest.raises(PullError, match="trace/"):
        await pull.pull(source, tmp_path / "d", name="second")
    with pytest.raises(PullError, match="rsync exited"):
        await pull.pull("rsync://127.0.0.1:1/nothing/", tmp_path / "d", name="second",
                        rsync=Rsync(timeout=5))
    with pytest.raises(PullError, match="not found"):
        await pull.pull(source, tmp_path / "d", name="second", rsync=Rsync("/nonexistent/rsync"))


def test_pull_cli(upstream: FakePyPI, primary: Primary, tmp_path: Path, daemon: Callable[[Path], str],
                  capsys: pytest.CaptureFixture[str]) -> None:
    upstream.add_release("pkg-0", "1.0")
    trio.run(sync, primary.cfg)
    source = daemon(primary.web)
    dest = tmp_path / "second"
    capsys.readouterr()
    assert cli.main(["pull", source, str(dest), "--name", "second"]) == 0
    assert "pull: full" in capsys.readouterr().err
    assert check_tree(dest) == []
    assert cli.main(["pull", source, str(dest), "--name", "second"]) == 0
    assert "up to date at generation 1" in capsys.readouterr().err
    assert cli.main(["pull", source.replace("/pypi/", "/nope/"), str(dest), "--name", "x"]) == 4
    err = capsys.readouterr().err
    assert "Unknown module" in err and "Traceback" not in err
    assert cli.main(["pull", source, str(dest), "--name", "../evil"]) == 2
    # The index every pull reads is there on the primary.
    assert changes.parse_index((primary.web / layout.CHANGES_INDEX).read_bytes())[1]


async def test_a_huge_cycle_makes_secondaries_copy_everything(
    upstream: FakePyPI, primary: Primary, daemon: Callable[[Path], str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source, dest, _ = await first_pull(upstream, primary, daemon, tmp_path, 1)
    monkeypatch.setattr(changes, "MAX_ENTRIES", 5)
    for i in range(3):
        upstream.add_release(f"many-{i}", "1.0")
    await sync(primary.cfg)
    cl = changes.parse_list((primary.web / parse_trace((primary.web / "trace/primary").read_bytes())["Changes"]).read_bytes())
    assert not cl.complete and cl.entries == ()
    r = await pull.pull(source, dest, name="second")
    assert r.mode == "full" and check_tree(dest) == [] and served(dest) == served(primary.web)


@pytest.mark.slow
def test_killed_pulls_leave_the_secondary_consistent(
    upstream: FakePyPI, primary: Primary, daemon: Callable[[Path], str], tmp_path: Path
) -> None:
    for i in range(15):
        upstream.add_release(f"pkg-{i}", "1.0", provenance=(i % 3 == 0))
    trio.run(sync, primary.cfg)
    source = daemon(primary.web)
    dest = tmp_path / "second"
    cmd = [sys.executable, "-m", "mirror", "pull", source, str(dest), "--name", "second"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    for i in range(15):
        upstream.add_release(f"pkg-{i}", "2.0")
    upstream.remove_project("pkg-14")
    trio.run(sync, primary.cfg)
    killed = 0
    for delay in (0.15, 0.3, 0.45, 0.6, 0.75, 0.9):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed += 1
        proc.wait(timeout=60)
        assert check_tree(dest) == [], f"inconsistent after a kill at {delay}s"
    assert killed >= 3
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    assert check_tree(dest) == [] and served(dest) == served(primary.web)


async def test_a_secondary_feeds_another_from_a_local_path(
    upstream: FakePyPI, primary: Primary, daemon: Callable[[Path], str], tmp_path: Path
) -> None:
    source, second, _ = await first_pull(upstream, primary, daemon, tmp_path, 2)
    third = tmp_path / "third"
    r = await pull.pull(f"{second}/", third, name="third")
    assert r.mode == "full" and r.source_trace == "second" and check_tree(third) == []
    new = upstream.add_release("pkg-0", "2.0")
    await sync(primary.cfg)
    await pull.pull(source, second, name="second")
    r = await pull.pull(str(second), third, name="third")
    # The secondary's copy of the change lists serves the next site down.
    assert r.mode == "lists" and sorted(r.files) == sorted(pkg_paths(upstream, "pkg-0", new))
    assert check_tree(third) == [] and served(third) == served(primary.web)


async def test_a_page_rewritten_in_the_same_second_at_the_same_size_is_copied(tmp_path: Path) -> None:
    # rsync's quick check compares whole seconds by default; pages are
    # rewritten in place, often within a second and at the same size.
    src, dst = tmp_path / "src", tmp_path / "dst"
    for root, body, offset in ((src, b"new!", 600_000_000), (dst, b"old!", 100_000_000)):
        page = root / "simple/a/index.html"
        page.parent.mkdir(parents=True)
        page.write_bytes(body)
        t = (int(time.time()) - 10) * 10**9 + offset
        os.utime(page, ns=(t, t))
    res = await Rsync().fetch_list(f"{src}/", ["simple/a/index.html"], dst, listfile=tmp_path / "list",
                                   temp_dir=tmp_path, what="test")
    assert res.received == ["simple/a/index.html"]
    assert (dst / "simple/a/index.html").read_bytes() == b"new!"


@pytest.mark.parametrize("has_fsync", [True, False])
async def test_received_files_are_fsynced_when_rsync_can(
    tmp_path: Path, has_fsync: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    real = shutil.which("rsync")
    assert real is not None
    calls = tmp_path / "calls"
    help_text = "echo ' --fsync                  fsync every written file'" if has_fsync else "echo 'rsync  version 3.1.3'"
    fake = tmp_path / "rsync"
    fake.write_text(f"""#!/bin/sh
if [ "$1" = "--help" ]; then {help_text}; exit 0; fi
echo "$@" >> {calls}
exec {real} "$@"
""")
    fake.chmod(0o755)
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "packages/a").mkdir(parents=True)
    (src / "packages/a/x.whl").write_bytes(b"wheel")
    rsync = Rsync(str(fake))
    for _ in range(2):
        res = await rsync.fetch_list(f"{src}/", ["packages/a/x.whl"], dst, listfile=tmp_path / "list",
                                     temp_dir=tmp_path, what="test", always=True)
        assert res.received == ["packages/a/x.whl"]
    assert (dst / "packages/a/x.whl").read_bytes() == b"wheel"
    runs = calls.read_text().splitlines()
    assert len(runs) == 2 and all(("--fsync" in r.split()) == has_fsync for r in runs)
    # Asked once per Rsync, and an rsync without the option is named once.
    assert caplog.text.count("has no --fsync") == (0 if has_fsync else 1)


def test_a_local_disk_error_is_one_clear_line(
    upstream: FakePyPI, primary: Primary, tmp_path: Path, daemon: Callable[[Path], str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    upstream.add_release("pkg-0", "1.0")
    trio.run(sync, primary.cfg)
    source = daemon(primary.web)
    dest = tmp_path / "second"
    (dest / "trace").mkdir(parents=True)
    (dest / "trace" / "second").mkdir()  # where our trace must go: not a file
    capsys.readouterr()  # a handler an earlier cli.main left on a closed stream may have complained
    assert cli.main(["pull", source, str(dest), "--name", "second"]) == 5
    err = capsys.readouterr().err
    assert "trace/second" in err and "Traceback" not in err
    assert check_tree(dest) == []
    with DirectoryLock(PullLayout(dest).lock):  # another pull is running
        assert cli.main(["pull", source, str(dest), "--name", "other"]) == 3


def test_a_trace_with_this_hosts_own_name_is_named_in_the_error(
        upstream: FakePyPI, tmp_path: Path, daemon: Callable[[Path], str], capsys: pytest.CaptureFixture[str]) -> None:
    """Primary and secondary on one host (or containers with one host name):
    the primary's trace carries the name the secondary defaults to."""
    upstream.add_release("pkg-0", "1.0")
    cfg = make_config(upstream.url, tmp_path / "p", mirror={"name": "samehost"})
    trio.run(sync, cfg)
    source = daemon(cfg.mirror.directory / "web")
    capsys.readouterr()
    assert cli.main(["pull", source, str(tmp_path / "second"), "--name", "samehost"]) == 4
    err = capsys.readouterr().err
    assert "trace/samehost" in err and "--name" in err and "Traceback" not in err, err
    assert cli.main(["pull", source, str(tmp_path / "second"), "--name", "other"]) == 0
