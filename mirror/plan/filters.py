"""Evaluate a parsed `Filters` against projects and their files.

Two pure functions are consulted at sync time (no I/O, no trio, no httpx):

* `project_allowed` -- cheap, name-only, asked before a project page is even
  fetched: ``regex_project``, whole-project ``block`` entries, ``allow``.
* `apply` -- reduces a project's upstream snapshot to the files to mirror,
  plus a ``(filename, reason)`` for every dropped file (never silently): the
  project check; per-version ``allow``/``block``/``prereleases``/
  ``regex_release``; per-file ``exclude_yanked``/``exclude_sdist``/
  ``exclude_platforms``/``python``/``max_file_size``; then ``latest`` over
  what survived, then ``max_project_size`` by whole releases, newest first.

What a filename says (kind, version, platforms, Pythons) is
`mirror.plan.filenames`' job.  A file whose version cannot be determined is
kept by the version rules (only ``regex_release`` sees its raw text);
``max_project_size`` counts it as the oldest release.  Parsing the
``[filters]`` table lives in `mirror.plan.filterconf`; its public names are
re-exported here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Final

from packaging.version import Version

from mirror.model import NormalizedName, ProjectSnapshot, ReleaseFile
from mirror.plan.filenames import FileInfo, PyRange, file_info, file_version, release_of
from mirror.plan.filterconf import (
    KNOWN_PLATFORM_EXAMPLES,
    PLATFORM_FAMILIES,
    Filters,
    parse_filters,
    parse_requirement_lines,
    parse_size,
)
from mirror.plan.versions import parse_version

__all__ = [
    "KNOWN_PLATFORM_EXAMPLES",
    "PLATFORM_FAMILIES",
    "Filters",
    "apply",
    "file_version",
    "parse_filters",
    "parse_requirement_lines",
    "parse_size",
    "project_allowed",
]


# --------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------

# Concrete Pythons to test open-ended tags ("py3", "cp39-abi3") against.
_PYTHONS: Final[tuple[tuple[int, int], ...]] = tuple(
    [(2, m) for m in range(8)] + [(3, m) for m in range(21)]
)


def project_allowed(f: Filters, name: NormalizedName) -> str | None:
    """None if project ``name`` may be mirrored, else why not."""
    for pattern in f.regex_project:
        if pattern.search(name):
            return f"filters.regex_project {pattern.pattern!r}"
    blocked = f._block_whole.get(name)
    if blocked is not None:
        return f"blocked by filters.block: {blocked}"
    if f.allow is not None and name not in f._allow_index:
        return "not in filters.allow"
    return None


def _version_reason(
    f: Filters, name: NormalizedName, version: Version | None, text: str | None
) -> str | None:
    if version is None:
        # Unknown versions are kept; only a regex can still say something.
        if text is not None:
            for pattern in f.regex_release:
                if pattern.search(text):
                    return f"filters.regex_release {pattern.pattern!r} matches {text}"
        return None
    # prereleases=True: the specifiers bound the range, pre-releases are
    # governed by filters.prereleases alone ("django>=4.2" keeps 5.0rc1).
    allowed = f._allow_index.get(name)
    if allowed and not any(r.specifier.contains(version, prereleases=True) for r in allowed):
        return f"filters.allow: {version} does not match {' or '.join(map(str, allowed))}"
    for req in f._block_versions.get(name, ()):
        if req.specifier.contains(version, prereleases=True):
            return f"filters.block: {req} matches {version}"
    if not f.prereleases and version.is_prerelease:
        return f"filters.prereleases: {version} is a pre-release"
    for pattern in f.regex_release:
        if pattern.search(str(version)):
            return f"filters.regex_release {pattern.pattern!r} matches {version}"
    return None


def _python_ok(f: Filters, rng: PyRange) -> bool:
    major, minor, exact = rng
    series = [(major, minor)]
    if not exact:
        # Open-ended ("py3", "cp39-abi3"): every later minor we know of, plus
        # any the specifiers name (">=3.25" must not drop py3-none-any).
        later = {(M, m) for M, m in _PYTHONS if M == major and m > minor}
        later |= {
            (v.major, v.minor) for v in f._python_probes if v.major == major and v.minor > minor
        }
        series += sorted(later)
    for M, m in series:
        # A series matches when any of its releases does: probe X.Y, X.Y.999
        # and every version the specifiers mention in that series (so
        # ">=3.9.2" or "==3.9.1" still admit cp39).
        probes = [Version(f"{M}.{m}"), Version(f"{M}.{m}.999")]
        probes += [v for v in f._python_probes if v.release[:2] == (M, m)]
        for probe in probes:
            if any(s.contains(probe, prereleases=True) for s in f.python):
                return True
    return False


def _shape_reason(f: Filters, info: FileInfo) -> str | None:
    """The verdict of exclude_sdist, exclude_platforms and python."""
    if f.exclude_sdist and info.kind == "sdist":
        return "filters.exclude_sdist"
    platform_re = f._platform_re
    if (
        platform_re is not None
        and info.platforms
        and "any" not in info.platforms
        and all(platform_re.match(p) for p in info.platforms)
    ):
        return f"filters.exclude_platforms: {'.'.join(sorted(info.platforms))}"
    if f.python and info.pythons is not None:
        if not any(_python_ok(f, rng) for rng in info.pythons):
            shown = " or ".join(str(s) or "(any)" for s in f.python)
            return f"filters.python: runs on no Python matching {shown}"
    return None


_Kept = list[tuple[ReleaseFile, FileInfo]]


def apply(
    f: Filters, snapshot: ProjectSnapshot
) -> tuple[ProjectSnapshot, list[tuple[str, str]]]:
    """Reduce ``snapshot`` to the files to mirror.

    Returns the new snapshot and ``(filename, reason)`` for every dropped
    file, in upstream order within each pipeline stage.  ``versions`` keeps
    the upstream strings (in upstream order) that pass the version filters;
    with ``latest`` or ``max_project_size`` set, only those whose release
    kept at least one file.
    """
    if not f.active:
        return snapshot, []
    name = snapshot.name
    refused = project_allowed(f, name)
    if refused is not None:
        return replace(snapshot, files=(), versions=()), [
            (rf.filename, refused) for rf in snapshot.files
        ]

    dropped: list[tuple[str, str]] = []
    kept: _Kept = []
    # Verdicts memoised per version string and per file shape: a project
    # has thousands of files but only hundreds of versions and a dozen shapes.
    by_version: dict[str | None, str | None] = {}
    by_shape: dict[str, str | None] = {}
    counts_latest = f.latest is not None
    max_file = f.max_file_size

    for rf in snapshot.files:
        info = file_info(name, rf.filename)
        text = info.version_text
        try:
            reason = by_version[text]
        except KeyError:
            reason = by_version[text] = _version_reason(f, name, info.version, text)
        if reason is None and rf.yanked is not False:
            if f.exclude_yanked:
                reason = "filters.exclude_yanked: yanked"
            elif counts_latest:
                reason = "filters.latest: yanked files are neither counted nor kept"
        if reason is None:
            try:
                reason = by_shape[info.shape]
            except KeyError:
                reason = by_shape[info.shape] = _shape_reason(f, info)
        if reason is None and max_file is not None and rf.size is not None and rf.size > max_file:
            reason = f"filters.max_file_size: {rf.size} bytes > {max_file}"
        if reason is None:
            kept.append((rf, info))
        else:
            dropped.append((rf.filename, reason))

    if f.latest is not None:
        kept = _keep_latest(kept, f.latest, dropped)
    if f.max_project_size is not None:
        kept = _keep_size(kept, f.max_project_size, dropped)

    selected = f.latest is not None or f.max_project_size is not None
    kept_releases = set(_releases(kept).values()) if selected else set()
    versions: list[str] = []
    for text in snapshot.versions:
        v = parse_version(text)
        key: str | None = text
        if key not in by_version:
            by_version[key] = _version_reason(f, name, v, text)
        if by_version[key] is not None:
            continue
        if selected and v is not None and release_of(v) not in kept_releases:
            continue
        versions.append(text)

    return (
        replace(snapshot, files=tuple(rf for rf, _ in kept), versions=tuple(versions)),
        dropped,
    )


def _releases(kept: _Kept) -> dict[str, Version]:
    """version text -> release, over the kept files of known version."""
    out: dict[str, Version] = {}
    for _, info in kept:
        if info.release is not None and info.version_text is not None:
            out.setdefault(info.version_text, info.release)
    return out


def _keep_latest(kept: _Kept, n: int, dropped: list[tuple[str, str]]) -> _Kept:
    releases = _releases(kept)
    newest = set(sorted(set(releases.values()), reverse=True)[:n])
    keep_texts = {text for text, rel in releases.items() if rel in newest}
    out: _Kept = []
    for rf, info in kept:
        if info.release is None or info.version_text in keep_texts:
            out.append((rf, info))
        else:
            dropped.append(
                (
                    rf.filename,
                    f"filters.latest: {info.version_text} is not among the {n} newest releases",
                )
            )
    return out


def _keep_size(kept: _Kept, cap: int, dropped: list[tuple[str, str]]) -> _Kept:

    sizes: dict[Version | None, int] = {}
    for rf, info in kept:
        key = info.release
        sizes[key] = sizes.get(key, 0) + (rf.size or 0)
    # Whole releases, newest first; files of unknown version count as the
    # oldest release.  Stop at the first one that does not fit, so the mirror
    # keeps a contiguous run of the newest releases rather than a gappy one.
    # Files of unknown size count as 0: there is nothing else to go by.
    order: list[Version | None] = [
        *sorted((k for k in sizes if k is not None), reverse=True)
    ]
    if None in sizes:
        order.append(None)
    total = 0
    fitting: set[Version | None] = set()
    for key in order:
        if total + sizes[key] > cap:
            break
        total += sizes[key]
        fitting.add(key)
    if len(fitting) == len(order):
        return kept
    reason = (
        f"filters.max_project_size: over {cap} bytes; kept the {len(fitting)} newest "
        f"release(s), {total} bytes"
    )
    out: _Kept = []
    for rf, info in kept:
        if info.release in fitting:
            out.append((rf, info))
        else:
            dropped.append((rf.filename, reason))
    return out
