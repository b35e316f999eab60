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
from typing import Final

from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from mirror.errors import ConfigError
from mirror.model import NormalizedName
from mirror.plan.versions import parse_version
from mirror.tables import Section, parse_size

__all__ = [
    "KNOWN_PLATFORM_EXAMPLES",
    "PLATFORM_FAMILIES",
    "Filters",
    "parse_filters",
    "parse_requirement_lines",
    "parse_size",
]


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
                v = parse_version(spec.version.removesuffix(".*"))
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


def _platform_pattern(s: Section, pattern: str) -> str:
    p = pattern.strip().lower()
    if not p:
        raise s.error("exclude_platforms", "empty pattern")
    if fnmatch.fnmatchcase("any", p):
        raise s.error("exclude_platforms", f"{pattern!r} matches 'any': pure-Python wheels cannot be excluded by platform")
    literal = re.split(r"[*?\[]", p, maxsplit=1)[0]
    if not (
        any(fnmatch.fnmatchcase(ex, p) for ex in KNOWN_PLATFORM_EXAMPLES)
        or literal.startswith(PLATFORM_FAMILIES)
    ):
        raise s.error(
            "exclude_platforms",
            f"{pattern!r} matches no known platform tag (families: "
            "win32, win_*, macosx_*, manylinux*, musllinux_*, linux_*, android_*, "
            "ios_*, emscripten_*, pyodide_*)",
        )
    return p


def _regexes(s: Section, key: str) -> tuple[re.Pattern[str], ...]:
    out: list[re.Pattern[str]] = []
    for text in s.strings(key) or ():
        try:
            out.append(re.compile(text))
        except re.error as exc:
            raise s.error(key, f"bad regular expression {text!r}: {exc}") from None
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
    s = Section(dict(table), "filters", source)

    allow: list[Requirement] | None = None
    allow_texts = s.strings("allow")
    if allow_texts is not None:
        allow = [_requirement(t, f"{source}: filters.allow") for t in allow_texts]
    has_allow_from = s.has("allow_from")
    if has_allow_from:
        path = s.raw_value("allow_from")
        if not isinstance(path, str) or not path:
            raise s.error("allow_from", f"expected a file name, got {path!r:.200}")
        if allow_from_text is None:
            raise s.error("allow_from", f"{path}: file contents were not provided")
        allow = (allow or []) + parse_requirement_lines(
            allow_from_text, source=f"{source}: filters.allow_from: {path}"
        )
    if allow is not None and not allow:
        # An empty allow list would mirror nothing, which is never what an
        # operator means; removing the key mirrors everything.
        raise s.error("allow_from" if has_allow_from else "allow",
                      "the allow list is empty (remove the key to mirror everything)")

    block = [_requirement(t, f"{source}: filters.block") for t in s.strings("block") or []]

    latest: int | None = None
    if s.has("latest"):
        value = s.raw_value("latest")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise s.error("latest", f"expected a positive integer, got {value!r:.200}")
        latest = value

    platforms = tuple(_platform_pattern(s, p) for p in s.strings("exclude_platforms") or ())

    python: list[SpecifierSet] = []
    for text in s.strings("python") or ():
        try:
            python.append(SpecifierSet(text))
        except InvalidSpecifier as exc:
            raise s.error("python", f"bad version specifier {text!r}: {exc}") from None

    filters = Filters(
        allow=tuple(allow) if allow is not None else None,
        block=tuple(block),
        prereleases=s.boolean("prereleases", True),
        latest=latest,
        exclude_yanked=s.boolean("exclude_yanked", False),
        exclude_sdist=s.boolean("exclude_sdist", False),
        exclude_platforms=platforms,
        python=tuple(python),
        max_file_size=s.size("max_file_size"),
        max_project_size=s.size("max_project_size"),
        regex_project=_regexes(s, "regex_project"),
        regex_release=_regexes(s, "regex_release"),
    )
    s.done()
    return filters
