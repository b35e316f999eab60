"""Pure decisions of a sync cycle: what changed, what to fetch, what to publish.

Theory of operation
-------------------
The feed tells us *which* projects changed and the serial each must reach;
the project page tells us *what* the project is now.  From a page and the set
of paths already verified in the tree, ``plan_project`` lists the fetches
(distribution files and their ``.metadata`` / ``.provenance`` sidecars).
After the fetches, ``finalize`` builds the snapshot we publish: it links only
paths that are in the tree, so a page can never point at a missing file even
when a sidecar could not be fetched.  Paths a project no longer references
are handed to retirement by the state layer, never deleted here.

Nothing in this module does I/O; its tests are table-driven and synchronous.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from mirror.errors import UnsafeInput
from mirror.model import ChangeEvent, NormalizedName, ProjectSnapshot, RootEntry, Serial, normalize_name

Kind = Literal["dist", "metadata", "provenance"]

# Journal actions that bump the serial without changing any index content
# (role changes, invitations).  Anything not recognised here is treated as a
# content change: fetching a page too often is cheap, missing a change is not.
_ROLE_ACTION = re.compile(r"^(add|remove|change|invite|accepted|decline|revoke)\s+(Owner|Maintainer)\b", re.I)


@dataclass(frozen=True, slots=True)
class Fetch:
    rel: str
    url: str
    sha256: str | None
    size: int | None
    kind: Kind
    filename: str


@dataclass(frozen=True, slots=True)
class FeedChanges:
    targets: dict[NormalizedName, Serial]
    rejected: tuple[str, ...] = ()
    display: dict[NormalizedName, str] = field(default_factory=dict)


def is_content_event(action: str) -> bool:
    return not _ROLE_ACTION.match(action)


def group_events(events: Iterable[ChangeEvent]) -> FeedChanges:
    """Collapse journal events to one target serial per project."""
    targets: dict[NormalizedName, Serial] = {}
    display: dict[NormalizedName, str] = {}
    rejected: list[str] = []
    for e in events:
        if not is_content_event(e.action):
            continue
        try:
            name = normalize_name(e.name)
        except UnsafeInput:
            rejected.append(repr(e.name)[:200])
            continue
        if e.serial > targets.get(name, -1):
            targets[name] = e.serial
            display[name] = e.name
    return FeedChanges(targets, tuple(rejected), display)


def group_listing(listing: Mapping[str, int]) -> FeedChanges:
    """``list_packages_with_serial`` -> targets (first sync)."""
    targets: dict[NormalizedName, Serial] = {}
    display: dict[NormalizedName, str] = {}
    rejected: list[str] = []
    for shown, serial in listing.items():
        try:
            name = normalize_name(shown)
        except UnsafeInput:
            rejected.append(repr(shown)[:200])
            continue
        if name in display:
            # Two listed names normalize alike, which PyPI forbids: keep the
            # newer, report the other.
            loser, winner = (display[name], shown) if serial >= targets[name] else (shown, display[name])
            rejected.append(f"{loser!r:.200} (collides with {winner!r:.200} after normalization)")
        if serial >= targets.get(name, -1):
            targets[name] = Serial(serial)
            display[name] = shown
    return FeedChanges(targets, tuple(rejected), display)


def diff_root(
    upstream: Iterable[RootEntry], published: Iterable[tuple[NormalizedName, Serial]]
) -> tuple[dict[NormalizedName, Serial], list[NormalizedName]]:
    """Compare the upstream root index with what we published.

    Returns (projects to sync with the serial to reach, projects missing
    upstream).  Missing projects are only *candidates*: the caller confirms a
    removal by fetching the page (the root can be 30 minutes stale).
    """
    up = {e.name: e.serial for e in upstream}
    missing: list[NormalizedName] = []
    for name, serial in published:
        s = up.get(name)
        if s is None:
            missing.append(name)
        elif s <= serial:
            del up[name]
    return dict(up), missing


def plan_project(snap: ProjectSnapshot, known: Mapping[str, tuple[int, str]]) -> list[Fetch]:
    """Fetches needed so that every file of ``snap`` (and its sidecars) is in the tree.

    ``known`` maps path -> (size, sha256) of what is already verified on disk.
    A path whose recorded sha256 differs from the page's is fetched again.
    """
    out: list[Fetch] = []
    for f in snap.files:
        have = known.get(f.path)
        if have is None or have[1] != f.sha256:
            out.append(Fetch(f.path, f.url, f.sha256, f.size, "dist", f.filename))
        if f.core_metadata:
            m = known.get(f.metadata_path)
            if m is None or (f.core_metadata_sha256 is not None and m[1] != f.core_metadata_sha256):
                out.append(Fetch(f.metadata_path, f.url + ".metadata", f.core_metadata_sha256, None, "metadata",
                                 f.filename + ".metadata"))
        if f.provenance is not None and f.provenance_path not in known:
            out.append(Fetch(f.provenance_path, f.provenance, None, None, "provenance", f.filename + ".provenance"))
    return out


def finalize(snap: ProjectSnapshot, present: Mapping[str, tuple[int, str]]) -> tuple[ProjectSnapshot, set[str]]:
    """The snapshot to publish and the paths it references.

    Files whose bytes are not in the tree are left out; sidecars that are
    missing are unadvertised; the metadata hash is the one we verified.
    """
    files = []
    refs: set[str] = set()
    for f in snap.files:
        have = present.get(f.path)
        if have is None or have[1] != f.sha256:
            continue
        md = present.get(f.metadata_path) if f.core_metadata else None
        prov = f.provenance if f.provenance is not None and f.provenance_path in present else None
        files.append(replace(
            f,
            size=have[0],
            core_metadata=md is not None,
            core_metadata_sha256=md[1] if md is not None else None,
            provenance=prov,
        ))
        refs.add(f.path)
        if md is not None:
            refs.add(f.metadata_path)
        if prov is not None:
            refs.add(f.provenance_path)
    return replace(snap, files=tuple(files)), refs

