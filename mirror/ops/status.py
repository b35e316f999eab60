"""``mirror status``: where the mirror stands, for a person or a script.

It must answer while ``mirror run`` or ``mirror sync`` is working, so it
never takes the directory lock and opens the state database read-only
(SQLite ``mode=ro``): in WAL mode a reader sees the last committed state
and never blocks the writer.  Every figure comes from the same counters the
sync engine keeps (``State``), so reading it is O(1) in the size of the
mirror apart from the failed-project list.

``read_status`` does the I/O; ``render_text`` and ``Status.to_json`` are
pure, so the layout is tested without a database.
"""

from __future__ import annotations

import itertools
import sqlite3
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from mirror.errors import MirrorError
from mirror.layout import Layout
from mirror.publish.lock import lock_holder
from mirror.publish.state import State

# How many pending projects to name; the count is always exact.
PENDING_SAMPLE = 10
# How many failing projects the text output lists (JSON lists them all).
FAILED_SHOWN = 20
_ERROR_WIDTH = 100


@dataclass(frozen=True)
class FailedProject:
    name: str
    serial: int
    attempts: int
    error: str


@dataclass(frozen=True)
class Status:
    directory: str
    serial: int  # feed position: every event up to here is published or queued
    synced_serial: int  # everything up to here is published
    upstream_serial: int | None
    last_success: float | None  # unix time the last cycle without failures ended
    last_cycle: float | None  # unix time the last cycle started
    projects: int
    pending: int
    tree_files: int
    tree_bytes: int
    pending_retirement: int
    lock_holder: str | None  # pid of the process holding the directory lock
    failed: list[FailedProject] = field(default_factory=list)
    pending_sample: list[str] = field(default_factory=list)
    # From the config, not the state: where requests go, and through what.
    upstream: str = ""
    network: str = ""
    storage: str = ""  # where the tree is published, when not <directory>/web

    @property
    def lag(self) -> int | None:
        if self.upstream_serial is None:
            return None
        return max(0, self.upstream_serial - self.synced_serial)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["lag"] = self.lag
        doc["running"] = self.lock_holder is not None
        return doc


def read_status(layout: Layout) -> Status:
    path = layout.db
    if not path.is_file():
        raise MirrorError(f"no mirror state at {path}: has `mirror sync` run on this directory yet?")
    try:
        state = State.open_readonly(path)
    except sqlite3.Error as e:
        raise MirrorError(f"cannot open {path} read-only: {e}") from None
    try:
        failed = [FailedProject(*f) for f in state.failures()]
        failing = {f.name for f in failed}
        todo = (str(n) for n, _ in state.iter_todo(batch=PENDING_SAMPLE + FAILED_SHOWN) if n not in failing)
        sample = list(itertools.islice(todo, PENDING_SAMPLE))
        files, nbytes = state.tree_totals()
        return Status(
            directory=str(layout.directory),
            serial=int(state.serial),
            synced_serial=int(state.synced_serial()),
            upstream_serial=_int(state.meta("upstream_serial")),
            last_success=_float(state.meta("last_success")),
            last_cycle=_float(state.meta("last_cycle")),
            projects=state.project_count(),
            pending=state.todo_count(),
            tree_files=files,
            tree_bytes=nbytes,
            pending_retirement=state.retire_count(),
            lock_holder=lock_holder(layout.lock),
            failed=failed,
            pending_sample=sample,
        )
    except sqlite3.Error as e:
        raise MirrorError(f"cannot read {path}: {e}") from None
    finally:
        state.close()


def _int(v: str | None) -> int | None:
    return int(v) if v else None


def _float(v: str | None) -> float | None:
    return float(v) if v else None


# -- text -------------------------------------------------------------------

def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _when(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    return f"{human_duration(now - t)} ago ({stamp})"


def verdict(s: Status) -> str:
    if s.failed:
        return f"{len(s.failed)} project(s) failing"
    if s.pending:
        return f"{s.pending} project(s) pending"
    if s.last_cycle is None:
        return "never synced"
    if s.lag:
        return f"{s.lag} serial(s) behind upstream"
    return "up to date"


def _one_line(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def render_text(s: Status, *, now: float) -> str:
    running = f"running (pid {s.lock_holder})" if s.lock_holder else "idle"
    upstream = "upstream unknown" if s.upstream_serial is None else f"upstream {s.upstream_serial:,}, lag {s.lag:,}"
    lines = [
        f"mirror {s.directory}: {verdict(s)}",
        f"  process      {running}",
        f"  serial       {s.synced_serial:,} published ({upstream})",
        *([f"  upstream     {s.upstream}, {s.network}"] if s.upstream else []),
        f"  last success {_when(s.last_success, now)}",
        f"  last cycle   {'started ' if s.last_cycle is not None else ''}{_when(s.last_cycle, now)}",
        f"  projects     {s.projects:,} published, {s.pending:,} pending, {len(s.failed):,} failing",
        f"  tree         {s.tree_files:,} files, {human_bytes(s.tree_bytes)}"
        + (f" in {s.storage}" if s.storage else ""),
        f"  retirement   {s.pending_retirement:,} file(s) waiting for the grace period",
    ]
    if s.failed:
        lines.append("")
        lines.append(f"failing projects ({len(s.failed)}), with their last error:")
        width = max(len(f.name) for f in s.failed[:FAILED_SHOWN])
        for f in s.failed[:FAILED_SHOWN]:
            tries = f"{f.attempts} attempt{'s' if f.attempts != 1 else ''}"
            lines.append(f"  {f.name:<{width}}  {tries:<11}  {_one_line(f.error, _ERROR_WIDTH)}")
        if len(s.failed) > FAILED_SHOWN:
            lines.append(f"  ... and {len(s.failed) - FAILED_SHOWN} more (--json lists all)")
    waiting = s.pending - len(s.failed)
    if waiting > 0 and s.pending_sample:
        more = f" and {waiting - len(s.pending_sample):,} more" if waiting > len(s.pending_sample) else ""
        lines.append("")
        lines.append(f"pending: {', '.join(s.pending_sample)}{more}")
    return "\n".join(lines) + "\n"
