"""Parse and validate the ``[filters]`` config table into a `Filters` value.

`parse_filters` runs once, at load time, and reports everything that can be
wrong with the table (unknown keys, wrong types, bad specifiers, regexes,
sizes, platform patterns) as a `ConfigError` naming ``filters.<key>`` and the
config source, so a daemon never discovers a typo hours into a sync.  The
config loader reads the ``allow_from`` file and hands its text in.  Pure: no
I/O.  Evaluating a `Filters` against a project is `mirror.filters`' job.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Final

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from mirror.errors import ConfigError
from mirror.model import NormalizedName

__all__ = [
    "KNOWN_PLATFORM_EXAMPLES",
    "PLATFORM_FAMILIES",
    "Filters",
    "parse_filters",
    "parse_requirement_lines",
    "parse_size",
]


def _parse_version(text: str) -> Version | None:
    # Uncached twin of `mirror.filters._parse_version` (which this module
    # must not import); only used on the few versions a config names.
    try:
        return Version(text)
    except InvalidVersion:
        return None


# --------------------------------------------------------------------------
# The parsed configuration
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """Every ``[filters]`` option, parsed.  ``Filters()`` mirrors everything.

    ``allow is None`` means "no allow list"; an empty tuple would allow
    nothing (`parse_filters` refuses to produce that from a config).
    ``allow`` already includes the entries read from ``allow_from``.
    """

    allow: tuple[Requirement, ...] | None = None
    block: tuple[Requirement, ...] = ()
    prereleases: bool = True
    latest: int | None = None
    exclude_yanked: bool = False
    exclude_sdist: bool = False
    # fnmatch patterns, lower case (packaging lower-cases wheel tags).
    exclude_platforms: tuple[str, ...] = ()
    # A wheel is kept when *any* of these sets admits a Python it runs on.
    python: tuple[SpecifierSet, ...] = ()
    max_file_size: int | None = None
    max_project_size: int | None = None
    regex_project: tuple[re.Pattern[str], ...] = ()
    regex_release: tuple[re.Pattern[str], ...] = ()

    # Lookup structures derived from the fields above; built once so the
    # per-project and per-file checks are dict lookups, not list scans.
    # name -> specifier-carrying entries; () means "any version".
    _allow_index: Mapping[NormalizedName, tuple[Requirement, ...]] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _block_whole: Mapping[NormalizedName, Requirement] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _block_versions: Mapping[NormalizedName, tuple[Requirement, ...]] = field(
        init=False, repr=False, compare=False, hash=False
    )
    _platform_re: re.Pattern[str] | None = field(
        init=False, repr=False, compare=False, hash=False
    )
    # Versions named in ``python`` specifiers, used as extra probe points.
    _python_probes: tuple[Version, ...] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        any_version: set[NormalizedName] = set()
        allow_specs: dict[NormalizedName, list[Requirement]] = {}
        for req in self.allow or ():
            name = NormalizedName(canonicalize_name(req.name))
            allow_specs.setdefault(name, [])
            if req.specifier:
                allow_specs[name].append(req)
            else:
                any_version.add(name)
        allow_index = {
            name: () if name in any_version else tuple(reqs)
            for name, reqs in allow_specs.items()
        }

        block_whole: dict[NormalizedName, Requirement] = {}
        block_versions: dict[NormalizedName, list[Requirement]] = {}
        for req in self.block:
            name = NormalizedName(canonicalize_name(req.name))
            if req.specifier:
                block_versions.setdefault(name, []).append(req)
            else:
                block_whole.setdefault(name, req)

        platform_re = (
            re.compile("|".join(fnmatch.translate(p) for p in self.exclude_platforms))
            if self.exclude_platforms
            else None
        )

        probes: list[Version] = []
        for spec_set in self.python:
            for spec in spec_set:
                v = _parse_version(spec.version.removesuffix(".*"))
                if v is not None:
                    probes.append(v)

        object.__setattr__(self, "_allow_index", allow_index)
        object.__setattr__(self, "_block_whole", block_whole)
        object.__setattr__(
            self, "_block_versions", {n: tuple(r) for n, r in block_versions.items()}
        )
        object.__setattr__(self, "_platform_re", platform_re)
        object.__setattr__(self, "_python_probes", tuple(probes))

    @property
    def active(self) -> bool:
        """False when nothing is configured (every file would be mirrored)."""
        return bool(
            self.allow is not None
            or self.block
            or not self.prereleases
            or self.latest is not None
            or self.exclude_yanked
            or self.exclude_sdist
            or self.exclude_platforms
            or self.python
            or self.max_file_size is not None
            or self.max_project_size is not None
            or self.regex_project
            or self.regex_release
        )


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------

_KNOWN_KEYS: Final = (
    "allow",
    "allow_from",
    "block",
    "prereleases",
    "latest",
    "exclude_yanked",
    "exclude_sdist",
    "exclude_platforms",
    "python",
    "max_file_size",
    "max_project_size",
    "regex_project",
    "regex_release",
)

# One representative platform tag per shape that exists on PyPI.  An
# ``exclude_platforms`` pattern must match at least one of them (or start
# with a family prefix below): a pattern like "windows*" or "osx*" would
# otherwise silently exclude nothing.
KNOWN_PLATFORM_EXAMPLES: Final[tuple[str, ...]] = (
    "win32",
    "win_amd64",
    "win_arm64",
    "win_ia64",
    "macosx_10_6_intel",
    "macosx_10_9_x86_64",
    "macosx_10_9_universal2",
    "macosx_11_0_arm64",
    "macosx_14_0_x86_64",
    "manylinux1_x86_64",
    "manylinux1_i686",
    "manylinux2010_x86_64",
    "manylinux2014_aarch64",
    "manylinux2014_ppc64le",
    "manylinux2014_s390x",
    "manylinux2014_armv7l",
    "manylinux_2_17_x86_64",
    "manylinux_2_28_aarch64",
    "musllinux_1_1_x86_64",
    "musllinux_1_2_aarch64",
    "linux_x86_64",
    "linux_i686",
    "linux_aarch64",
    "linux_armv7l",
    "android_21_arm64_v8a",
    "android_21_x86_64",
    "ios_13_0_arm64_iphoneos",
    "ios_13_0_x86_64_iphonesimulator",
    "emscripten_3_1_58_wasm32",
    "pyodide_2024_0_wasm32",
)
# Literal prefixes of the same families, so that a precise tag such as
# "macosx_10_13_x86_64" or "manylinux_2_31_*" is accepted even though it is
# not one of the examples.
PLATFORM_FAMILIES: Final[tuple[str, ...]] = (
    "win32",
    "win_",
    "macosx_",
    "manylinux",
    "musllinux_",
    "linux_",
    "android_",
    "ios_",
    "emscripten_",
    "pyodide_",
)

_SIZE_UNITS: Final[Mapping[str, int]] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def _error(source: str, key: str, detail: str) -> ConfigError:
    return ConfigError(f"{source}: filters.{key}: {detail}")


def parse_size(value: object, *, key: str, source: str) -> int:
    """Parse a size: an integer (bytes) or a string like "500MB" / "1.5GiB".

    Units are B, KB/MB/GB/TB (powers of 1000) and KiB/MiB/GiB/TiB (powers of
    1024), case-insensitive.  ``key`` is the full dotted key used in the
    error message (e.g. ``"filters.max_file_size"``), so the config loader
    can reuse this for other sections.
    """
    # bool is an int subclass; `max_file_size = true` is a mistake, not 1 byte.
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(
            f"{source}: {key}: expected an integer (bytes) or a string such as "
            f'"500MB", got {type(value).__name__}'
        )
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE_RE.fullmatch(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ConfigError(
                f"{source}: {key}: cannot parse size {value!r} (use e.g. 500MB, "
                "2GiB or a number of bytes; units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
            )
        # Decimal, not float: "1.1GB" must be exactly 1_100_000_000 bytes.
        size = int(Decimal(m.group(1)) * _SIZE_UNITS[unit or ""])
    if size <= 0:
        raise ConfigError(f"{source}: {key}: must be a positive size, got {value!r}")
    return size


def _requirement(text: str, where: str) -> Requirement:
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        raise ConfigError(f"{where}: invalid requirement {text!r}: {exc}") from None
    if req.url is not None:
        # A direct reference names an artifact, not a project on the index.
        raise ConfigError(f"{where}: {text!r}: URL requirements cannot be mirrored")
    # Extras and markers are accepted and ignored: a mirror serves every
    # environment, so "pywin32; sys_platform == 'win32'" still means pywin32.
    return req


# pip's rule: '#' starts a comment at the start of a line or after whitespace.
_COMMENT: Final = re.compile(r"(?:^|\s)#.*")


def parse_requirement_lines(text: str, *, source: str) -> list[Requirement]:
    """Parse a requirements-style file: one PEP 508 requirement per line.

    Blank lines and ``#`` comments (whole-line or after whitespace) are
    skipped.  pip options (``-r``, ``-e``, ``--index-url``, ``--hash`` ...)
    and line continuations are refused with the line number: silently
    ignoring an ``-r other.txt`` would mirror less than the operator asked.
    """
    reqs: list[Requirement] = []
    # Split on "\n" only, so the reported line numbers match an editor's.
    for lineno, raw in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        where = f"{source}, line {lineno}"
        if line.startswith("-"):
            raise ConfigError(
                f"{where}: {line.split()[0]!r}: pip options are not supported; "
                "list one requirement per line"
            )
        if line.endswith("\\"):
            raise ConfigError(f"{where}: line continuations are not supported")
        reqs.append(_requirement(line, where))
    return reqs


def _str_list(table: Mapping[str, object], key: str, source: str) -> list[str] | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
        raise _error(source, key, f"expected a list of strings, got {value!r:.200}")
    return list(value)


def _bool(table: Mapping[str, object], key: str, source: str, default: bool) -> bool:
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise _error(source, key, f"expected true or false, got {value!r:.200}")
    return value


def _platform_pattern(pattern: str, source: str) -> str:
    p = pattern.strip().lower()
    if not p:
        raise _error(source, "exclude_platforms", "empty pattern")
    if fnmatch.fnmatchcase("any", p):
        raise _error(
            source,
            "exclude_platforms",
            f"{pattern!r} matches 'any': pure-Python wheels cannot be excluded by platform",
        )
    literal = re.split(r"[*?\[]", p, maxsplit=1)[0]
    if not (
        any(fnmatch.fnmatchcase(ex, p) for ex in KNOWN_PLATFORM_EXAMPLES)
        or literal.startswith(PLATFORM_FAMILIES)
    ):
        raise _error(
            source,
            "exclude_platforms",
            f"{pattern!r} matches no known platform tag (families: "
            "win32, win_*, macosx_*, manylinux*, musllinux_*, linux_*, android_*, "
            "ios_*, emscripten_*, pyodide_*)",
        )
    return p


def _regexes(table: Mapping[str, object], key: str, source: str) -> tuple[re.Pattern[str], ...]:
    out: list[re.Pattern[str]] = []
    for text in _str_list(table, key, source) or ():
        try:
            out.append(re.compile(text))
        except re.error as exc:
            raise _error(source, key, f"bad regular expression {text!r}: {exc}") from None
    return tuple(out)


def parse_filters(
    table: Mapping[str, object], *, source: str, allow_from_text: str | None = None
) -> Filters:
    """Validate a ``[filters]`` table into `Filters`, or raise `ConfigError`.

    ``source`` names the config (usually its path) in error messages.  When
    the table has ``allow_from``, the loader must read that file and pass its
    contents as ``allow_from_text``; its entries are merged into ``allow``.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: [filters] must be a table, got {type(table).__name__}")
    unknown = sorted(str(k) for k in table if k not in _KNOWN_KEYS)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join('filters.' + k for k in unknown)} "
            f"(known: {', '.join(sorted(_KNOWN_KEYS))})"
        )

    allow: list[Requirement] | None = None
    allow_texts = _str_list(table, "allow", source)
    if allow_texts is not None:
        allow = [_requirement(t, f"{source}: filters.allow") for t in allow_texts]
    if "allow_from" in table:
        path = table["allow_from"]
        if not isinstance(path, str) or not path:
            raise _error(source, "allow_from", f"expected a file name, got {path!r:.200}")
        if allow_from_text is None:
            raise _error(source, "allow_from", f"{path}: file contents were not provided")
        allow = (allow or []) + parse_requirement_lines(
            allow_from_text, source=f"{source}: filters.allow_from: {path}"
        )
    if allow is not None and not allow:
        # An empty allow list would mirror nothing, which is never what an
        # operator means; removing the key mirrors everything.
        key = "allow_from" if "allow_from" in table else "allow"
        raise _error(source, key, "the allow list is empty (remove the key to mirror everything)")

    block_texts = _str_list(table, "block", source) or []
    block = [_requirement(t, f"{source}: filters.block") for t in block_texts]

    latest: int | None = None
    if "latest" in table:
        value = table["latest"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise _error(source, "latest", f"expected a positive integer, got {value!r:.200}")
        latest = value

    platforms = tuple(
        _platform_pattern(p, source) for p in _str_list(table, "exclude_platforms", source) or ()
    )

    python: list[SpecifierSet] = []
    for text in _str_list(table, "python", source) or ():
        try:
            python.append(SpecifierSet(text))
        except InvalidSpecifier as exc:
            raise _error(source, "python", f"bad version specifier {text!r}: {exc}") from None

    sizes: dict[str, int | None] = {}
    for key in ("max_file_size", "max_project_size"):
        sizes[key] = (
            parse_size(table[key], key=f"filters.{key}", source=source) if key in table else None
        )

    return Filters(
        allow=tuple(allow) if allow is not None else None,
        block=tuple(block),
        prereleases=_bool(table, "prereleases", source, True),
        latest=latest,
        exclude_yanked=_bool(table, "exclude_yanked", source, False),
        exclude_sdist=_bool(table, "exclude_sdist", source, False),
        exclude_platforms=platforms,
        python=tuple(python),
        max_file_size=sizes["max_file_size"],
        max_project_size=sizes["max_project_size"],
        regex_project=_regexes(table, "regex_project", source),
        regex_release=_regexes(table, "regex_release", source),
    )
