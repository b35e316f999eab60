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

A file's version comes from its *filename* (wheel split + cached `Version`/
`parse_tag`, `parse_sdist_filename`, else a ``<name>-<version>`` split).  A
file whose version cannot be determined is kept by the version rules (only
``regex_release`` sees its raw text); ``max_project_size`` counts it as the
oldest release.  Parsing the ``[filters]`` table lives in `mirror.filterconf`;
its public names are re-exported here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Final, Literal

from packaging.tags import Tag, parse_tag
from packaging.utils import (
    InvalidSdistFilename,
    canonicalize_name,
    parse_sdist_filename,
)
from packaging.version import InvalidVersion, Version

from mirror.filterconf import (
    KNOWN_PLATFORM_EXAMPLES,
    PLATFORM_FAMILIES,
    Filters,
    parse_filters,
    parse_requirement_lines,
    parse_size,
)
from mirror.model import NormalizedName, ProjectSnapshot, ReleaseFile

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
# What a filename tells us
# --------------------------------------------------------------------------

# (major, lowest minor, exact): "cp38-cp38" is (3, 8, True), "cp39-abi3"
# and "py38" are (3, 9/8, False) = that minor and every later one.
_PyRange = tuple[int, int, bool]


@dataclass(frozen=True, slots=True)
class _FileInfo:
    kind: Literal["wheel", "sdist", "other"]
    version: Version | None
    # The exact string `version` was parsed from (so caches can key on a
    # string, whose hash is cached, instead of on Version).  When the version
    # does not parse, the best guess at the version part, for regex_release;
    # None when not even that could be found.
    version_text: str | None
    # `version` without its local label: what latest/max_project_size count.
    release: Version | None = None
    # Everything the platform/python/sdist rules look at, as one string, so
    # their verdict is computed once per shape ("cp311-cp311-win_amd64").
    shape: str = ""
    # Platform tags; empty = not platform specific or unknown.
    platforms: frozenset[str] = frozenset()
    # Pythons the file can run on; None = any / unknown (never dropped).
    pythons: tuple[_PyRange, ...] | None = None


_SDIST_EXTS: Final = (".tar.gz", ".zip", ".tar.bz2", ".tar.xz", ".tgz", ".tbz", ".tar.z", ".tar")
_OTHER_EXTS: Final = (".egg", ".exe", ".msi", ".rpm", ".dmg", ".deb")
# bdist_wininst/bdist_msi/bdist_dumb put the platform after a dot:
# "foo-1.0.win-amd64-py2.7.exe", "foo-1.0.linux-x86_64.tar.gz".
_PLAT_SUFFIX: Final = re.compile(
    r"(?P<ver>.+?)\.(?P<plat>win32|win-(?:amd64|arm64|ia64)"
    r"|(?:linux|macosx|darwin|cygwin|freebsd|openbsd|netbsd|solaris|sunos|aix)-[A-Za-z0-9_.-]+?)"
    r"(?:-py(?P<py>\d+\.\d+))?",
    re.IGNORECASE,
)
# "foo-1.0-py2.7.egg", "foo-1.0-py2.7-linux-x86_64.egg"
_EGG: Final = re.compile(r"(?P<ver>[^-]+)-py(?P<py>\d+\.\d+)(?:-(?P<plat>.+))?")
_LEADING_DIGIT: Final = re.compile(r"(.+?)-(\d.*)")
_INTERPRETER: Final = re.compile(r"([a-z]+?)(\d)(\d*)")


@lru_cache(maxsize=8192)
def _parse_version(text: str) -> Version | None:
    # Cached: a project's files repeat the same few hundred version strings.
    try:
        return Version(text)
    except InvalidVersion:
        return None


def _release(version: Version) -> Version:
    # Local versions (2.1.0+cpu, 2.1.0+cu118) are builds of one release.
    if version.local is None:
        return version
    return _parse_version(version.public) or version


def _normalize_platform(plat: str) -> str:
    # Same spelling as wheel tags: "macosx-10.9-x86_64" -> "macosx_10_9_x86_64".
    return plat.lower().replace("-", "_").replace(".", "_")


def _tag_python(tag: Tag) -> _PyRange | None:
    """The Pythons a wheel tag can run on, following packaging.tags' rules."""
    m = _INTERPRETER.fullmatch(tag.interpreter)
    if m is None:
        return None
    impl, major, minor = m.group(1), int(m.group(2)), m.group(3)
    if not minor:
        return (major, 0, False)  # "py3", "cp3": any 3.x
    # "py38" is pure Python targeting 3.8+; "cp39-abi3" uses the stable ABI,
    # which later CPythons keep.  Anything else (cp38-cp38, cp38-none,
    # pp310-pypy310_pp73, graalpy311-...) is built for that one minor.
    exact = not (impl == "py" or tag.abi == "abi3")
    return (major, int(minor), exact)


@lru_cache(maxsize=4096)
def _wheel_tags(tag_text: str) -> tuple[frozenset[str], tuple[_PyRange, ...] | None] | None:
    """Platforms and Pythons of a wheel's compressed tag set, or None if bad.

    Cached on the tag text: a project repeats the same dozen tag sets in
    every release, and tag parsing is most of the cost of reading a wheel
    filename.
    """
    try:
        tags = parse_tag(tag_text)
    except ValueError:
        return None
    ranges: set[_PyRange] | None = set()
    for tag in tags:
        rng = _tag_python(tag)
        if rng is None:
            ranges = None  # an interpreter we do not understand: keep the file
            break
        assert ranges is not None
        ranges.add(rng)
    pythons = tuple(sorted(ranges)) if ranges is not None else None
    return frozenset(t.platform for t in tags), pythons


