"""Table-driven tests for mirror.filters (pure, synchronous)."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import parse_wheel_filename
from packaging.version import Version

from mirror.plan import filenames, filters
from mirror.errors import ConfigError
from mirror.plan.filters import (
    Filters,
    apply,
    file_version,
    parse_filters,
    parse_requirement_lines,
    parse_size,
    project_allowed,
)
from mirror.model import NormalizedName, ProjectSnapshot, ReleaseFile, Serial

SOURCE = "conf/mirror.toml"


def rf(filename: str, *, size: int | None = None, yanked: bool | str = False) -> ReleaseFile:
    return ReleaseFile(
        filename=filename,
        url=f"https://files.example/packages/aa/bb/cc/{filename}",
        path=f"packages/aa/bb/cc/{filename}",
        sha256="0" * 64,
        size=size,
        yanked=yanked,
    )


def snap(
    name: str, *files: ReleaseFile | str, versions: tuple[str, ...] = ()
) -> ProjectSnapshot:
    return ProjectSnapshot(
        name=NormalizedName(name),
        display_name=name,
        serial=Serial(1),
        files=tuple(rf(f) if isinstance(f, str) else f for f in files),
        versions=versions,
    )


def load(**table: object) -> Filters:
    return parse_filters(table, source=SOURCE)


def kept_names(f: Filters, snapshot: ProjectSnapshot) -> list[str]:
    out, dropped = apply(f, snapshot)
    # Every file is either kept or dropped with a reason, exactly once.
    assert Counter([x.filename for x in out.files] + [n for n, _ in dropped]) == Counter(
        x.filename for x in snapshot.files
    )
    assert all(reason for _, reason in dropped)
    return [x.filename for x in out.files]


def sdists(*versions: str) -> tuple[str, ...]:
    return tuple(f"foo-{v}.tar.gz" for v in versions)


# ---------------------------------------------------------------------------
# file_version
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("project", "filename", "expected"),
    [
        ("foo", "foo-1.0.tar.gz", "1.0"),
        ("foo", "foo-1.0.zip", "1.0"),
        ("foo", "foo-1.0.tar.bz2", "1.0"),
        ("foo", "foo-1.0.tgz", "1.0"),
        ("foo-bar", "foo_bar-1.0.post1.tar.gz", "1.0.post1"),
        ("foo-bar", "Foo-Bar-2.0.tar.gz", "2.0"),
        ("foo-bar", "Foo.Bar-2.0.zip", "2.0"),
        ("foo", "foo-1.0.dev3.tar.gz", "1.0.dev3"),
        ("foo", "foo-1!2.0.tar.gz", "1!2.0"),
        ("foo", "foo-1.0+cpu-cp311-cp311-linux_x86_64.whl", "1.0+cpu"),
        ("foo", "foo-1!2.0-py3-none-any.whl", "1!2.0"),
        ("foo", "foo-1.0-1-py3-none-any.whl", "1.0"),  # build tag
        ("foo", "foo-1.0-py2.py3-none-any.whl", "1.0"),
        ("foo-bar", "foo_bar-3.1-cp311-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "3.1"),
        ("foo", "foo-1.0-py2.7.egg", "1.0"),
        ("foo-bar", "foo_bar-1.0-py2.7-linux-x86_64.egg", "1.0"),
        ("foo", "foo-1.0-py2.7-macosx-10.9-x86_64.egg", "1.0"),
        ("foo", "foo-1.0.win-amd64-py2.7.exe", "1.0"),
        ("foo", "foo-1.0.win32.exe", "1.0"),
        ("foo", "foo-1.0.win32-py2.6.msi", "1.0"),
        ("foo", "foo-1.0rc1-1.noarch.rpm", "1.0rc1"),
        ("foo", "foo-1.0.linux-x86_64.tar.gz", "1.0"),  # bdist_dumb
        ("foo", "foo-1.0-2.tar.gz", "1.0.post2"),  # not name "foo-1.0", version "2"
        ("foo", "foo-1.0-beta.tar.gz", "1.0b0"),
        ("foo", "foo-1.0-r123.tar.gz", "1.0.post123"),  # "r" spells post
        ("foo", "foo-1.0-snapshot.tar.gz", "1.0"),
        ("newname", "oldname-3.1.tar.gz", "3.1"),  # renamed project
        ("foo", "foo-2004d.tar.gz", None),  # legacy, not PEP 440
        ("foo", "foo.tar.gz", None),
        ("foo", "README", None),
        ("foo", "foo-latest.zip", None),
        ("foo", "foo-x-cp311-cp311-linux_x86_64.whl", None),
    ],
)
def test_file_version(project: str, filename: str, expected: str | None) -> None:
    got = file_version(project, filename)
    assert got == (Version(expected) if expected is not None else None)


@pytest.mark.parametrize(
    "filename",
    [
        "foo-1.0-cp311-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
        "foo-1.0-py2.py3-none-any.whl",
        "foo-1.0-cp38-cp38-win_amd64.whl",
        "foo-1.0-cp312-cp312-macosx_11_0_arm64.whl",
        "foo-1.0-pp310-pypy310_pp73-manylinux_2_17_x86_64.whl",
        "foo-2.0.post1-7-cp27-cp27mu-manylinux1_x86_64.whl",
        "Foo-1.0+cu118-CP311-CP311-LINUX_X86_64.whl",
    ],
)
def test_wheel_split_agrees_with_packaging(filename: str) -> None:
    # The fast wheel path must read names exactly as parse_wheel_filename.
    _, version, _, tags = parse_wheel_filename(filename)
    info = filenames.file_info(NormalizedName("foo"), filename)
    assert info.kind == "wheel"
    assert info.version == version
    assert info.platforms == frozenset(t.platform for t in tags)


# ---------------------------------------------------------------------------
# Requirement files
# ---------------------------------------------------------------------------


def test_requirement_lines_comments_and_blanks() -> None:
    text = (
        "\ufeff# mirrored for the data team\n"
        "\n"
        "Django>=4.2  # LTS and later\n"
        "requests\r\n"
        "   numpy<3\n"
        "pywin32; sys_platform == 'win32'\n"
        "requests[socks]==2.31.0\n"
        "    # indented comment\n"
    )
    reqs = parse_requirement_lines(text, source="reqs.txt")
    assert [str(r) for r in reqs] == [
        "Django>=4.2",
        "requests",
        "numpy<3",
        'pywin32; sys_platform == "win32"',
        "requests[socks]==2.31.0",
    ]


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("django\n\n-r base.txt\n", 3, "'-r'"),
        ("--index-url https://example.invalid/simple\n", 1, "'--index-url'"),
        ("-e .\n", 1, "'-e'"),
        ("# c\nrequests==2.31.0 \\\n    --hash=sha256:00\n", 2, "continuation"),
        ("requests==2.31.0 --hash=sha256:00\n", 1, "invalid requirement"),
        ("ok\nfoo>>1\n", 2, "invalid requirement"),
        ("foo @ https://example.invalid/foo-1.0.tar.gz\n", 1, "URL"),
    ],
)
def test_requirement_lines_errors(text: str, line: int, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_requirement_lines(text, source="reqs.txt")
    assert f"reqs.txt, line {line}" in str(exc.value)
    assert fragment in str(exc.value)


# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1000, 1000),
        ("123", 123),
        ("10B", 10),
        ("1KB", 1000),
        ("500MB", 500_000_000),
        ("500mb", 500_000_000),
        ("1.5GB", 1_500_000_000),
        ("1TB", 10**12),
        ("1KiB", 1024),
        ("2 MiB", 2 * 1024**2),
        (" 2GiB ", 2 * 1024**3),
        ("1TiB", 1024**4),
    ],
)
def test_parse_size(value: object, expected: int) -> None:
    assert parse_size(value, key="filters.max_file_size", source=SOURCE) == expected


@pytest.mark.parametrize(
    "value", ["", "MB", "5XB", "5 M", "-1", "1.5.5MB", "1e6", 0, -1, True, 1.5, None, ["1MB"]]
)
def test_parse_size_errors(value: object) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_size(value, key="filters.max_file_size", source=SOURCE)
    assert str(exc.value).startswith(f"{SOURCE}: filters.max_file_size: ")


# ---------------------------------------------------------------------------
# parse_filters
# ---------------------------------------------------------------------------


def test_empty_table_mirrors_everything() -> None:
    f = load()
    assert f == Filters()
    assert not f.active
    s = snap("foo", "foo-1.0a1.tar.gz", "foo-1.0-cp38-cp38-win_amd64.whl")
    out, dropped = apply(f, s)
    assert out is s and dropped == []


def test_full_table() -> None:
    f = parse_filters(
        {
            "allow": ["Django>=4.2", "requests"],
            "allow_from": "reqs.txt",
            "block": ["evil", "numpy<1.20"],
            "prereleases": False,
            "latest": 3,
            "exclude_yanked": True,
            "exclude_sdist": True,
            "exclude_platforms": ["WIN*", "macosx*"],
            "python": [">=3.9"],
            "max_file_size": "500MB",
            "max_project_size": "5GiB",
            "regex_project": ["^test-"],
            "regex_release": [r"dev\d+$"],
        },
        source=SOURCE,
        allow_from_text="numpy<3\n# comment\n",
    )
    assert f.allow == (Requirement("Django>=4.2"), Requirement("requests"), Requirement("numpy<3"))
    assert f.block == (Requirement("evil"), Requirement("numpy<1.20"))
    assert f.prereleases is False
    assert f.latest == 3
    assert f.exclude_yanked and f.exclude_sdist
    assert f.exclude_platforms == ("win*", "macosx*")
    assert f.python == (SpecifierSet(">=3.9"),)
    assert f.max_file_size == 500_000_000
    assert f.max_project_size == 5 * 1024**3
    assert [p.pattern for p in f.regex_project] == ["^test-"]
    assert [p.pattern for p in f.regex_release] == [r"dev\d+$"]
    assert f.active


@pytest.mark.parametrize(
    "table",
    [
        {"allow": ["foo"]},
        {"allow_from": "r.txt"},
        {"block": ["foo"]},
        {"prereleases": False},
        {"latest": 1},
        {"exclude_yanked": True},
        {"exclude_sdist": True},
        {"exclude_platforms": ["win*"]},
        {"python": [">=3.9"]},
        {"max_file_size": 1},
        {"max_project_size": "1GB"},
        {"regex_project": ["^x"]},
        {"regex_release": ["x"]},
    ],
)
def test_each_option_makes_filters_active(table: dict[str, object]) -> None:
    assert parse_filters(table, source=SOURCE, allow_from_text="foo\n").active


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"bogus": 1}, "filters.bogus"),
        ({"allow": ["x"], "alow": ["y"]}, "filters.alow"),
        ({"allow": "django"}, "filters.allow"),
        ({"allow": ["django", 3]}, "filters.allow"),
        ({"allow": ["django>>4"]}, "filters.allow"),
        ({"allow": []}, "filters.allow"),
        ({"block": ["foo @ https://example.invalid/foo.whl"]}, "filters.block"),
        ({"block": ["foo=="]}, "filters.block"),
        ({"prereleases": "no"}, "filters.prereleases"),
        ({"exclude_yanked": 1}, "filters.exclude_yanked"),
        ({"exclude_sdist": "yes"}, "filters.exclude_sdist"),
        ({"latest": 0}, "filters.latest"),
        ({"latest": True}, "filters.latest"),
        ({"latest": "3"}, "filters.latest"),
        ({"exclude_platforms": "win*"}, "filters.exclude_platforms"),
        ({"exclude_platforms": ["windows*"]}, "filters.exclude_platforms"),
        ({"exclude_platforms": ["macosx"]}, "filters.exclude_platforms"),
        ({"exclude_platforms": ["osx*"]}, "filters.exclude_platforms"),
        ({"exclude_platforms": ["*"]}, "filters.exclude_platforms"),
        ({"exclude_platforms": ["any"]}, "filters.exclude_platforms"),
        ({"exclude_platforms": [""]}, "filters.exclude_platforms"),
        ({"python": ">=3.9"}, "filters.python"),
        ({"python": [">=three"]}, "filters.python"),
        ({"max_file_size": "500 parsecs"}, "filters.max_file_size"),
        ({"max_file_size": 0}, "filters.max_file_size"),
        ({"max_project_size": "5XB"}, "filters.max_project_size"),
        ({"max_project_size": 1.5}, "filters.max_project_size"),
        ({"regex_project": ["("]}, "filters.regex_project"),
        ({"regex_release": ["[a-"]}, "filters.regex_release"),
        ({"regex_release": [r"\d"], "regex_project": "x"}, "filters.regex_project"),
        ({"allow_from": 5}, "filters.allow_from"),
        ({"allow_from": "missing.txt"}, "filters.allow_from"),  # loader passed no text
    ],
)
def test_config_errors_name_the_key(table: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_filters(table, source=SOURCE)
    assert key in str(exc.value)
    assert SOURCE in str(exc.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("django\n-r base.txt\n", "reqs.txt, line 2"),
        ("django\nnot a requirement!\n", "reqs.txt, line 2"),
        ("# nothing but comments\n\n", "empty"),
    ],
)
def test_allow_from_errors(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_filters({"allow_from": "reqs.txt"}, source=SOURCE, allow_from_text=text)
    message = str(exc.value)
    assert SOURCE in message and "filters.allow_from" in message and fragment in message


def test_parse_filters_refuses_non_table() -> None:
    with pytest.raises(ConfigError):
        parse_filters(["allow"], source=SOURCE)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "pattern",
    [
        "win*",
        "win32",
        "win_amd64",
        "WIN_ARM64",
        "macosx*",
        "macosx_10_13_x86_64",  # a precise tag that is not one of the examples
        "manylinux*",
        "manylinux_2_31_*",
        "musllinux_*",
        "linux_*",
        "*_ppc64le",
        "*arm64*",
        "android_*",
        "ios_*",
        "emscripten_*",
        "pyodide_*",
    ],
)
def test_platform_patterns_accepted(pattern: str) -> None:
    assert load(exclude_platforms=[pattern]).exclude_platforms == (pattern.lower(),)


# ---------------------------------------------------------------------------
# project_allowed
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "name", "expected"),
    [
        ({"allow": ["Django>=4.2", "requests"]}, "django", None),
        ({"allow": ["Django>=4.2", "requests"]}, "requests", None),
        ({"allow": ["Django>=4.2", "requests"]}, "numpy", "not in filters.allow"),
        ({"allow": ["Foo_Bar.baz"]}, "foo-bar-baz", None),
        ({"block": ["foo"]}, "foo", "blocked by filters.block: foo"),
        ({"block": ["Foo"], "allow": ["foo"]}, "foo", "blocked by filters.block: Foo"),
        ({"block": ["foo<2"]}, "foo", None),  # version block only
        ({"block": ["foo"]}, "bar", None),
        ({"regex_project": ["^test-"]}, "test-pkg", "filters.regex_project '^test-'"),
        ({"regex_project": ["^test-"]}, "pytest-x", None),
        ({}, "anything", None),
    ],
)
def test_project_allowed(table: dict[str, object], name: str, expected: str | None) -> None:
    assert project_allowed(load(**table), NormalizedName(name)) == expected


def test_refused_project_loses_every_file() -> None:
    f = load(allow=["requests"])
    s = snap("numpy", "numpy-1.0.tar.gz", "numpy-1.0-py3-none-any.whl", versions=("1.0",))
    out, dropped = apply(f, s)
    assert out.files == () and out.versions == ()
    assert dropped == [
        ("numpy-1.0.tar.gz", "not in filters.allow"),
        ("numpy-1.0-py3-none-any.whl", "not in filters.allow"),
    ]


# ---------------------------------------------------------------------------
# Version filters: allow/block specifiers, prereleases, regex_release
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "files", "expected"),
    [
        pytest.param(
            {"allow": ["foo>=4.2"]},
            sdists("3.2", "4.1", "4.2", "4.2.post1", "4.2+local", "5.0rc1", "5.0"),
            sdists("4.2", "4.2.post1", "4.2+local", "5.0rc1", "5.0"),
            id="allow-specifier-keeps-prereleases-by-default",
        ),
        pytest.param(
            {"allow": ["foo==1.*", "foo>=3"]},
            sdists("1.0", "1.5", "2.0", "3.0"),
            sdists("1.0", "1.5", "3.0"),
            id="allow-entries-for-one-project-are-a-union",
        ),
        pytest.param(
            {"allow": ["foo>=3", "foo"]},
            sdists("1.0", "3.0"),
            sdists("1.0", "3.0"),
            id="allow-bare-name-wins",
        ),
        pytest.param(
            {"allow": ["foo==1.0"]},
            sdists("1.0", "1.0+cpu", "1.0.post1", "1.0.0"),
            sdists("1.0", "1.0+cpu", "1.0.0"),
            id="allow-local-and-zero-padding-match-pep440",
        ),
        pytest.param(
            {"block": ["foo<2"]},
            sdists("1.0", "1.9.post1", "2.0a1", "2.0"),
            sdists("2.0a1", "2.0"),
            id="block-specifier-drops-versions",
        ),
        pytest.param(
            {"block": ["foo==1.0"]},
            sdists("1.0", "1.0+cpu", "1.0.post1"),
            sdists("1.0.post1"),
            id="block-matches-local-versions",
        ),
        pytest.param(
            {"block": ["foo<2", "foo>=3"]},
            sdists("1.0", "2.5", "3.0"),
            sdists("2.5"),
            id="block-entries-are-a-union",
        ),
        pytest.param(
            {"prereleases": False},
            sdists(
                "1.0a1", "1.0b2", "1.0rc1", "1.0.dev3", "1.0.post1.dev1", "1.0", "1.0.post1",
                "1.0+cpu",
            ),
            sdists("1.0", "1.0.post1", "1.0+cpu"),
            id="prereleases-false-drops-pre-and-dev",
        ),
        pytest.param(
            {"regex_release": [r"dev\d+$"]},
            sdists("1.0.dev3", "1.0", "1.0.post1"),
            sdists("1.0", "1.0.post1"),
            id="regex-release",
        ),
        pytest.param(
            {"regex_release": [r"^0\.", r"rc"]},
            sdists("0.9", "1.0rc1", "1.0"),
            sdists("1.0"),
            id="regex-release-normalized-form",
        ),
        pytest.param(
            {"allow": ["foo>=2"], "prereleases": False},
            ("foo-2004d.tar.gz", "foo.tar.gz", "foo-1.0.tar.gz", "foo-2.0.tar.gz"),
            ("foo-2004d.tar.gz", "foo.tar.gz", "foo-2.0.tar.gz"),
            id="unknown-versions-are-kept",
        ),
        pytest.param(
            {"regex_release": ["d$"]},
            ("foo-2004d.tar.gz", "foo-1.0.tar.gz"),
            ("foo-1.0.tar.gz",),
            id="regex-release-applies-to-unparsable-versions",
        ),
        pytest.param(
            {"allow": ["foo>=2"]},
            ("foo-1.0-py2.7.egg", "foo-2.0-py2.7.egg", "foo-1.0.win32.exe", "foo-2.0.win32.exe"),
            ("foo-2.0-py2.7.egg", "foo-2.0.win32.exe"),
            id="legacy-formats-get-versions",
        ),
        pytest.param(
            {"allow": ["foo>=2"]},
            ("foo-1!1.0.tar.gz", "foo-3.0.tar.gz", "foo-1.9.tar.gz"),
            ("foo-1!1.0.tar.gz", "foo-3.0.tar.gz"),
            id="epoch-sorts-above",
        ),
    ],
)
def test_version_filters(
    table: dict[str, object], files: tuple[str, ...], expected: tuple[str, ...]
) -> None:
    assert kept_names(load(**table), snap("foo", *files)) == list(expected)


def test_version_reasons() -> None:
    f = load(allow=["foo>=2"], block=["foo==3.0"], prereleases=False, regex_release=["^5"])
    _, dropped = apply(f, snap("foo", *sdists("1.0", "3.0", "4.0b1", "5.0", "6.0")))
    assert dropped == [
        ("foo-1.0.tar.gz", "filters.allow: 1.0 does not match foo>=2"),
        ("foo-3.0.tar.gz", "filters.block: foo==3.0 matches 3.0"),
        ("foo-4.0b1.tar.gz", "filters.prereleases: 4.0b1 is a pre-release"),
        ("foo-5.0.tar.gz", "filters.regex_release '^5' matches 5.0"),
    ]


# ---------------------------------------------------------------------------
# latest, yanked
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "files", "expected"),
    [
        pytest.param(
            {"latest": 2},
            (rf("foo-1.0.tar.gz"), rf("foo-2.0.tar.gz"), rf("foo-3.0.tar.gz", yanked=True),
             rf("foo-2.5.tar.gz")),
            ("foo-2.0.tar.gz", "foo-2.5.tar.gz"),
            id="yanked-neither-counted-nor-kept",
        ),
        pytest.param(
            {"latest": 1},
            (rf("foo-1.0.tar.gz"), rf("foo-2.0.tar.gz", yanked="broken build")),
            ("foo-1.0.tar.gz",),
            id="yanked-with-reason",
        ),
        pytest.param(
            {"latest": 1},
            ("foo-1.0.tar.gz", "foo-1.0.post1.tar.gz", "foo-1.0.post1-py3-none-any.whl"),
            ("foo-1.0.post1.tar.gz", "foo-1.0.post1-py3-none-any.whl"),
            id="post-release-is-newer-all-files-kept",
        ),
        pytest.param(
            {"latest": 1},
            ("foo-3.0.tar.gz", "foo-1!2.0.tar.gz"),
            ("foo-1!2.0.tar.gz",),
            id="epoch",
        ),
        pytest.param(
            {"latest": 1},
            ("foo-1.0.tar.gz", "foo-2.0+cpu-cp311-cp311-linux_x86_64.whl",
             "foo-2.0+cu118-cp311-cp311-linux_x86_64.whl"),
            ("foo-2.0+cpu-cp311-cp311-linux_x86_64.whl",
             "foo-2.0+cu118-cp311-cp311-linux_x86_64.whl"),
            id="local-versions-are-one-release",
        ),
        pytest.param(
            {"latest": 1},
            ("foo-1.0.tar.gz", "foo-2.0.dev3.tar.gz"),
            ("foo-2.0.dev3.tar.gz",),
            id="dev-counts-when-prereleases-kept",
        ),
        pytest.param(
            {"latest": 1, "prereleases": False},
            ("foo-1.0.tar.gz", "foo-2.0rc1.tar.gz", "foo-2.0.dev3.tar.gz"),
            ("foo-1.0.tar.gz",),
            id="prereleases-filtered-before-counting",
        ),
        pytest.param(
            {"latest": 1, "exclude_platforms": ["win*"]},
            ("foo-1.0.tar.gz", "foo-2.0-cp311-cp311-win_amd64.whl"),
            ("foo-1.0.tar.gz",),
            id="release-without-surviving-files-does-not-count",
        ),
        pytest.param(
            {"latest": 1},
            ("foo-2004d.tar.gz", "foo-1.0.tar.gz", "foo-2.0.tar.gz"),
            ("foo-2004d.tar.gz", "foo-2.0.tar.gz"),
            id="unknown-version-kept",
        ),
        pytest.param(
            {"latest": 5},
            sdists("1.0", "2.0"),
            sdists("1.0", "2.0"),
            id="fewer-releases-than-n",
        ),
        pytest.param(
            {"exclude_yanked": True},
            (rf("foo-1.0.tar.gz", yanked=True), rf("foo-2.0.tar.gz"), rf("foo-3.0.zip", yanked="")),
            ("foo-2.0.tar.gz",),
            id="exclude-yanked",
        ),
    ],
)
def test_latest_and_yanked(
    table: dict[str, object], files: tuple[ReleaseFile | str, ...], expected: tuple[str, ...]
) -> None:
    assert kept_names(load(**table), snap("foo", *files)) == list(expected)


# ---------------------------------------------------------------------------
# Wheel tags: python and exclude_platforms; exclude_sdist
# ---------------------------------------------------------------------------

WHEELS = {
    "cp38": "foo-1.0-cp38-cp38-win_amd64.whl",
    "py2.py3": "foo-1.0-py2.py3-none-any.whl",
    "py3": "foo-1.0-py3-none-any.whl",
    "py2": "foo-1.0-py2-none-any.whl",
    "py38": "foo-1.0-py38-none-any.whl",
    "cp37-abi3": "foo-1.0-cp37-abi3-manylinux_2_17_x86_64.whl",
    "cp311-abi3": "foo-1.0-cp311-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "cp39": "foo-1.0-cp39-cp39-manylinux_2_17_x86_64.whl",
    "cp310": "foo-1.0-cp310-cp310-musllinux_1_1_x86_64.whl",
    "cp312-mac": "foo-1.0-cp312-cp312-macosx_11_0_arm64.whl",
    "pp310": "foo-1.0-pp310-pypy310_pp73-manylinux_2_17_x86_64.whl",
    "pp38": "foo-1.0-pp38-pypy38_pp73-win_amd64.whl",
    "cp27mu": "foo-1.0-cp27-cp27mu-manylinux1_x86_64.whl",
    "cp26": "foo-1.0-cp26-none-linux_x86_64.whl",
    "graalpy311": "foo-1.0-graalpy311-graalpy242_311_native-manylinux_2_28_x86_64.whl",
    "odd-interpreter": "foo-1.0-xx-none-any.whl",
    "universal-mac-win": "foo-1.0-cp311-cp311-macosx_10_9_universal2.win_amd64.whl",
    "mac-or-linux": "foo-1.0-cp311-cp311-macosx_10_9_x86_64.manylinux_2_17_x86_64.whl",
    "linux": "foo-1.0-cp311-cp311-linux_x86_64.whl",
    "sdist": "foo-1.0.tar.gz",
    "sdist-zip": "foo-1.0.zip",
    "sdist-bz2": "foo-1.0.tar.bz2",
    "egg27": "foo-1.0-py2.7.egg",
    "egg39-win": "foo-1.0-py3.9-win32.egg",
    "exe": "foo-1.0.win-amd64-py2.7.exe",
    "exe-noplat": "foo-1.0.exe",
    "msi": "foo-1.0.win32-py3.9.msi",
    "dumb": "foo-1.0.linux-x86_64.tar.gz",
}


@pytest.mark.parametrize(
    ("table", "dropped"),
    [
        pytest.param(
            {"python": [">=3.9"]},
            {"cp38", "py2", "pp38", "cp27mu", "cp26", "egg27", "exe"},
            id="python>=3.9",
        ),
        pytest.param(
            {"python": ["<3"]},
            {"cp38", "py3", "py38", "cp37-abi3", "cp311-abi3", "cp39", "cp310", "cp312-mac",
             "pp310", "pp38", "graalpy311", "universal-mac-win", "mac-or-linux", "linux",
             "egg39-win", "msi"},
            id="python<3",
        ),
        pytest.param(
            {"python": ["==3.9.1"]},
            {"cp38", "py2", "cp311-abi3", "cp310", "cp312-mac", "pp310", "pp38", "cp27mu",
             "cp26", "graalpy311", "universal-mac-win", "mac-or-linux", "linux", "egg27", "exe"},
            id="python==3.9.1-keeps-cp39",
        ),
        pytest.param(
            {"python": ["==2.7.*", ">=3.12"]},
            {"cp38", "cp39", "cp310", "pp310", "pp38", "cp26", "graalpy311",
             "universal-mac-win", "mac-or-linux", "linux", "egg39-win", "msi"},
            id="python-union",
        ),
        pytest.param(
            {"python": [">=3.25"]},
            {"cp38", "py2", "cp39", "cp310", "cp312-mac", "pp310", "pp38", "cp27mu", "cp26",
             "graalpy311", "universal-mac-win", "mac-or-linux", "linux", "egg27", "egg39-win",
             "exe", "msi"},
            id="python-beyond-known-minors-keeps-open-ended",
        ),
        pytest.param(
            {"exclude_platforms": ["win*", "macosx*"]},
            {"cp38", "cp312-mac", "pp38", "universal-mac-win", "egg39-win", "exe",
             "exe-noplat", "msi"},
            id="exclude-win-mac",
        ),
        pytest.param(
            {"exclude_platforms": ["manylinux*"]},
            {"cp37-abi3", "cp311-abi3", "cp39", "pp310", "cp27mu", "graalpy311"},
            id="exclude-manylinux-not-musllinux-or-linux",
        ),
        pytest.param(
            {"exclude_platforms": ["linux_*"]},
            {"cp26", "linux", "dumb"},
            id="exclude-linux-only-plain-linux",
        ),
        pytest.param(
            {"exclude_sdist": True},
            {"sdist", "sdist-zip", "sdist-bz2"},
            id="exclude-sdist",
        ),
    ],
)
def test_file_shape_filters(table: dict[str, object], dropped: set[str]) -> None:
    assert dropped <= WHEELS.keys()
    expected = [fn for key, fn in WHEELS.items() if key not in dropped]
    assert kept_names(load(**table), snap("foo", *WHEELS.values())) == expected


def test_shape_reasons() -> None:
    f = load(python=[">=3.9"], exclude_platforms=["win*"], exclude_sdist=True)
    _, dropped = apply(f, snap("foo", WHEELS["cp38"], WHEELS["py2"], WHEELS["sdist"]))
    assert dropped == [
        (WHEELS["cp38"], "filters.exclude_platforms: win_amd64"),
        (WHEELS["py2"], "filters.python: runs on no Python matching >=3.9"),
        (WHEELS["sdist"], "filters.exclude_sdist"),
    ]


# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------


def test_max_file_size() -> None:
    f = load(max_file_size="1MB")
    files = (
        rf("foo-1.0.tar.gz", size=999_999),
        rf("foo-1.0.zip", size=1_000_000),
        rf("foo-1.0-py3-none-any.whl", size=1_000_001),
        rf("foo-1.0-py2-none-any.whl", size=None),  # unknown size: kept
    )
    out, dropped = apply(f, snap("foo", *files))
    assert [x.filename for x in out.files] == ["foo-1.0.tar.gz", "foo-1.0.zip", "foo-1.0-py2-none-any.whl"]
    assert dropped == [
        ("foo-1.0-py3-none-any.whl", "filters.max_file_size: 1000001 bytes > 1000000")
    ]


PROJECT = (
    rf("foo-1.0.tar.gz", size=100),
    rf("foo-3.0.tar.gz", size=400),
    rf("foo-3.0-py3-none-any.whl", size=200),
    rf("foo-2.0.tar.gz", size=150),
    rf("foo-2.0-py3-none-any.whl", size=150),
    rf("foo-1!0.1.tar.gz", size=50),
)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        pytest.param(
            {"max_project_size": 1000},
            ["foo-3.0.tar.gz", "foo-3.0-py3-none-any.whl", "foo-2.0.tar.gz",
             "foo-2.0-py3-none-any.whl", "foo-1!0.1.tar.gz"],
            id="epoch-release-counts-first",
        ),
        pytest.param({"max_project_size": 1100}, [f.filename for f in PROJECT], id="exact-fit"),
        pytest.param(
            {"max_project_size": 700},
            ["foo-3.0.tar.gz", "foo-3.0-py3-none-any.whl", "foo-1!0.1.tar.gz"],
            id="stops-at-first-misfit",
        ),
        pytest.param({"max_project_size": 40}, [], id="newest-does-not-fit"),
        pytest.param(
            {"max_project_size": 1000, "latest": 2},
            ["foo-3.0.tar.gz", "foo-3.0-py3-none-any.whl", "foo-1!0.1.tar.gz"],
            id="after-latest",
        ),
        pytest.param(
            {"max_project_size": "1KB", "exclude_sdist": True},
            ["foo-3.0-py3-none-any.whl", "foo-2.0-py3-none-any.whl"],
            id="counts-only-surviving-files",
        ),
    ],
)
def test_max_project_size(table: dict[str, object], expected: list[str]) -> None:
    assert kept_names(load(**table), snap("foo", *PROJECT)) == expected


def test_max_project_size_unknown_versions_count_last() -> None:
    f = load(max_project_size=500)
    files = (rf("foo-2004d.tar.gz", size=300), rf("foo-1.0.tar.gz", size=300))
    out, dropped = apply(f, snap("foo", *files))
    assert [x.filename for x in out.files] == ["foo-1.0.tar.gz"]
    assert dropped == [
        (
            "foo-2004d.tar.gz",
            "filters.max_project_size: over 500 bytes; kept the 1 newest release(s), 300 bytes",
        )
    ]


# ---------------------------------------------------------------------------
# versions after apply
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ({"prereleases": False}, ("1.0", "3.0", "4.0", "2004d")),
        ({"allow": ["foo<3"]}, ("1.0", "2.0rc1", "2004d")),
        ({"exclude_platforms": ["win*"]}, ("1.0", "2.0rc1", "3.0", "4.0", "2004d")),
        # latest/max_project_size select releases by their files: only
        # versions that kept a file remain.
        ({"latest": 1}, ("3.0", "2004d")),
        ({"max_project_size": 1}, ("3.0", "2004d")),
    ],
)
def test_versions_after_apply(table: dict[str, object], expected: tuple[str, ...]) -> None:
    s = snap(
        "foo",
        rf("foo-1.0.tar.gz", size=1),
        rf("foo-2.0rc1.tar.gz", size=1),
        rf("foo-3.0.tar.gz", size=1),
        versions=("1.0", "2.0rc1", "3.0", "4.0", "2004d"),
    )
    out, _ = apply(load(**table), s)
    assert out.versions == expected
    assert (out.name, out.display_name, out.serial) == (s.name, s.display_name, s.serial)


# ---------------------------------------------------------------------------
# Speed
# ---------------------------------------------------------------------------


def test_5000_files_filter_fast() -> None:
    tags = [
        "cp38-cp38-win_amd64",
        "cp39-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64",
        "py3-none-any",
        "cp312-cp312-macosx_11_0_arm64",
        "pp310-pypy310_pp73-manylinux_2_17_x86_64",
        "cp311-cp311-musllinux_1_1_x86_64",
        "cp310-cp310-manylinux_2_17_aarch64.manylinux2014_aarch64",
        "cp313-cp313-win32",
        "cp39-cp39-manylinux_2_17_x86_64",
    ]
    files = []
    for i in range(500):
        version = f"{i // 100}.{i % 100}.{'0rc1' if i % 7 == 0 else '0'}"
        files.append(rf(f"foo-{version}.tar.gz", size=1000))
        files += [rf(f"foo-{version}-{t}.whl", size=1000) for t in tags]
    s = snap("foo", *files, versions=tuple(f"{i // 100}.{i % 100}.0" for i in range(500)))
    assert len(s.files) == 5000
    f = load(
        allow=["foo>=0.5"],
        block=["foo==3.3.*"],
        prereleases=False,
        latest=100,
        exclude_platforms=["win*", "macosx*"],
        python=[">=3.9"],
        max_file_size="1MB",
        max_project_size="10MB",
        regex_release=["^4\\.99"],
    )
    best = float("inf")
    for _ in range(5):
        # Cold: a full-PyPI sync sees each filename once, so caches miss.
        filenames.file_info.cache_clear()
        filters.parse_version.cache_clear()
        filenames._wheel_tags.cache_clear()
        start = time.perf_counter()
        out, dropped = apply(f, s)
        best = min(best, time.perf_counter() - start)
    assert len(out.files) + len(dropped) == 5000
    assert 0 < len(out.files) < 5000
    # About 25 ms here (50 ms on a busy CI run). The bound is ten times wider so a slow or busy CI
    # machine does not fail it; a quadratic regression (25M steps) still does.
    assert best < 0.5, f"apply took {best * 1000:.1f} ms for 5000 files"
