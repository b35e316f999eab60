"""How a log line looks, by where stderr goes (pure: the caller stats stderr).

Under systemd, stderr is often a stream to journald, announced by
``JOURNAL_STREAM=<device>:<inode>``.  journald then reads a ``<N>`` prefix
on each line as that line's syslog priority (``sd-daemon(3)``), so
``journalctl -p warning`` can tell a warning from an info line; without it
every line is stored at priority 6.  The variable is inherited by children
whose stderr goes elsewhere (a shell redirect, ``mirror sync 2>file``), so
it counts only when stderr is the very stream it names.  journald stamps
every line itself: there the line carries no time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

# logging level -> syslog priority (err, warning, info, debug)
_PRIORITIES = ((logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """CRITICAL and ERROR are 3, WARNING 4, INFO 6, anything lower 7."""
    for floor, priority in _PRIORITIES:
        if levelno >= floor:
            return priority
    return 7


def is_journal_stream(journal_stream: str | None, st_dev: int, st_ino: int) -> bool:
    """Does ``JOURNAL_STREAM`` name the stream whose fstat gave (dev, ino)?"""
    if not journal_stream:
        return False
    dev, sep, ino = journal_stream.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    return int(dev) == st_dev and int(ino) == st_ino


def stderr_is_journal(journal_stream: str | None, fstat: Callable[[int], Any]) -> bool:
    """``is_journal_stream`` for fd 2; ``fstat`` is ``os.fstat``."""
    try:
        st = fstat(2)
    except OSError:
        return False
    return is_journal_stream(journal_stream, st.st_dev, st.st_ino)


class JournalFormatter(logging.Formatter):
    """``<N>`` before every line of a record (a traceback is several lines,
    and journald stores each line as its own entry)."""

    def __init__(self, fmt: str = "%(levelname)s %(name)s: %(message)s") -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def formatter_for(journal: bool, fmt: str = PLAIN) -> logging.Formatter:
    """The formatter for a text log on stderr: ``fmt``, or for the journal
    (``journal``, from ``stderr_is_journal``) ``fmt`` without its time and
    with the priority prefix."""
    if journal:
        return JournalFormatter(fmt.replace("%(asctime)s ", ""))
    return logging.Formatter(fmt)
