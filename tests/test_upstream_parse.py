"""The pure parsers of `mirror.upstream` and the constructors of `mirror.model`."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from mirror.errors import MalformedResponse, UnsafeName, UnsafePath, UnsafeURL, UnsupportedAPIVersion
from mirror.model import NormalizedName, file_relpath, normalize_name, safe_relpath
from mirror.upstream.parse import (
    check_api_version,
    file_url,
    header_serial,
    parse_changelog,
    parse_project_html,
    parse_project_json,
    parse_root_json,
)

SHA = "0123456789abcdef" * 4
SHA2 = "fedcba9876543210" * 4
MD_SHA = "ab" * 32
PAGE = "https://up.test/simple/demo/"
DEMO = NormalizedName("demo")


# -- normalize_name ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Django", "django"),
        ("a", "a"),
        ("A1", "a1"),
        ("Foo.Bar_baz", "foo-bar-baz"),
        ("foo--__..bar", "foo-bar"),
        ("zope.interface", "zope-interface"),
        ("x" * 200, "x" * 200),
    ],
)
def test_normalize_name_valid(raw: str, expected: str) -> None:
    assert normalize_name(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["../x", "", "a" * 300, "x" * 201, "foo\x00", "foo bar", "foo/bar", "foo\\bar", ".hidden", "-x", "x-",
     "x_", "naïve", "foo\n", "\nfoo", "foo\r", "%2e%2e", None, 5],
)
def test_normalize_name_invalid(raw: Any) -> None:
    with pytest.raises(UnsafeName):
        normalize_name(raw)


# -- safe_relpath / file_relpath ----------------------------------------------------


@pytest.mark.parametrize("path", ["packages/ab/cd/x.whl", "simple/demo/index.html", "a", "x+y~z!_-.1"])
def test_safe_relpath_accepts(path: str) -> None:
    assert safe_relpath(path) == path


@pytest.mark.parametrize(
    "path",
    ["", "/abs/x", "a//b", "a/", "a/../b", "..", ".", "a/./b", "a\\b", "a\x00b", "a/%2e%2e/b", "a/%2F/b",
     "a b", "a:b", "x" * 256, "/".join(["abcdefgh"] * 120), "a/b\n", ".hidden"],
)
def test_safe_relpath_refuses(path: str) -> None:
    with pytest.raises(UnsafePath):
        safe_relpath(path)


def test_safe_relpath_component_limit_is_255_bytes() -> None:
    assert safe_relpath("x" * 255) == "x" * 255


@pytest.mark.parametrize(
    ("url_path", "filename", "expected"),
    [
        ("/packages/ab/cd/ef0123/demo-1.0.tar.gz", "demo-1.0.tar.gz", "packages/ab/cd/ef0123/demo-1.0.tar.gz"),
        ("/packages/demo-1.0.tar.gz", "demo-1.0.tar.gz", "packages/demo-1.0.tar.gz"),
        ("/mirror/packages/ab/demo-1.0.tar.gz", "demo-1.0.tar.gz", "packages/ab/demo-1.0.tar.gz"),
        # Percent-decoding of a harmless character.
        ("/packages/ab/demo%2Bx-1.0.tar.gz", "demo+x-1.0.tar.gz", "packages/ab/demo+x-1.0.tar.gz"),
        # Not a PyPI layout: content addressed by sha256.
        ("/files/demo-1.0.tar.gz", "demo-1.0.tar.gz", f"packages/{SHA[:2]}/{SHA[2:4]}/{SHA[4:]}/demo-1.0.tar.gz"),
        ("/demo-1.0.tar.gz", "demo-1.0.tar.gz", f"packages/{SHA[:2]}/{SHA[2:4]}/{SHA[4:]}/demo-1.0.tar.gz"),
    ],
)
def test_file_relpath(url_path: str, filename: str, expected: str) -> None:
    assert file_relpath(url_path, filename, SHA) == expected


@pytest.mark.parametrize(
    ("url_path", "filename"),
    [
        ("/packages/ab/../../etc/demo.tar.gz", "demo.tar.gz"),
        ("/packages/ab/%2e%2e/%2E%2E/demo.tar.gz", "demo.tar.gz"),
        ("/packages/..%2F..%2Fetc/demo.tar.gz", "demo.tar.gz"),
        ("/packages/ab%2Fcd/demo.tar.gz", "demo.tar.gz"),
        ("/packages/ab\\cd/demo.tar.gz", "demo.tar.gz"),
        ("/packages/ab%5Ccd/demo.tar.gz", "demo.tar.gz"),
        ("/packages/ab%00/demo.tar.gz", "demo.tar.gz"),
        ("/packages/ab%0A/demo.tar.gz", "demo.tar.gz"),
        ("/packages/ab//demo.tar.gz", "demo.tar.gz"),
        ("/packages/" + "x" * 256 + "/demo.tar.gz", "demo.tar.gz"),
        ("/packages/ab/other.tar.gz", "demo.tar.gz"),
        ("/packages/", "demo.tar.gz"),
        ("/files/other.tar.gz", "demo.tar.gz"),
        ("/packages/ab/..", ".."),
        ("/packages/ab/x", "../x"),
        ("/packages/ab/x%00", "x\x00"),
        ("/packages/ab/", ""),
        ("/packages/ab/" + "y" * 256, "y" * 256),
    ],
)
def test_file_relpath_refuses(url_path: str, filename: str) -> None:
    with pytest.raises(UnsafePath):
        file_relpath(url_path, filename, SHA)


# -- file_url ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("href", "allow_http", "expected"),
    [
        ("../../packages/ab/demo.whl#sha256=" + SHA, False, "https://up.test/packages/ab/demo.whl"),
        ("demo.whl", False, "https://up.test/simple/demo/demo.whl"),
        ("/packages/x/demo.whl", False, "https://up.test/packages/x/demo.whl"),
        ("//files.test/packages/x/demo.whl", False, "https://files.test/packages/x/demo.whl"),
        ("https://files.test/p/demo.whl?x=1#frag", False, "https://files.test/p/demo.whl?x=1"),
        ("http://files.test/p/demo.whl", True, "http://files.test/p/demo.whl"),
    ],
)
def test_file_url_accepts(href: str, allow_http: bool, expected: str) -> None:
    assert file_url(PAGE, href, allow_http=allow_http) == expected


@pytest.mark.parametrize(
    "href",
    ["file:///etc/passwd", "ftp://files.test/demo.whl", "javascript:alert(1)", "data:text/plain,hi",
     "http://files.test/demo.whl", "", "https://files.test/a\x00b", "https://files.test\\evil/x",
     "mailto:a@b.c"],
)
def test_file_url_refuses(href: str) -> None:
    with pytest.raises(UnsafeURL):
        file_url(PAGE, href, allow_http=False)


@pytest.mark.parametrize("href", ["file:///etc/passwd", "ftp://files.test/x", "javascript:alert(1)"])
def test_file_url_allow_http_still_refuses_other_schemes(href: str) -> None:
    with pytest.raises(UnsafeURL):
        file_url(PAGE, href, allow_http=True)


def test_relative_href_on_http_page_refused_without_allow_http() -> None:
    with pytest.raises(UnsafeURL):
        file_url("http://up.test/simple/demo/", "demo.whl", allow_http=False)
    assert file_url("http://up.test/simple/demo/", "demo.whl", allow_http=True) == "http://up.test/simple/demo/demo.whl"


# -- parse_project_json --------------------------------------------------------------


def jfile(filename: str = "demo-1.0-py3-none-any.whl", **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "filename": filename,
        "url": f"https://files.test/packages/ab/cd/ef/{filename}",
        "hashes": {"sha256": SHA},
    }
    d.update(over)
    return d


def jpage(*files: Any, name: str = "Demo", api: Any = "1.1", **extra: Any) -> bytes:
    d: dict[str, Any] = {"meta": {"api-version": api}, "name": name, "files": list(files)}
    d.update(extra)
    return json.dumps(d).encode()


def pj(body: bytes, *, header: int | None = None, allow_http: bool = False) -> Any:
    return parse_project_json(body, name=DEMO, page_url=PAGE, header_serial=header, allow_http=allow_http)


def test_parse_project_json_all_fields() -> None:
    body = jpage(
        jfile(
            hashes={"sha256": SHA.upper(), "md5": "x"},
            size=1234,
            **{
                "requires-python": ">=3.8",
                "yanked": "broken build",
                "upload-time": "2024-01-02T03:04:05.000000Z",
                "core-metadata": {"sha256": MD_SHA},
                "provenance": "https://files.test/prov/demo",
            },
        ),
        versions=["1.0", 2, "0.9"],
        **{"project-status": {"status": "archived", "reason": "no longer maintained"}},
    )
    snap = pj(body, header=77)
    assert snap.name == "demo"
    assert snap.display_name == "Demo"
    assert snap.serial == 77
    assert snap.api_version == "1.1"
    assert snap.versions == ("1.0", "0.9")
    assert snap.status == "archived"
    assert snap.status_reason == "no longer maintained"
    assert snap.rejected == ()
    (f,) = snap.files
    assert f.filename == "demo-1.0-py3-none-any.whl"
    assert f.url == "https://files.test/packages/ab/cd/ef/demo-1.0-py3-none-any.whl"
    assert f.path == "packages/ab/cd/ef/demo-1.0-py3-none-any.whl"
    assert f.sha256 == SHA
    assert f.size == 1234
    assert f.requires_python == ">=3.8"
    assert f.yanked == "broken build"
    assert f.upload_time == "2024-01-02T03:04:05.000000Z"
    assert f.core_metadata is True
    assert f.core_metadata_sha256 == MD_SHA
    assert f.provenance == "https://files.test/prov/demo"


def test_parse_project_json_minimal_defaults() -> None:
    snap = pj(jpage(jfile()))
    (f,) = snap.files
    assert (f.size, f.requires_python, f.yanked, f.upload_time) == (None, None, False, None)
    assert (f.core_metadata, f.core_metadata_sha256, f.provenance) == (False, None, None)
    assert snap.versions == ()
    assert snap.status is None


@pytest.mark.parametrize(
    ("yanked", "expected"),
    [(True, True), (False, False), ("reason", "reason"), ("", True), (None, False), (1, False), ([], False)],
)
def test_parse_project_json_yanked_variants(yanked: Any, expected: bool | str) -> None:
    (f,) = pj(jpage(jfile(yanked=yanked))).files
    assert f.yanked == expected


@pytest.mark.parametrize(
    ("entry", "present", "sha"),
    [
        ({}, False, None),
        ({"core-metadata": True}, True, None),
        ({"core-metadata": False}, False, None),
        ({"core-metadata": {"sha256": MD_SHA}}, True, MD_SHA),
        ({"core-metadata": {"sha256": MD_SHA.upper()}}, True, MD_SHA),
        ({"core-metadata": {"sha256": "nothex"}}, True, None),
        ({"core-metadata": {}}, True, None),
        ({"data-dist-info-metadata": True}, True, None),
        ({"data-dist-info-metadata": {"sha256": MD_SHA}}, True, MD_SHA),
        # The PEP 714 key wins over the legacy alias.
        ({"core-metadata": False, "data-dist-info-metadata": {"sha256": MD_SHA}}, False, None),
        ({"core-metadata": {"sha256": MD_SHA}, "data-dist-info-metadata": False}, True, MD_SHA),
        ({"core-metadata": "true"}, False, None),
    ],
)
def test_parse_project_json_core_metadata(entry: dict[str, Any], present: bool, sha: str | None) -> None:
    (f,) = pj(jpage(jfile(**entry))).files
    assert (f.core_metadata, f.core_metadata_sha256) == (present, sha)


@pytest.mark.parametrize(
    ("prov", "expected"),
    [
        ("https://files.test/prov/x", "https://files.test/prov/x"),
        ("../../prov/x", "https://up.test/prov/x"),
        ("", None),
        (None, None),
        (5, None),
    ],
)
def test_parse_project_json_provenance(prov: Any, expected: str | None) -> None:
    (f,) = pj(jpage(jfile(provenance=prov))).files
    assert f.provenance == expected


def test_parse_project_json_duplicate_file_rejected() -> None:
    snap = pj(jpage(jfile(), jfile(hashes={"sha256": SHA2})))
    assert len(snap.files) == 1
    assert snap.files[0].sha256 == SHA
    assert len(snap.rejected) == 1
    kind, why = snap.rejected[0]
    assert kind == "path" and "listed twice" in why


HOSTILE = [
    "not an object",
    ["a", "list"],
    jfile("../evil.whl", url="https://files.test/packages/ab/../evil.whl"),
    jfile("evil.whl", url="https://files.test/packages/%2e%2e/%2e%2e/evil.whl"),
    jfile("evil2.whl", url="file:///etc/passwd"),
    jfile("evil3.whl", url="javascript:alert(1)"),
    jfile("evil4.whl", url="http://files.test/packages/ab/evil4.whl"),
    jfile("nosha.whl", hashes={}),
    jfile("badsha.whl", hashes={"sha256": "zz"}),
    jfile("nohashes.whl", hashes="nope"),
    jfile("neg.whl", size=-1),
    jfile("boolsize.whl", size=True),
    jfile("strsize.whl", size="10"),
    jfile("mismatch.whl", url="https://files.test/packages/ab/other.whl"),
    jfile("badprov.whl", provenance="file:///etc/shadow"),
    {"filename": 5, "url": "https://files.test/packages/x/5", "hashes": {"sha256": SHA}},
    {"filename": "nourl.whl", "hashes": {"sha256": SHA}},
]


def test_parse_project_json_hostile_entries_dropped_rest_kept() -> None:
    good1 = jfile("demo-1.0.tar.gz")
    good2 = jfile("demo-2.0.tar.gz", hashes={"sha256": SHA2})
    snap = pj(jpage(good1, *HOSTILE, good2))
    assert [f.filename for f in snap.files] == ["demo-1.0.tar.gz", "demo-2.0.tar.gz"]
    assert len(snap.rejected) == len(HOSTILE)
    for f in snap.files:
        assert f.path.startswith("packages/") and ".." not in f.path.split("/")


def test_parse_project_json_http_file_allowed_with_allow_http() -> None:
    snap = pj(jpage(jfile(url="http://files.test/packages/ab/demo-1.0-py3-none-any.whl")), allow_http=True)
    assert snap.files[0].url.startswith("http://")
    assert snap.rejected == ()


@pytest.mark.parametrize("name", ["Other", "demo2", "../demo", 5, ""])
def test_parse_project_json_name_mismatch(name: Any) -> None:
    with pytest.raises(MalformedResponse):
        pj(jpage(jfile(), name=name))


@pytest.mark.parametrize("name", ["Demo", "DEMO", "demo"])
def test_parse_project_json_name_normalizes(name: str) -> None:
    assert pj(jpage(name=name)).display_name == name


def test_parse_project_json_name_missing_uses_requested() -> None:
    body = json.dumps({"meta": {"api-version": "1.0"}, "files": []}).encode()
    snap = pj(body)
    assert (snap.name, snap.display_name) == ("demo", "demo")


@pytest.mark.parametrize("api", ["2.0", "3.1", "10.0"])
def test_parse_project_json_unsupported_major(api: str) -> None:
    with pytest.raises(UnsupportedAPIVersion):
        pj(jpage(jfile(), api=api))


@pytest.mark.parametrize("api", [1, "1", "v1.0", "1.0.0", "", []])
def test_parse_project_json_bad_api_version(api: Any) -> None:
    with pytest.raises(MalformedResponse):
        pj(jpage(api=api))


def test_parse_project_json_newer_minor_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mirror.upstream.parse"):
        snap = pj(jpage(jfile(), api="1.9"))
    assert snap.api_version == "1.9"
    assert len(snap.files) == 1
    assert any("1.9" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("api", ["1.0", "1.4", None])
def test_parse_project_json_known_minor_silent(api: str | None, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mirror.upstream.parse"):
        snap = pj(jpage(api=api))
    assert snap.api_version == (api or "1.0")
    assert caplog.records == []


@pytest.mark.parametrize(
    "body",
    [b"", b"not json", b"{", b"\xff\xfe", b"[1, 2]", b'"str"', b"null",
     b'{"name": "demo", "files": {}}', b'{"name": "demo"}', b"[" * 100_000],
)
def test_parse_project_json_garbage(body: bytes) -> None:
    with pytest.raises(MalformedResponse):
        pj(body)


@pytest.mark.parametrize(
    ("header", "meta", "expected"),
    [(5, 9, 5), (None, 9, 9), (None, None, None), (None, "9", None), (None, True, None), (0, 9, 0)],
)
def test_parse_project_json_serial(header: int | None, meta: Any, expected: int | None) -> None:
    d: dict[str, Any] = {"meta": {"api-version": "1.1"}, "name": "demo", "files": []}
    if meta is not None:
        d["meta"]["_last-serial"] = meta
    assert pj(json.dumps(d).encode(), header=header).serial == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [({}, None), ({"x-pypi-last-serial": "42"}, 42), ({"x-pypi-last-serial": "nope"}, None)],
)
def test_header_serial(headers: dict[str, str], expected: int | None) -> None:
    assert header_serial(headers) == expected


def test_check_api_version_defaults_to_1_0() -> None:
    assert check_api_version(None, where="x") == "1.0"


# -- parse_project_html -------------------------------------------------------------

HTML = f"""<!DOCTYPE html>
<html>
  <head>
    <meta name="pypi:repository-version" content="1.1">
    <meta name="pypi:project-status" content="quarantined">
    <meta name="pypi:project-status-reason" content="under review">
    <title>Links for demo</title>
  </head>
  <body>
    <h1>Links for demo</h1>
    <a href="../../packages/ab/cd/demo-1.0.tar.gz#sha256={SHA}" data-requires-python="&gt;=3.8">demo-1.0.tar.gz</a><br>
    <a href="https://files.test/packages/ab/cd/demo-1.0-py3-none-any.whl#sha256={SHA2}"
       data-core-metadata="sha256={MD_SHA}" data-yanked="bad build"
       data-provenance="https://files.test/prov/demo-1.0-py3-none-any.whl">demo-1.0-py3-none-any.whl</a><br>
    <a href="https://files.test/packages/ab/cd/demo-0.9.tar.gz#sha256={SHA}" data-dist-info-metadata="true"
       data-yanked>demo-0.9.tar.gz</a><br>
    <a href="https://files.test/packages/ab/cd/demo-0.8.tar.gz#sha256={SHA}" data-yanked="">demo-0.8.tar.gz</a><br>
    <a href="https://files.test/packages/ab/cd/demo-0.1.tar.gz">demo-0.1.tar.gz</a><br>
    <a href="https://files.test/packages/ab/cd/demo-0.2.tar.gz#md5=abc">demo-0.2.tar.gz</a><br>
    <a href="file:///etc/passwd#sha256={SHA}">passwd</a><br>
    <a href="https://files.test/packages/%2e%2e/demo-0.3.tar.gz#sha256={SHA}">demo-0.3.tar.gz</a><br>
  </body>
