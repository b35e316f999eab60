"""Full and read-only disks.

A disk error during a download or a publish leaves nothing partial visible,
stops the cycle with exit code 5 and one clear line (never a traceback),
raises ``mirror_download_errors_total{reason="disk"}``, and the next run
after space is back completes the mirror.

Where the machine allows it (root, ``mount`` works) a real, tiny tmpfs fills
up; everywhere, ``OSError(ENOSPC/EROFS)`` is injected at the tree layer, the
download sink and the state database.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import mirror.publish.state
from mirror import cli
from mirror.fetch import attempt as download
from mirror.publish import tree
from tests.harness.daemonproc import DaemonProcess, wait_until
from tests.harness.e2e import write_config
from tests.harness.fakepypi import FakePyPI, make_blob_file
from tests.harness.reliability import check_published, foreign_files, mirror_problems, snapshot_fs, upstream_files


def _fill(up: FakePyPI, projects: int, blob: int) -> None:
    for i in range(projects):
        up.add_release(f"proj{i}", "1.0")
        up.add_file(f"proj{i}", "1.0", make_blob_file(f"proj{i}-blob", "1.0", blob, seed=i))


def _metric(textfile: Path, sample: str) -> float:
    for line in textfile.read_text().splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not in {textfile}")


DISK = 'mirror_download_errors_total{reason="disk"}'


def _run(conf: Path, textfile: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(["sync", "--config", str(conf), "--metrics-textfile", str(textfile)])
    return rc, capsys.readouterr().err


# -- a real tiny filesystem -----------------------------------------------------


def _can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    if not _can_mount():
        pytest.skip("needs root and mount(8) for a real tmpfs")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(mnt)], check=True)


@pytest.mark.slow
def test_real_full_disk_stops_cleanly_and_recovers(upstream: FakePyPI, tiny_fs: Path, tmp_path: Path) -> None:
    _fill(upstream, 12, 150_000)  # ~1.8 MB of files for a 1 MB filesystem
    directory = tiny_fs / "m"
    conf = write_config(tmp_path / "mirror.toml", upstream.url, directory, mirror={"workers": 4})
    textfile = tmp_path / "metrics.prom"
    around = snapshot_fs(tmp_path)

    r = subprocess.run([sys.executable, "-m", "mirror", "sync", "--config", str(conf),
                        "--metrics-textfile", str(textfile)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 5, r.stderr[-2000:]
    # Whichever write hits the wall first: a file, a page, or SQLite's journal.
    assert "No space left on device" in r.stderr or "database or disk is full" in r.stderr
    assert "Traceback" not in r.stderr
    assert _metric(textfile, DISK) >= 1
    web = directory / "web"
    assert check_published(web) == [] and foreign_files(web, upstream_files(upstream)) == []
    assert os.listdir(directory / "state" / "tmp") == []

    _remount(tiny_fs, "size=64m")
    r = subprocess.run([sys.executable, "-m", "mirror", "sync", "--config", str(conf)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert mirror_problems(web, upstream) == []
    # Nothing was written next to the mirror (the textfile is ours).
    assert {p for p in snapshot_fs(tmp_path) - around if not p.startswith("fs/m")} == {"metrics.prom"}


@pytest.mark.slow
def test_real_full_disk_the_daemon_backs_off_and_resumes(upstream: FakePyPI, tiny_fs: Path, tmp_path: Path) -> None:
    """`mirror run` on a disk that fills up: cycles fail with a one-line
    DiskError and back off; once the filesystem grows, the same process
    finishes the mirror without a restart."""
    _fill(upstream, 12, 150_000)
    directory = tiny_fs / "m"
    conf = write_config(tmp_path / "mirror.toml", upstream.url, directory, mirror={"workers": 4},
                        daemon={"poll_interval": 0.2, "max_backoff": 1.0}, metrics={"listen": ""})
    with DaemonProcess(conf) as daemon:
        daemon.wait_log(r"cycle failed \(2 in a row\), retrying in \d+s: DiskError: ", timeout=60)
        assert "Traceback" not in daemon.log
        web = directory / "web"
        assert check_published(web) == [] and foreign_files(web, upstream_files(upstream)) == []
        _remount(tiny_fs, "size=64m")
        wait_until(lambda: not mirror_problems(web, upstream), 60, "the daemon to finish the mirror")
        daemon.signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    assert os.listdir(directory / "state" / "tmp") == []


@pytest.mark.slow
def test_real_read_only_disk_is_a_clear_error(upstream: FakePyPI, tiny_fs: Path, tmp_path: Path) -> None:
    _fill(upstream, 2, 1000)
    directory = tiny_fs / "m"
    conf = write_config(tmp_path / "mirror.toml", upstream.url, directory)
    assert cli.main(["sync", "--config", str(conf)]) == 0
    upstream.add_release("proj0", "2.0")
    _remount(tiny_fs, "ro")
    r = subprocess.run([sys.executable, "-m", "mirror", "sync", "--config", str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 5, r.stderr
    assert "Read-only file system" in r.stderr and "Traceback" not in r.stderr
    _remount(tiny_fs, "rw")
    assert cli.main(["sync", "--config", str(conf)]) == 0
    assert mirror_problems(directory / "web", upstream) == []


# -- injected faults --------------------------------------------------------------


class Injector:
    """Fails the n-th and later calls of a function with an OSError while armed."""

    def __init__(self, err: int, after: int = 0, match: Callable[[tuple[Any, ...]], bool] = lambda a: True) -> None:
        self.err = err
        self.after = after
        self.match = match
        self.calls = 0
        self.armed = True
        self.fired = 0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kw: Any) -> Any:
            if self.armed and self.match(args):
                self.calls += 1
                if self.calls > self.after:
                    self.fired += 1
                    raise OSError(self.err, os.strerror(self.err))
            return fn(*args, **kw)
        return wrapper


def _under(directory: Path) -> Callable[[tuple[Any, ...]], bool]:
    return lambda args: any(str(a).startswith(str(directory)) for a in args)


SITES: dict[str, tuple[int, str]] = {
    # where -> (errno, what the operator reads)
    "download": (errno.ENOSPC, "No space left on device"),
    "publish": (errno.EROFS, "Read-only file system"),
    "pages": (errno.ENOSPC, "No space left on device"),
    "root": (errno.ENOSPC, "No space left on device"),
}


@pytest.mark.parametrize("site", sorted(SITES))
def test_injected_disk_error_stops_cleanly_and_recovers(
    site: str, upstream: FakePyPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    _fill(upstream, 10, 3000)
    directory = tmp_path / "m"
    conf = write_config(tmp_path / "mirror.toml", upstream.url, directory, mirror={"workers": 4})
    textfile = tmp_path / "metrics.prom"
    err, message = SITES[site]
    web = directory / "web"
    if site == "download":
        inj = Injector(err, after=5)
        monkeypatch.setattr(download._Sink, "_write", inj.wrap(download._Sink._write))
    elif site == "publish":
        inj = Injector(err, after=5, match=lambda a: "/packages/" in str(a[1]))
        monkeypatch.setattr(tree.os, "replace", inj.wrap(os.replace))
    elif site == "pages":
        inj = Injector(err, after=3, match=lambda a: "/simple/" in str(a[1]))
        monkeypatch.setattr(tree.os, "replace", inj.wrap(os.replace))
    else:
        inj = Injector(err, match=lambda a: str(a[1]).endswith("simple/index.v1_json"))
        monkeypatch.setattr(tree.os, "replace", inj.wrap(os.replace))

    rc, out = _run(conf, textfile, capsys)
    assert inj.fired >= 1
    assert rc == 5, out
    assert message in out and "Traceback" not in out
    assert _metric(textfile, DISK) >= 1
    assert check_published(web) == [] and foreign_files(web, upstream_files(upstream)) == []
    assert os.listdir(directory / "state" / "tmp") == []

    inj.armed = False  # space is back
    rc, out = _run(conf, textfile, capsys)
    assert rc == 0, out
    assert mirror_problems(web, upstream) == []
    # Nothing changed upstream since, yet the root lists every project.
    rc, out = _run(conf, textfile, capsys)
    assert rc == 0 and mirror_problems(web, upstream) == []


def test_full_state_database_is_a_disk_error(
    upstream: FakePyPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """SQLite reports a full disk as "database or disk is full" (SQLITE_FULL)."""
    _fill(upstream, 40, 100)
    directory = tmp_path / "m"
    conf = write_config(tmp_path / "mirror.toml", upstream.url, directory)
    textfile = tmp_path / "metrics.prom"
    real_open = mirror.publish.state.State.open
    limit = {"on": True}

    def small_open(state_dir: Path) -> mirror.publish.state.State:
        st = real_open(state_dir)
        if limit["on"]:
            (pages,) = st.db.execute("PRAGMA page_count").fetchone()
            st.db.execute(f"PRAGMA max_page_count={pages + 3}")
        return st

    monkeypatch.setattr(mirror.publish.state.State, "open", small_open)
    rc, out = _run(conf, textfile, capsys)
    assert rc == 5, out
    assert "database or disk is full" in out and "Traceback" not in out
    assert _metric(textfile, DISK) >= 1
    assert check_published(directory / "web") == []
    db = sqlite3.connect(directory / "state" / "mirror.sqlite3")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    limit["on"] = False
    rc, out = _run(conf, textfile, capsys)
    assert rc == 0, out
    assert mirror_problems(directory / "web", upstream) == []