def _after_name(project: str, stem: str) -> str | None:
    """What follows ``<name>-`` in ``stem``, where ``<name>`` is the project."""
    start = 0
    while (i := stem.find("-", start)) != -1:
        if canonicalize_name(stem[:i]) == project:
            return stem[i + 1 :]
        start = i + 1
    # Renamed projects keep files with the old name: split before the first
    # "-<digit>" instead.
    m = _LEADING_DIGIT.fullmatch(stem)
    return m.group(2) if m else None


def _version_in(text: str) -> tuple[Version | None, str]:
    # "1.0-beta" and "1.0-2" are valid PEP 440 as a whole; otherwise drop
    # "-suffix" parts from the right ("1.0-snapshot" ...) until something parses.
    parts = text.split("-")
    for n in range(len(parts), 0, -1):
        candidate = "-".join(parts[:n])
        v = _parse_version(candidate)
        if v is not None:
            return v, candidate
    return None, parts[0]


def _info(
    kind: Literal["wheel", "sdist", "other"],
    version: Version | None,
    version_text: str | None,
    platforms: frozenset[str] = frozenset(),
    pythons: tuple[_PyRange, ...] | None = None,
    shape: str | None = None,
) -> _FileInfo:
    if shape is None:
        shape = f"{kind}|{'.'.join(sorted(platforms))}|{pythons}"
    return _FileInfo(
        kind=kind,
        version=version,
        version_text=version_text,
        release=_release(version) if version is not None else None,
        shape=shape,
        platforms=platforms,
        pythons=pythons,
    )


def _legacy_info(
    project: str, stem: str, ext: str, kind: Literal["wheel", "sdist", "other"]
) -> _FileInfo:
    rest = _after_name(project, stem)
    if not rest:
        return _info(kind, None, None)
    platform: str | None = None
    py: str | None = None
    text = rest
    if ext == ".egg" and (m := _EGG.fullmatch(rest)):
        text, py, platform = m.group("ver"), m.group("py"), m.group("plat")
    elif m := _PLAT_SUFFIX.fullmatch(rest):
        text, py, platform = m.group("ver"), m.group("py"), m.group("plat")
        kind = "other"  # a built distribution, even when shaped like an sdist
    elif ext in (".exe", ".msi"):
        platform = "win32"  # Windows installers without a platform were win32
    version, version_text = _version_in(text)
    pythons: tuple[_PyRange, ...] | None = None
    if py is not None:
        # Eggs and installers are built for exactly one Python.
        major, _, minor = py.partition(".")
        pythons = ((int(major), int(minor), True),)
    return _info(
        kind,
        version,
        version_text,
        frozenset({_normalize_platform(platform)}) if platform else frozenset(),
        pythons,
    )


@lru_cache(maxsize=16384)
def _file_info(project: NormalizedName, filename: str) -> _FileInfo:
    lower = filename.lower()
    if lower.endswith(".whl"):
        # The wheel spec's own split -- name-version[-build]-py-abi-platform,
        # no "-" inside a part -- with packaging's Version and parse_tag
        # behind caches.  parse_wheel_filename does the same plus name
        # validation we do not need, and cost more than the whole 5 000-file
        # budget of `apply` because nothing of it is shared between files.
        parts = filename[:-4].split("-")
        if len(parts) in (5, 6):
            version = _parse_version(parts[1])
            tag_text = "-".join(parts[-3:])
            tags = _wheel_tags(tag_text)
            if version is not None and tags is not None:
                return _info("wheel", version, parts[1], tags[0], tags[1], tag_text.lower())
        return _legacy_info(project, filename[:-4], ".whl", "wheel")
    for ext in _SDIST_EXTS:
        if lower.endswith(ext):
            if ext in (".tar.gz", ".zip"):
                try:
                    name, version = parse_sdist_filename(filename)
                except (InvalidSdistFilename, InvalidVersion):
                    pass
                else:
                    # rpartition("-") is wrong for "foo-1.0-2.tar.gz"; trust
                    # it only when the name part is the project's.
                    if str(name) == project:
                        text = filename[: -len(ext)].rpartition("-")[2]
                        return _info("sdist", version, text)
            return _legacy_info(project, filename[: -len(ext)], ext, "sdist")
    for ext in _OTHER_EXTS:
        if lower.endswith(ext):
            return _legacy_info(project, filename[: -len(ext)], ext, "other")
    return _legacy_info(project, filename, "", "other")


def file_version(project: str, filename: str) -> Version | None:
    """The version a distribution filename carries, or None if unknown."""
    return _file_info(NormalizedName(canonicalize_name(project)), filename).version


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


def _python_ok(f: Filters, rng: _PyRange) -> bool:
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


def _shape_reason(f: Filters, info: _FileInfo) -> str | None:
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


_Kept = list[tuple[ReleaseFile, _FileInfo]]


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
        info = _file_info(name, rf.filename)
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
        v = _parse_version(text)
        key: str | None = text
        if key not in by_version:
            by_version[key] = _version_reason(f, name, v, text)
        if by_version[key] is not None:
            continue
        if selected and v is not None and _release(v) not in kept_releases:
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
