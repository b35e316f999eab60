"""The trace file: ``web/trace/<mirror name>``, the last thing a cycle writes.

Debian mirrors leave a small ``Key: value`` file in ``project/trace/`` after
every completed sync; downstream sites read it to learn whether anything
changed and monitoring reads its ``Date`` to see how fresh a mirror is.  We
do the same.  Because it is written *after* the files, the pages, the root
index and the change list of the cycle, a reader that sees a trace with
generation N can rely on every change of generations <= N being in place.

Keys written by the primary (``mirror sync`` / ``mirror run``)::

    Date            end of the cycle, RFC 2822 in UTC
    Date-Started    start of the cycle
    Creator         "mirror <version>"
    Mirror          [mirror] name
    Upstream        the index followed
    Serial          upstream serial up to which the tree is published
    Epoch           random id of the mirror's state (generations restart
                    when the state is recreated; a new epoch says so)
    Generation      number of the last change list (changes/index.txt)
    Files, Bytes    verified files in the tree and their total size
    Cycle-Seconds   wall time of the cycle
    Changes         path of the cycle's change list under web/

``mirror pull`` writes the same keys about the tree it copied (Serial, Epoch
and Generation are the source's), with ``Upstream`` naming the rsync source.

Pure: no I/O, no clock.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import re
from collections.abc import Mapping
from dataclasses import dataclass

_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")


def format_date(ts: float) -> str:
    """RFC 2822 date in UTC, as Debian's traces use: ``Sat, 25 Jan 2025 08:00:27 +0000``."""
    return email.utils.format_datetime(_dt.datetime.fromtimestamp(int(ts), _dt.UTC))


def parse_date(value: str) -> float:
    return email.utils.parsedate_to_datetime(value).timestamp()


def render_trace(fields: Mapping[str, str | int | float]) -> bytes:
    lines = []
    for key, value in fields.items():
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        if not _KEY.match(key) or "\n" in text or "\r" in text:
            raise ValueError(f"trace field {key!r} cannot be written as one line")
        lines.append(f"{key}: {text}\n")
    return "".join(lines).encode("utf-8")


def parse_trace(data: bytes) -> dict[str, str]:
    """Fields of a trace; ``ValueError`` if it is not one."""
    out: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep or not _KEY.match(key):
            raise ValueError(f"not a trace line: {line[:80]!r}")
        out[key] = value.strip()
    if "Date" not in out:
        raise ValueError("trace without a Date")
    return out


@dataclass(frozen=True, slots=True)
class Position:
    """Where a tree stands in its primary's sequence of change lists."""

    epoch: str
    generation: int
    serial: int
    date: float

    def same_as(self, other: Position | None) -> bool:
        return other is not None and (self.epoch, self.generation) == (other.epoch, other.generation)


def position(fields: Mapping[str, str]) -> Position | None:
    """The position a trace describes, or None if it lacks one (a foreign trace)."""
    try:
        return Position(
            epoch=fields["Epoch"],
            generation=int(fields["Generation"]),
            serial=int(fields.get("Serial", "0")),
            date=parse_date(fields["Date"]),
        )
    except (KeyError, ValueError, TypeError):
        return None
