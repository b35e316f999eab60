"""What a distribution's filename tells the filters: its kind, version,
release, platforms and Pythons, parsed once per filename (cached).

A file's version comes from its *filename* (wheel split + cached `Version`/
`parse_tag`, `parse_sdist_filename`, else a ``<name>-<version>`` split).  A
file whose version cannot be determined has ``version = None``; only
``regex_release`` sees its raw text.

Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, Literal

from packaging.tags import Tag, parse_tag
from packaging.utils import InvalidSdistFilename, canonicalize_name, parse_sdist_filename
from packaging.version import InvalidVersion, Version

from mirror.model import NormalizedName
from mirror.plan.versions import parse_version

__all__ = ["FileInfo", "PyRange", "file_info", "file_version", "release_of"]

# (major, lowest minor, exact): "cp38-cp38" is (3, 8, True), "cp39-abi3"
# and "py38" are (3, 9/8, False) = that minor and every later one.
PyRange = tuple[int, int, bool]


@dataclass(frozen=True, slots=True)
class FileInfo:
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
    pythons: tuple[PyRange, ...] | None = None


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


def release_of(version: Version) -> Version:
    # Local versions (2.1.0+cpu, 2.1.0+cu118) are builds of one release.
    if version.local is None:
        return version
    return parse_version(version.public) or version


def _normalize_platform(plat: str) -> str:
    # Same spelling as wheel tags: "macosx-10.9-x86_64" -> "macosx_10_9_x86_64".
    return plat.lower().replace("-", "_").replace(".", "_")


def _tag_python(tag: Tag) -> PyRange | None:
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
def _wheel_tags(tag_text: str) -> tuple[frozenset[str], tuple[PyRange, ...] | None] | None:
    """Platforms and Pythons of a wheel's compressed tag set, or None if bad.

    Cached on the tag text: a project repeats the same dozen tag sets in
    every release, and tag parsing is most of the cost of reading a wheel
    filename.
    """
    try:
        tags = parse_tag(tag_text)
    except ValueError:
        return None
    ranges: set[PyRange] | None = set()
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
        v = parse_version(candidate)
        if v is not None:
            return v, candidate
    return None, parts[0]


def _info(
    kind: Literal["wheel", "sdist", "other"],
    version: Version | None,
    version_text: str | None,
    platforms: frozenset[str] = frozenset(),
    pythons: tuple[PyRange, ...] | None = None,
    shape: str | None = None,
) -> FileInfo:
    if shape is None:
        shape = f"{kind}|{'.'.join(sorted(platforms))}|{pythons}"
    return FileInfo(
        kind=kind,
        version=version,
        version_text=version_text,
        release=release_of(version) if version is not None else None,
        shape=shape,
        platforms=platforms,
        pythons=pythons,
    )


def _legacy_info(
    project: str, stem: str, ext: str, kind: Literal["wheel", "sdist", "other"]
) -> FileInfo:
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
    pythons: tuple[PyRange, ...] | None = None
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
def file_info(project: NormalizedName, filename: str) -> FileInfo:
    lower = filename.lower()
    if lower.endswith(".whl"):
        # The wheel spec's own split -- name-version[-build]-py-abi-platform,
        # no "-" inside a part -- with packaging's Version and parse_tag
        # behind caches.  parse_wheel_filename does the same plus name
        # validation we do not need, and cost more than the whole 5 000-file
        # budget of `apply` because nothing of it is shared between files.
        parts = filename[:-4].split("-")
        if len(parts) in (5, 6):
            version = parse_version(parts[1])
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
    return file_info(NormalizedName(canonicalize_name(project)), filename).version
