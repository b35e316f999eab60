"""The progress line of `mirror sync`: on a terminal only, never in a log."""

from __future__ import annotations

import io
import logging
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mirror.ops.progress import ProgressLine, terminal_progress, wanted
from tests.harness.e2e import write_config
from tests.harness.fakepypi import FakePyPI


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_progress_line_figures_and_throttling() -> None:
    out, clock = io.StringIO(), Clock()
    line = ProgressLine(out, clock=clock, interval=0.5, width=200)
    line("projects", 0, 10)
    assert out.getvalue() == "\rprojects 0/10  files 0/0  0 B  0.0 MB/s\x1b[K"
    clock.t += 0.1
    line("files", 1, 4)  # within the interval: not drawn
    assert out.getvalue().count("\r") == 1
    clock.t += 1.9  # 2 s after the start
    line("projects", 4, 10)
    line("bytes", 20_000_000, 0)  # same instant: only the first event draws
    assert "projects 4/10  files 1/4  0 B" in out.getvalue()
    clock.t += 0.5
    line("bytes", 20_000_000, 0)
    drawn = out.getvalue().split("\r")[-1]
    # 20 MB in 2.5 s; 4 of 10 projects in 2.5 s leaves 3.75 s.
    assert drawn == "projects 4/10  files 1/4  20.0 MB  8.0 MB/s  ETA 3s\x1b[K"
    # The rate follows the last RATE_WINDOW seconds, not the whole run.
    for _ in range(30):
        clock.t += 1
        line("bytes", line.bytes + 1_000_000, 0)
    assert line.rate(clock.t) == pytest.approx(1_000_000, rel=0.15)
    line.close()
    assert out.getvalue().endswith("\n")


def test_progress_line_never_wraps() -> None:
    out = io.StringIO()
    line = ProgressLine(out, clock=Clock(), width=30)
    line("projects", 123_456, 600_000)
    assert len(out.getvalue().split("\r")[-1].replace("\x1b[K", "")) <= 29


def test_log_records_are_printed_on_a_clean_line() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(message)s"))
    line = ProgressLine(out, clock=Clock(), interval=0)
    handler.addFilter(line.log_filter())
    logger = logging.getLogger("test-progress")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        line("projects", 1, 2)
        logger.warning("pkg-1: deferred")
        line("projects", 2, 2)
    finally:
        logger.removeHandler(handler)
    text = out.getvalue()
    assert "\x1b[K\r\x1b[Kpkg-1: deferred\n\rprojects 2/2" in text


def test_wanted_only_for_a_terminal_outside_systemd() -> None:
    assert not wanted(io.StringIO(), {})
    master, slave = pty.openpty()
    try:
        with open(slave, "w", closefd=False) as tty:
            assert wanted(tty, {})
            assert not wanted(tty, {"JOURNAL_STREAM": "8:1234"})
            assert not wanted(tty, {"INVOCATION_ID": "abc"})
            assert not wanted(tty, {"TERM": "dumb"})
    finally:
        os.close(master)
        os.close(slave)
    with terminal_progress(io.StringIO()) as line:
        assert line is None


def _sync_stderr(conf: Path, *, tty: bool, extra_env: dict[str, str]) -> str:
    """Run `mirror sync` with stderr on a pseudo-terminal or a pipe; return what it printed."""
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "INVOCATION_ID")}
    env.update(extra_env, TERM="xterm")
    args = [sys.executable, "-m", "mirror", "sync", "--config", str(conf)]
    if not tty:
        r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        proc.wait(timeout=30)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_sync_shows_progress_on_a_terminal_only(upstream: FakePyPI, tmp_path: Path) -> None:
    for i in range(3):
        upstream.add_release(f"proj-{i}", "1.0")
    shown = _sync_stderr(write_config(tmp_path / "a.toml", upstream.url, tmp_path / "a"), tty=True, extra_env={})
    final = shown.split("\r")
    assert any(s.startswith("projects 3/3  files 9/9  ") and "MB/s" in s for s in final), shown
    assert "sync done" in shown
    # Same sync, but stderr is a pipe, or the journal under systemd: log only.
    piped = _sync_stderr(write_config(tmp_path / "b.toml", upstream.url, tmp_path / "b"), tty=False, extra_env={})
    journal = _sync_stderr(
        write_config(tmp_path / "c.toml", upstream.url, tmp_path / "c"), tty=True, extra_env={"INVOCATION_ID": "x"}
    )
    for text in (piped, journal):
        assert "sync done" in text and "projects 3/3" not in text and "\x1b[K" not in text
