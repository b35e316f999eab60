"""`mirror status`: figures from a real state, read while a sync holds the lock."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mirror import cli
from mirror.publish.lock import DirectoryLock, lock_holder
from mirror.metrics import Metrics
from mirror.publish.state import State
from mirror.ops.status import FailedProject, Status, human_bytes, human_duration, render_text
from mirror.layout import Layout
from tests.harness.e2e import make_config, write_config
from tests.harness.fakepypi import FakePyPI


def status_json(conf: Path, capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    capsys.readouterr()
    assert cli.main(["status", "--config", str(conf), "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


async def test_status_reports_failures_then_recovery(
    upstream: FakePyPI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(3):
        upstream.add_release(f"proj-{i}", "1.0")
    bad = upstream.filenames("proj-1")[0]
    upstream.add_fault("corrupt", match=bad)
    conf = write_config(tmp_path / "mirror.toml", upstream.url, tmp_path / "m")
    cfg = make_config(upstream.url, tmp_path / "m")
    report = await cli.run_sync(cfg, metrics=Metrics())
    assert set(report.failed) == {"proj-1"}

    doc = status_json(conf, capsys)
    state = State.open(Layout(tmp_path / "m").db)
    files, nbytes = state.tree_totals()
    assert files > 0 and (doc["tree_files"], doc["tree_bytes"]) == (files, nbytes)
    assert doc["upstream_serial"] == upstream.serial == doc["serial"]
    assert doc["synced_serial"] == state.synced_serial() < upstream.serial
    assert doc["lag"] == upstream.serial - doc["synced_serial"] > 0
    assert doc["projects"] == 2 and doc["pending"] == 1
    (failed,) = doc["failed"]
    assert failed["name"] == "proj-1" and failed["attempts"] == 1
    assert "hash_mismatch" in failed["error"]
    assert doc["last_success"] is None and doc["last_cycle"] is not None
    assert doc["running"] is False and doc["lock_holder"] is None
    assert doc["pending_retirement"] == 0

    capsys.readouterr()
    assert cli.main(["status", "--config", str(conf)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == f"mirror {tmp_path / 'm'}: 1 project(s) failing"
    assert "last success never" in text
    assert f"lag {doc['lag']:,}" in text
    assert "proj-1" in text and "hash_mismatch" in text

    upstream.clear_faults()
    before = time.time()
    assert (await cli.run_sync(cfg, metrics=Metrics())).failed == {}
    doc = status_json(conf, capsys)
    assert doc["failed"] == [] and doc["pending"] == 0 and doc["lag"] == 0
    assert doc["last_success"] >= before
    assert cli.main(["status", "--config", str(conf)]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(": up to date")


def test_status_answers_while_a_sync_holds_the_lock(upstream: FakePyPI, tmp_path: Path) -> None:
    for i in range(4):
        upstream.add_release(f"proj-{i}", "1.0")
    # One file hangs, so the sync is mid-cycle, holding the lock and with
    # its database open, while status runs.
    upstream.add_fault("slow", match=upstream.filenames("proj-3")[0], delay=4.0)
    conf = write_config(tmp_path / "mirror.toml", upstream.url, tmp_path / "m")
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
    sync = subprocess.Popen(
        [sys.executable, "-m", "mirror", "sync", "--config", str(conf)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )
    try:
        deadline = time.monotonic() + 30
        lock = tmp_path / "m" / "state" / "lock"
        while lock_holder(lock) is None or not (tmp_path / "m/state/mirror.sqlite3").exists():
            assert sync.poll() is None and time.monotonic() < deadline, "sync never took the lock"
            time.sleep(0.05)
        # Wait until the feed is recorded, so there is something to report.
        while True:
            r = subprocess.run(
                [sys.executable, "-m", "mirror", "status", "--config", str(conf), "--json"],
                capture_output=True, text=True, timeout=30, env=env,
            )
            assert r.returncode == 0, r.stderr
            doc = json.loads(r.stdout)
            if doc["serial"] > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert sync.poll() is None, "the sync finished before status could be checked"
        assert doc["running"] is True and doc["lock_holder"] == str(sync.pid)
        assert doc["serial"] == upstream.serial and doc["pending"] >= 1
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "mirror", "status", "--config", str(conf)],
            capture_output=True, text=True, timeout=30, env=env,
        )
        assert r.returncode == 0 and f"running (pid {sync.pid})" in r.stdout, r.stdout + r.stderr
        assert time.monotonic() - t0 < 10
    finally:
        _, err = sync.communicate(timeout=60)
    assert sync.returncode == 0, err.decode()


def test_status_without_state_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = write_config(tmp_path / "mirror.toml", "http://127.0.0.1:9", tmp_path / "never-synced")
    assert cli.main(["status", "--config", str(conf)]) == 1
    err = capsys.readouterr().err
    assert "no mirror state at" in err and "Traceback" not in err
    assert not (tmp_path / "never-synced").exists()  # status created nothing


def _status(**kw: object) -> Status:
    base: dict[str, object] = dict(
        directory="/srv/pypi", serial=1000, synced_serial=990, upstream_serial=1010,
        last_success=None, last_cycle=None, projects=1234, pending=0, tree_files=5_000_000,
        tree_bytes=25_300_000_000_000, pending_retirement=7, lock_holder=None,
    )
    base.update(kw)
    return Status(**base)  # type: ignore[arg-type]


def test_render_text_layout() -> None:
    now = 1_800_000_000.0
    failed = [FailedProject(f"p{i:02d}", 990 + i, i + 1, f"line one\nline two {'x' * 200}") for i in range(25)]
    s = _status(failed=failed, pending=40, pending_sample=["a", "b"], lock_holder="4242",
                last_success=now - 3725, last_cycle=now - 65)
    text = render_text(s, now=now)
    lines = text.splitlines()
    assert lines[0] == "mirror /srv/pypi: 25 project(s) failing"
    assert "  process      running (pid 4242)" in lines
    assert "  serial       990 published (upstream 1,010, lag 20)" in lines
    assert any(line.startswith("  last success 1h02m ago (") for line in lines)
    assert any(line.startswith("  last cycle   started 1m05s ago (") for line in lines)
    assert "  projects     1,234 published, 40 pending, 25 failing" in lines
    assert "  tree         5,000,000 files, 25.3 TB" in lines
    errors = [line for line in lines if re.match(r"  p\d\d ", line)]
    assert len(errors) == 20 and all(len(line) < 140 and "line one line two" in line for line in errors)
    assert "  p01  2 attempts   line one line two xx" in text
    assert "  ... and 5 more (--json lists all)" in lines
    assert lines[-1] == "pending: a, b and 13 more"

    fresh = render_text(_status(upstream_serial=None), now=now)
    assert fresh.splitlines()[0] == "mirror /srv/pypi: never synced"
    assert "upstream unknown" in fresh and "last success never" in fresh
    synced = _status(last_cycle=now - 5, last_success=now - 1, upstream_serial=990)
    assert render_text(synced, now=now).splitlines()[0] == "mirror /srv/pypi: up to date"
    assert _status().to_json()["lag"] == 20


@pytest.mark.parametrize(
    ("n", "text"), [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (2_897, "2.9 kB"), (300_900_000, "300.9 MB"),
                    (25_300_000_000_000, "25.3 TB"), (4 * 10**15, "4000.0 TB")],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    ("s", "text"), [(-3, "0s"), (59.9, "59s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"),
                    (86399, "23h59m"), (90000, "1d01h")],
)
def test_human_duration(s: float, text: str) -> None:
    assert human_duration(s) == text


def test_status_probes_never_make_a_starting_sync_fail(tmp_path: Path) -> None:
    """`mirror status` run in a loop (a monitoring probe) must not make a
    starting `mirror sync` / `mirror run` exit with "lock held"."""
    lock = tmp_path / "state" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    probe = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from pathlib import Path\n"
         "from mirror.publish.lock import lock_holder\n"
         "lock, n, end = Path(sys.argv[1]), 0, time.monotonic() + 20\n"
         "print('go', flush=True)\n"
         "while time.monotonic() < end:\n"
         "    lock_holder(lock)\n"
         "    n += 1\n",
         str(lock)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert probe.stdout is not None and probe.stdout.readline() == "go\n"
        for _ in range(300):
            with DirectoryLock(lock):
                assert lock_holder(lock) == str(os.getpid())
    finally:
        probe.kill()
        probe.communicate()
    assert lock_holder(lock) is None
