"""Change lists: what each published cycle changed, for downstream mirrors.

Theory of operation
-------------------
At PyPI's scale an rsync of the whole tree spends hours building its file
list.  Fedora solves the same problem with ``fullfiletimelist``; we publish
one small list per published cycle instead.  Every cycle that changes
``web/`` gets the next *generation* number N and writes
``web/changes/<N:010d>-<epoch>.txt``::

    Epoch: 5f0c2a1b9d3e4f60
    Generation: 42
    Serial-From: 1000
    Serial-To: 1017
    Date: Sat, 25 Jan 2025 08:00:27 +0000

    add packages/4e/1a/.../demo-1.0-py3-none-any.whl
    add packages/4e/1a/.../demo-1.0-py3-none-any.whl.metadata
    replace simple/demo/index.v1_json
    retire packages/9c/77/.../demo-0.9.tar.gz
    delete simple/gone/index.html

The names of both files are ``mirror.layout``'s (``change_list``,
``CHANGES_INDEX``).  ``add``/``replace`` name a path that was written, ``retire`` a file deleted
after its grace period, ``delete`` a page unpublished with its project.  The
serial range is the upstream serial before and after the cycle (equal when
the cycle only retired files or retried deferred projects).  Paths never
contain spaces (``model.safe_relpath``), so every line is ``<op> <path>``.

``web/changes/index.txt`` lists the lists that are kept (at least
``[mirror] retire_after``), oldest first::

    Epoch: 5f0c2a1b9d3e4f60
    Generation: 42

    41 990 1000 1737792000 0000000041-5f0c2a1b9d3e4f60.txt
    42 1000 1017 1737792027 0000000042-5f0c2a1b9d3e4f60.txt

(generation, serial from, serial to, unix time, file name).  A cycle that
changed more than ``MAX_ENTRIES`` paths (a first sync, a long outage) gets a
list with ``Complete: no`` and no entries: a secondary spanning it copies the
whole tree, which is what it should do for that much change.  A secondary
whose tree is at generation S of the same epoch, facing a trace at
generation T, fetches lists S+1..T; if any is missing it falls back to a
full rsync.  ``net_changes`` folds the lists in order, so a path added then
retired is only deleted, and one retired then added again is only fetched.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

OPS = ("add", "replace", "retire", "delete")
FETCH_OPS = frozenset({"add", "replace"})
# Lists are kept at least this long even with a very short retire_after, so
# a secondary polling every few minutes can always use them.
MIN_KEEP_SECONDS = 3600.0
MAX_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class ChangeList:
    epoch: str
    generation: int
    serial_from: int
    serial_to: int
    date: str
    entries: tuple[tuple[str, str], ...] = ()  # (op, path), in path order
    complete: bool = True


def _header(data: bytes, what: str) -> tuple[dict[str, str], list[str]]:
    text = data.decode("utf-8")
    head, sep, body = text.partition("\n\n")
    if not sep:
        raise ValueError(f"{what}: no blank line after the header (truncated?)")
    fields: dict[str, str] = {}
    for line in head.splitlines():
        key, colon, value = line.partition(":")
        if not colon:
            raise ValueError(f"{what}: bad header line {line[:80]!r}")
        fields[key.strip()] = value.strip()
    return fields, [line for line in body.splitlines() if line.strip()]


def render_list(cl: ChangeList) -> bytes:
    head = (
        f"Epoch: {cl.epoch}\nGeneration: {cl.generation}\n"
        f"Serial-From: {cl.serial_from}\nSerial-To: {cl.serial_to}\nDate: {cl.date}\n"
    )
    if not cl.complete:
        return (head + "Complete: no\n\n").encode("utf-8")
    return (head + "\n").encode("utf-8") + render_entries(cl.entries)


def render_entries(entries: Iterable[tuple[str, str]]) -> bytes:
    for op, path in entries:
        if op not in OPS or not path or any(c.isspace() for c in path):
            raise ValueError(f"cannot list {op!r} {path!r}")
    return "".join(f"{op} {path}\n" for op, path in entries).encode("utf-8")


def parse_list(data: bytes) -> ChangeList:
    try:
        fields, rows = _header(data, "change list")
        entries = []
        for row in rows:
            op, _, path = row.partition(" ")
            if op not in OPS or not path:
                raise ValueError(f"change list: bad line {row[:80]!r}")
            entries.append((op, path))
        return ChangeList(
            epoch=fields["Epoch"],
            generation=int(fields["Generation"]),
            serial_from=int(fields["Serial-From"]),
            serial_to=int(fields["Serial-To"]),
            date=fields.get("Date", ""),
            entries=tuple(entries),
            complete=fields.get("Complete", "yes") != "no",
        )
    except (KeyError, UnicodeDecodeError) as e:
        raise ValueError(f"change list: missing or unreadable field {e}") from None


@dataclass(frozen=True, slots=True)
class IndexEntry:
    generation: int
    serial_from: int
    serial_to: int
    created: float
    name: str  # file name inside changes/


def render_index(epoch: str, entries: Sequence[IndexEntry]) -> bytes:
    latest = entries[-1].generation if entries else 0
    rows = "".join(
        f"{e.generation} {e.serial_from} {e.serial_to} {int(e.created)} {e.name}\n" for e in entries
    )
    return f"Epoch: {epoch}\nGeneration: {latest}\n\n{rows}".encode("utf-8")


def parse_index(data: bytes) -> tuple[str, list[IndexEntry]]:
    try:
        fields, rows = _header(data, "change index")
        entries = []
        for row in rows:
            gen, s_from, s_to, created, name = row.split()
            if "/" in name or name.startswith("."):
                raise ValueError(f"change index: bad file name {name!r}")
            entries.append(IndexEntry(int(gen), int(s_from), int(s_to), float(created), name))
        return fields["Epoch"], entries
    except (KeyError, UnicodeDecodeError) as e:
        raise ValueError(f"change index: missing or unreadable field {e}") from None


def covering(entries: Iterable[IndexEntry], *, after: int, upto: int) -> list[IndexEntry] | None:
    """The lists for generations ``after+1 .. upto``, or None if one is missing."""
    if upto <= after:
        return None
    by_gen = {e.generation: e for e in entries}
    out = []
    for gen in range(after + 1, upto + 1):
        e = by_gen.get(gen)
        if e is None:
            return None
        out.append(e)
    return out


@dataclass
class Net:
    """What a run of lists amounts to: paths to fetch and paths to remove."""

    fetch: set[str] = field(default_factory=set)
    remove: set[str] = field(default_factory=set)


def net_changes(lists: Iterable[ChangeList]) -> Net | None:
    """Fold lists (in generation order): the last operation on a path wins.
    None if one of them is incomplete (then only a full copy will do)."""
    net = Net()
    for cl in sorted(lists, key=lambda c: c.generation):
        if not cl.complete:
            return None
        for op, path in cl.entries:
            if op in FETCH_OPS:
                net.fetch.add(path)
                net.remove.discard(path)
            else:
                net.remove.add(path)
                net.fetch.discard(path)
    return net


def expired(created: Mapping[int, float], *, now: float, keep: float) -> list[int]:
    """Generations whose list may be deleted: older than ``keep`` (at least
    ``MIN_KEEP_SECONDS``), never the newest one."""
    if not created:
        return []
    newest = max(created)
    limit = now - max(keep, MIN_KEEP_SECONDS)
    return sorted(g for g, t in created.items() if t < limit and g != newest)