</html>
""".encode()


def test_parse_project_html_pep503() -> None:
    snap = parse_project_html(HTML, name=DEMO, page_url=PAGE, header_serial=12, allow_http=False)
    assert snap.serial == 12
    assert snap.api_version == "1.1"
    assert snap.status == "quarantined"
    assert snap.status_reason == "under review"
    by = {f.filename: f for f in snap.files}
    assert list(by) == ["demo-1.0.tar.gz", "demo-1.0-py3-none-any.whl", "demo-0.9.tar.gz", "demo-0.8.tar.gz"]

    sdist = by["demo-1.0.tar.gz"]
    assert sdist.url == "https://up.test/packages/ab/cd/demo-1.0.tar.gz"
    assert sdist.path == "packages/ab/cd/demo-1.0.tar.gz"
    assert sdist.sha256 == SHA
    assert sdist.requires_python == ">=3.8"
    assert (sdist.yanked, sdist.core_metadata, sdist.provenance) == (False, False, None)

    wheel = by["demo-1.0-py3-none-any.whl"]
    assert wheel.sha256 == SHA2
    assert (wheel.core_metadata, wheel.core_metadata_sha256) == (True, MD_SHA)
    assert wheel.yanked == "bad build"
    assert wheel.provenance == "https://files.test/prov/demo-1.0-py3-none-any.whl"

    old = by["demo-0.9.tar.gz"]
    assert (old.core_metadata, old.core_metadata_sha256, old.yanked) == (True, None, True)
    assert by["demo-0.8.tar.gz"].yanked is True

    # No sha256 (twice), a file:// URL, and a dot-dot path.
    assert len(snap.rejected) == 4


def test_parse_project_html_without_serial_or_meta() -> None:
    body = f'<a href="/packages/x/demo-1.0.tar.gz#sha256={SHA}">demo-1.0.tar.gz</a>'.encode()
    snap = parse_project_html(body, name=DEMO, page_url=PAGE, header_serial=None, allow_http=False)
    assert snap.serial is None
    assert snap.api_version == "1.0"
    assert [f.path for f in snap.files] == ["packages/x/demo-1.0.tar.gz"]


def test_parse_project_html_unsupported_version() -> None:
    body = b'<meta name="pypi:repository-version" content="2.0">'
    with pytest.raises(UnsupportedAPIVersion):
        parse_project_html(body, name=DEMO, page_url=PAGE, header_serial=None, allow_http=False)


# -- parse_root_json -----------------------------------------------------------------


def test_parse_root_json_dedupes_and_rejects() -> None:
    body = json.dumps({
        "meta": {"api-version": "1.1", "_last-serial": 100},
        "projects": [
            {"name": "Foo_Bar", "_last-serial": 5},
            {"name": "foo.bar", "_last-serial": 9},
            {"name": "FOO-BAR", "_last-serial": 7},
            {"name": "../x", "_last-serial": 1},
            {"name": 5},
            "string",
            {"name": "ok"},
            {"name": "neg", "_last-serial": -3},
            {"name": "flag", "_last-serial": True},
        ],
    }).encode()
    entries, serial, rejected = parse_root_json(body)
    assert serial == 100
    by = {e.name: e for e in entries}
    assert set(by) == {"foo-bar", "ok", "neg", "flag"}
    assert by[NormalizedName("foo-bar")].serial == 9
    assert by[NormalizedName("foo-bar")].display_name == "foo.bar"
    assert by[NormalizedName("ok")].serial == 0
    assert by[NormalizedName("neg")].serial == 0
    assert by[NormalizedName("flag")].serial == 0
    # ../x, 5, "string", and the two spellings that lost to foo.bar
    assert len(rejected) == 5
    assert any("../x" in r for r in rejected)
    assert sum("collides with 'foo.bar' after normalization" in r for r in rejected) == 2


def test_parse_root_json_without_serial() -> None:
    entries, serial, rejected = parse_root_json(b'{"meta": {"api-version": "1.0"}, "projects": []}')
    assert (entries, serial, rejected) == ([], None, [])


@pytest.mark.parametrize(
    ("body", "exc"),
    [
        (b"nope", MalformedResponse),
        (b"[]", MalformedResponse),
        (b'{"meta": {"api-version": "1.0"}}', MalformedResponse),
        (b'{"meta": {"api-version": "1.0"}, "projects": {}}', MalformedResponse),
        (b'{"meta": {"api-version": "2.0"}, "projects": []}', UnsupportedAPIVersion),
    ],
)
def test_parse_root_json_refused(body: bytes, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        parse_root_json(body)


# -- parse_changelog -----------------------------------------------------------------


def test_parse_changelog_good_rows() -> None:
    rows = [
        ["Demo", "1.0", 1700000000, "new release", 10],
        ("other", None, 1700000001, "create", 11),
        ["x", "2.0", "not-an-int", "remove release", 12],
    ]
    events = parse_changelog(rows)
    assert [(e.name, e.version, e.timestamp, e.action, e.serial) for e in events] == [
        ("Demo", "1.0", 1700000000, "new release", 10),
        ("other", None, 1700000001, "create", 11),
        ("x", "2.0", 0, "remove release", 12),
    ]


def test_parse_changelog_empty() -> None:
    assert parse_changelog([]) == []


@pytest.mark.parametrize(
    "row",
    [
        "a string",
        ["Demo", "1.0", 1, "create"],
        ["Demo", "1.0", 1, "create", 5, "extra"],
        [None, "1.0", 1, "create", 5],
        ["Demo", "1.0", 1, None, 5],
        ["Demo", "1.0", 1, "create", "5"],
        ["Demo", "1.0", 1, "create", True],
        ["Demo", "1.0", 1, "create", 5.0],
        {"name": "Demo"},
    ],
)
def test_parse_changelog_malformed_row(row: Any) -> None:
    with pytest.raises(MalformedResponse):
        parse_changelog([["ok", "1", 1, "create", 1], row])


@pytest.mark.parametrize("rows", [None, {}, "rows", 5])
def test_parse_changelog_not_a_list(rows: Any) -> None:
    with pytest.raises(MalformedResponse):
        parse_changelog(rows)
