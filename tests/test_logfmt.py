"""Log lines under journald carry their syslog priority (``<N>``), and only
when stderr really is the journal stream."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from mirror.logfmt import (
    JournalFormatter,
    formatter_for,
    is_journal_stream,
    stderr_is_journal,
    syslog_priority,
)


def record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("mirror.x", level, __file__, 1, msg, None, None)


def test_priorities() -> None:
    assert [syslog_priority(n) for n in (50, 40, 30, 20, 10, 5)] == [3, 3, 4, 6, 7, 7]


def test_every_line_of_a_record_is_prefixed() -> None:
    f = JournalFormatter()
    assert f.format(record(logging.WARNING, "disk full")) == "<4>WARNING mirror.x: disk full"
    assert f.format(record(logging.ERROR, "a\nb")) == "<3>ERROR mirror.x: a\n<3>b"
    # The journal stamps lines itself: no time in the journal format.
    assert "%(asctime)s" not in formatter_for(True)._fmt  # type: ignore[operator]
    assert formatter_for(False).format(record(logging.INFO, "x")).endswith("INFO mirror.x: x")


def test_journal_stream_must_be_stderr_itself(tmp_path: Path) -> None:
    assert is_journal_stream("8:1234", 8, 1234)
    assert not is_journal_stream("8:1234", 8, 1235)
    for bad in (None, "", "8", "x:y", "8:"):
        assert not is_journal_stream(bad, 8, 1234)
    st = os.stat(tmp_path)
    assert stderr_is_journal(f"{st.st_dev}:{st.st_ino}", lambda fd: st)

    def closed(fd: int) -> os.stat_result:
        raise OSError(9, "Bad file descriptor")

    assert not stderr_is_journal(f"{st.st_dev}:{st.st_ino}", closed)


def test_the_cli_prefixes_only_when_stderr_is_the_named_stream(tmp_path: Path) -> None:
    """``mirror`` with stderr on a file: JOURNAL_STREAM naming that file gets
    prefixes, a stale one inherited from a parent gets the plain format."""
    err = tmp_path / "err"
    err.touch()
    st = os.stat(err)
    for stream, prefixed in ((f"{st.st_dev}:{st.st_ino}", True), (f"{st.st_dev}:{st.st_ino + 1}", False)):
        env = {**os.environ, "JOURNAL_STREAM": stream}
        with open(err, "wb") as f:
            r = subprocess.run([sys.executable, "-m", "mirror", "sync", "--config", str(tmp_path / "missing.toml")],
                               stderr=f, env=env, timeout=60)
        assert r.returncode != 0
        text = err.read_text()
        assert text.startswith("<3>ERROR") is prefixed, text
