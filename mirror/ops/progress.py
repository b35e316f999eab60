"""One live progress line for ``mirror sync`` on a terminal.

    projects 1,234/5,000  files 3,456/3,900  812.4 MB  41.2 MB/s  ETA 3m12s

Only for a person watching a terminal: not on a pipe or a file (the log is
the record there), and not under systemd, where stderr may still look like
a terminal but goes to the journal (``JOURNAL_STREAM``, ``INVOCATION_ID``).

The sync engine calls the object with ``(kind, done, total)`` events
(``projects``, ``files``, ``bytes``); drawing is throttled, so the callback
costs next to nothing per file.  Log records are printed on a clean line: a
logging filter erases the progress line first and the next event redraws it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import TextIO

from mirror.ops.status import human_bytes, human_duration

# Throughput is measured over this many seconds, so it follows the link
# rather than the average since start.
RATE_WINDOW = 10.0


def wanted(stream: TextIO, environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID") or env.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressLine:
    def __init__(
        self, stream: TextIO, *, clock: Callable[[], float] = time.monotonic, interval: float = 0.2,
        width: int | None = None,
    ) -> None:
        self.stream = stream
        self.clock = clock
        self.interval = interval
        self.width = width
        self.projects = (0, 0)
        self.files = (0, 0)
        self.bytes = 0
        self.started = clock()
        self._samples: deque[tuple[float, int]] = deque([(self.started, 0)])
        self._drawn_at = float("-inf")
        self._shown = False

    # -- events -------------------------------------------------------------
    def __call__(self, kind: str, done: int, total: int) -> None:
        if kind == "projects":
            self.projects = (done, total)
        elif kind == "files":
            self.files = (done, total)
        elif kind == "bytes":
            self.bytes = done
        now = self.clock()
        if now - self._drawn_at >= self.interval:
            self._draw(now)

    # -- figures ------------------------------------------------------------
    def rate(self, now: float) -> float:
        """Bytes per second over the last RATE_WINDOW seconds."""
        self._samples.append((now, self.bytes))
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        return (self.bytes - b0) / (now - t0) if now > t0 else 0.0

    def eta(self, now: float) -> float | None:
        """Seconds left, from the project rate so far (files are planned per project)."""
        done, total = self.projects
        elapsed = now - self.started
        if done <= 0 or total <= done or elapsed <= 0:
            return None
        return (total - done) * elapsed / done

    def format(self, now: float) -> str:
        pd, pt = self.projects
        fd, ft = self.files
        parts = [f"projects {pd:,}/{pt:,}", f"files {fd:,}/{ft:,}", human_bytes(self.bytes),
                 f"{self.rate(now) / 1e6:.1f} MB/s"]
        eta = self.eta(now)
        if eta is not None:
            parts.append(f"ETA {human_duration(eta)}")
        return "  ".join(parts)

    # -- terminal -------------------------------------------------------------
    def _columns(self) -> int:
        return self.width or shutil.get_terminal_size((100, 24)).columns

    def _draw(self, now: float) -> None:
        self._drawn_at = now
        # Never wrap: a wrapped line cannot be redrawn in place with \r.
        line = self.format(now)[: max(10, self._columns() - 1)]
        self.stream.write(f"\r{line}\x1b[K")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def close(self) -> None:
        """Leave the final figures on screen, on their own line."""
        self._draw(self.clock())
        self.stream.write("\n")
        self.stream.flush()
        self._shown = False

    def log_filter(self) -> logging.Filter:
        """A handler filter that erases the progress line before each record."""
        line = self

        class _Clear(logging.Filter):
            def filter(self, record: logging.LogRecord) -> bool:
                line.clear()
                return True

        return _Clear()


@contextmanager
def terminal_progress(stream: TextIO) -> Iterator[ProgressLine | None]:
    """A ProgressLine on ``stream`` if a person is watching it, else None.

    While it is shown, every handler of the root logger erases it before
    writing a record."""
    if not wanted(stream):
        yield None
        return
    line = ProgressLine(stream)
    clear = line.log_filter()
    handlers = list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(clear)
    try:
        yield line
    finally:
        line.close()
        for h in handlers:
            h.removeFilter(clear)
