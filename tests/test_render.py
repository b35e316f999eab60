"""Tests for mirror.render: field-by-field checks of every published page."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urldefrag, urljoin

import pytest

from mirror.model import NormalizedName, ProjectSnapshot, ReleaseFile, RootEntry, Serial
from mirror.publish.render import (
    API_VERSION,
    project_api_json,
    project_html,
    project_json,
    root_html,
    root_json,
)

SHA = "a" * 64
META_SHA = "b" * 64
WHEEL = "foo-1.0-py3-none-any.whl"
WHEEL_PATH = f"packages/ab/cd/ef/{WHEEL}"


class Page(HTMLParser):
    """Collects what a client would read off a simple HTML page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.meta: dict[str, str] = {}
        self.anchors: list[tuple[dict[str, str | None], str]] = []
        self.title = ""
        self.h1 = ""
        self._in: str | None = None
        self._attrs: dict[str, str | None] = {}
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        d = dict(attrs)
        if tag == "meta":
            name, content = d.get("name"), d.get("content")
            assert name is not None and content is not None
            assert name not in self.meta, f"duplicate meta {name}"
            self.meta[name] = content
        elif tag in ("a", "title", "h1"):
            assert self._in is None, f"<{tag}> nested in <{self._in}>"
            self._in, self._attrs, self._text = tag, d, []

    def handle_data(self, data: str) -> None:
        if self._in is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag != self._in:
            return
        text = "".join(self._text)
        if tag == "a":
            self.anchors.append((self._attrs, text))
        elif tag == "title":
            self.title = text
        else:
            self.h1 = text
        self._in = None


def parse_html(body: bytes) -> Page:
    assert body.startswith(b"<!DOCTYPE html>")
    page = Page()
    page.feed(body.decode("utf-8"))
    page.close()
    return page


def rf(**kw: Any) -> ReleaseFile:
    base: dict[str, Any] = {
        "filename": WHEEL,
        "url": f"https://files.example/{WHEEL_PATH}",
        "path": WHEEL_PATH,
        "sha256": SHA,
    }
    base.update(kw)
    return ReleaseFile(**base)


def snap(*files: ReleaseFile, **kw: Any) -> ProjectSnapshot:
    base: dict[str, Any] = {
        "name": NormalizedName("foo"),
        "display_name": "Foo",
        "serial": Serial(42),
        "files": files,
        "versions": ("1.0",),
    }
    base.update(kw)
    return ProjectSnapshot(**base)


def only_file_json(s: ProjectSnapshot) -> dict[str, Any]:
    doc = json.loads(project_json(s))
    assert len(doc["files"]) == 1
    f: dict[str, Any] = doc["files"][0]
    return f


def only_anchor(s: ProjectSnapshot) -> tuple[dict[str, str | None], str]:
    page = parse_html(project_html(s))
    assert len(page.anchors) == 1
    return page.anchors[0]


HREF = f"../../{WHEEL_PATH}#sha256={SHA}"

# ---------------------------------------------------------------------------
# per-file fields: (ReleaseFile kwargs, expected JSON fields, expected data- attrs)
# ---------------------------------------------------------------------------

FILE_CASES: list[tuple[str, dict[str, Any], dict[str, Any], dict[str, str]]] = [
    ("plain", {}, {}, {}),
    ("yanked-false", {"yanked": False}, {"yanked": False}, {}),
    ("yanked-true", {"yanked": True}, {"yanked": True}, {"data-yanked": ""}),
    ("yanked-empty-reason", {"yanked": ""}, {"yanked": True}, {"data-yanked": ""}),
    (
        "yanked-reason",
        {"yanked": "broken build"},
        {"yanked": "broken build"},
        {"data-yanked": "broken build"},
    ),
    ("cm-false-with-hash", {"core_metadata_sha256": META_SHA}, {}, {}),
    (
        "cm-true-no-hash",
        {"core_metadata": True},
        {"core-metadata": True, "data-dist-info-metadata": True},
        {"data-core-metadata": "true", "data-dist-info-metadata": "true"},
    ),
    (
        "cm-true-hash",
        {"core_metadata": True, "core_metadata_sha256": META_SHA},
        {
            "core-metadata": {"sha256": META_SHA},
            "data-dist-info-metadata": {"sha256": META_SHA},
        },
        {
            "data-core-metadata": f"sha256={META_SHA}",
            "data-dist-info-metadata": f"sha256={META_SHA}",
        },
    ),
    (
        "provenance",
        {"provenance": "https://upstream.example/integrity/foo/1.0/x/provenance"},
        {"provenance": f"../../{WHEEL_PATH}.provenance"},
        {"data-provenance": f"../../{WHEEL_PATH}.provenance"},
    ),
    (
        "requires-python",
        {"requires_python": ">=3.8,<4"},
        {"requires-python": ">=3.8,<4"},
        {"data-requires-python": ">=3.8,<4"},
    ),
    ("requires-python-empty", {"requires_python": ""}, {"requires-python": None}, {}),
    (
        "size-and-time",
        {"size": 1234, "upload_time": "2024-01-02T03:04:05.678901Z"},
        {"size": 1234, "upload-time": "2024-01-02T03:04:05.678901Z"},
        {},
    ),
    ("size-zero", {"size": 0}, {"size": 0}, {}),
]

JSON_DEFAULTS: dict[str, Any] = {
    "filename": WHEEL,
    "url": f"../../{WHEEL_PATH}",
    "hashes": {"sha256": SHA},
    "requires-python": None,
    "yanked": False,
    "core-metadata": False,
    "data-dist-info-metadata": False,
    "provenance": None,
}


@pytest.mark.parametrize(
    ("kw", "expected"),
    [(c[1], c[2]) for c in FILE_CASES],
    ids=[c[0] for c in FILE_CASES],
)
def test_file_json_fields(kw: dict[str, Any], expected: dict[str, Any]) -> None:
    got = only_file_json(snap(rf(**kw)))
    want = {**JSON_DEFAULTS, **expected}
    for key, value in want.items():
        assert key in got, key
        assert got[key] == value, key
        # true/false must not be confused with 1/0 or a dict with a bool
        assert type(got[key]) is type(value), key
    # size / upload-time are omitted (not null) when unknown
    assert set(got) == set(want)


@pytest.mark.parametrize(
    ("kw", "expected"),
    [(c[1], c[3]) for c in FILE_CASES],
    ids=[c[0] for c in FILE_CASES],
)
def test_file_html_attributes(kw: dict[str, Any], expected: dict[str, str]) -> None:
    attrs, text = only_anchor(snap(rf(**kw)))
    assert text == WHEEL
    assert attrs == {"href": HREF, **expected}


def test_requires_python_lt_is_escaped_on_the_wire() -> None:
    body = project_html(snap(rf(requires_python=">=3.8,<4")))
    assert b'data-requires-python="&gt;=3.8,&lt;4"' in body


# ---------------------------------------------------------------------------
# page-level fields
# ---------------------------------------------------------------------------

STATUS_CASES: list[tuple[str | None, str | None, dict[str, str] | None]] = [
    (None, None, None),
    (None, "ignored without a status", None),
    ("active", None, {"status": "active"}),
    ("archived", "", {"status": "archived"}),
    ("quarantined", "malware", {"status": "quarantined", "reason": "malware"}),
    ("deprecated", "use bar", {"status": "deprecated", "reason": "use bar"}),
]


@pytest.mark.parametrize(("status", "reason", "expected"), STATUS_CASES)
def test_status_json(status: str | None, reason: str | None, expected: Any) -> None:
    doc = json.loads(project_json(snap(status=status, status_reason=reason)))
    if expected is None:
        assert "project-status" not in doc
    else:
        assert doc["project-status"] == expected


@pytest.mark.parametrize(("status", "reason", "expected"), STATUS_CASES)
def test_status_html(status: str | None, reason: str | None, expected: Any) -> None:
    page = parse_html(project_html(snap(status=status, status_reason=reason)))
    want = {"pypi:repository-version": API_VERSION}
    if expected is not None:
        want["pypi:project-status"] = expected["status"]
        if "reason" in expected:
            want["pypi:project-status-reason"] = expected["reason"]
    assert page.meta == want


def test_project_json_page_fields() -> None:
    s = snap(
        rf(),
        rf(filename="foo-2.0.tar.gz", path="packages/x/foo-2.0.tar.gz"),
        versions=("1.0", "2.0", "3.0rc1"),
    )
    doc = json.loads(project_json(s))
    assert list(doc) == ["meta", "name", "versions", "files"]
    assert doc["meta"] == {"api-version": "1.4", "_last-serial": 42}
    assert doc["name"] == "foo"
    assert doc["versions"] == ["1.0", "2.0", "3.0rc1"]
    assert [f["filename"] for f in doc["files"]] == [WHEEL, "foo-2.0.tar.gz"]


def test_project_json_without_serial_omits_key() -> None:
    doc = json.loads(project_json(snap(serial=None, versions=())))
    assert doc["meta"] == {"api-version": "1.4"}
    assert doc["versions"] == []
    assert doc["files"] == []


def test_project_json_is_compact_utf8() -> None:
    body = project_json(snap(rf(yanked="é")))
    assert b": " not in body and b", " not in body
    assert json.loads(body.decode("utf-8"))["files"][0]["yanked"] == "é"


def test_project_html_page_fields() -> None:
    s = snap(rf(), rf(filename="foo-2.0.tar.gz", path="packages/x/foo-2.0.tar.gz"))
    body = project_html(s)
    page = parse_html(body)
    assert page.title == "Links for foo"
    assert page.h1 == "Links for foo"
    assert page.meta == {"pypi:repository-version": "1.4"}
    assert [a[1] for a in page.anchors] == [WHEEL, "foo-2.0.tar.gz"]
    assert page.anchors[1][0]["href"] == f"../../packages/x/foo-2.0.tar.gz#sha256={SHA}"
    assert b"<!--SERIAL 42-->" in body
    assert b"SERIAL" not in project_html(snap(serial=None))


# ---------------------------------------------------------------------------
# hostile input
# ---------------------------------------------------------------------------

EVIL = "\"><script>alert(1)</script>'&amp;<!--"


def test_hostile_strings_do_not_escape_html() -> None:
    s = snap(
        rf(
            filename=EVIL,
            path="packages/" + EVIL,
            sha256=EVIL,
            requires_python=EVIL,
            yanked=EVIL,
            core_metadata=True,
            core_metadata_sha256=EVIL,
            provenance=EVIL,
        ),
        name=NormalizedName(EVIL),
        display_name=EVIL,
        status=EVIL,
        status_reason=EVIL,
    )
    body = project_html(s)
    assert b"<script" not in body
    assert body.count(b"<a ") == 1 and body.count(b"<meta ") == 3
    page = parse_html(body)
    assert page.title == f"Links for {EVIL}"
    assert page.h1 == f"Links for {EVIL}"
    assert page.meta == {
        "pypi:repository-version": "1.4",
        "pypi:project-status": EVIL,
        "pypi:project-status-reason": EVIL,
    }
    ((attrs, text),) = page.anchors
    assert text == EVIL
    assert attrs == {
        "href": f"../../packages/{EVIL}#sha256={EVIL}",
        "data-requires-python": EVIL,
        "data-yanked": EVIL,
        "data-core-metadata": f"sha256={EVIL}",
        "data-dist-info-metadata": f"sha256={EVIL}",
        "data-provenance": f"../../packages/{EVIL}.provenance",
    }
    # and the JSON page round-trips the same values exactly
    doc = json.loads(project_json(s))
    assert doc["name"] == EVIL
    assert doc["project-status"] == {"status": EVIL, "reason": EVIL}
    f = doc["files"][0]
    assert (f["filename"], f["yanked"], f["requires-python"]) == (EVIL, EVIL, EVIL)


def test_lone_surrogate_does_not_crash() -> None:
    bad = "x\ud800y"
    s = snap(rf(yanked=bad), display_name=bad, status="archived", status_reason=bad)
    assert json.loads(project_json(s))["files"][0]["yanked"] == bad
    parse_html(project_html(s))  # encodes with a replacement, never raises
    entries = [RootEntry(NormalizedName("x"), bad, Serial(1))]
    assert json.loads(root_json(entries, serial=1))["projects"][0]["name"] == bad
    parse_html(root_html(entries))


# ---------------------------------------------------------------------------
# links, determinism
# ---------------------------------------------------------------------------


def test_links_resolve_to_packages() -> None:
    s = snap(rf(provenance="p"))
    base = "http://h/simple/foo/"
    want = f"http://h/{WHEEL_PATH}"
    attrs, _ = only_anchor(s)
    href = attrs["href"]
    assert href is not None
    url, frag = urldefrag(urljoin(base, href))
    assert (url, frag) == (want, f"sha256={SHA}")
    assert urljoin(base, attrs["data-provenance"] or "") == want + ".provenance"
    f = only_file_json(s)
    assert urljoin(base, f["url"]) == want
    assert urljoin(base, f["provenance"]) == want + ".provenance"
    # the same base without trailing slash would be wrong; the page lives at
    # .../foo/index.html, which resolves identically
    assert urljoin("http://h/simple/foo/index.html", f["url"]) == want
    api = json.loads(project_api_json(s, None))
    assert urljoin("http://h/pypi/foo/json", api["releases"]["1.0"][0]["url"]) == want


def test_deterministic() -> None:
    def build() -> ProjectSnapshot:
        return snap(
            rf(yanked="r", core_metadata=True, core_metadata_sha256=META_SHA, size=3),
            rf(
                filename="foo-1.0.tar.gz",
                path="packages/y/foo-1.0.tar.gz",
                provenance="p",
            ),
            status="deprecated",
            status_reason="old",
        )

    a, b = build(), build()
    assert a is not b
    assert project_html(a) == project_html(b)
    assert project_json(a) == project_json(b)
    assert project_api_json(a, None) == project_api_json(b, None)
    up = upstream_doc()
    assert project_api_json(a, up) == project_api_json(b, upstream_doc())
    entries = [RootEntry(NormalizedName("a"), "A", Serial(1))]
    assert root_html(entries) == root_html(list(entries))
    assert root_json(entries, serial=5) == root_json(iter(entries), serial=5)


# ---------------------------------------------------------------------------
# root pages
# ---------------------------------------------------------------------------

ROOT = [
    RootEntry(NormalizedName("zope-interface"), "zope.interface", Serial(7)),
    RootEntry(NormalizedName("a"), "A", Serial(3)),
    RootEntry(NormalizedName("evil"), EVIL, Serial(9)),
]


def test_root_html() -> None:
    body = root_html(iter(ROOT))
    assert b"<script" not in body
    page = parse_html(body)
    assert page.meta == {"pypi:repository-version": "1.4"}
    assert page.anchors == [
        ({"href": "zope-interface/"}, "zope.interface"),
        ({"href": "a/"}, "A"),
        ({"href": "evil/"}, EVIL),
    ]
    assert (
        urljoin("http://h/simple/", "zope-interface/")
        == "http://h/simple/zope-interface/"
    )


def test_root_json() -> None:
    doc = json.loads(root_json(iter(ROOT), serial=99))
    assert doc["meta"] == {"api-version": "1.4", "_last-serial": 99}
    assert doc["projects"] == [
        {"name": "zope.interface", "_last-serial": 7},
        {"name": "A", "_last-serial": 3},
        {"name": EVIL, "_last-serial": 9},
    ]
    assert list(doc) == ["meta", "projects"]


def test_root_empty() -> None:
    assert json.loads(root_json([], serial=0)) == {
        "meta": {"api-version": "1.4", "_last-serial": 0},
        "projects": [],
    }
    assert parse_html(root_html([])).anchors == []


def test_root_json_rejects_non_int_serial() -> None:
    bad = [RootEntry(NormalizedName("a"), "A", "1; x")]  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        root_json(bad, serial=1)


def test_root_600k_timing() -> None:
    entries = [
        RootEntry(NormalizedName(f"project-{i}"), f"Project_{i}", Serial(i))
        for i in range(600_000)
    ]
    t0 = time.perf_counter()
    h = root_html(entries)
    t1 = time.perf_counter()
    j = root_json(entries, serial=600_000)
    t2 = time.perf_counter()
    print(f"\nroot 600k: html {t1 - t0:.3f}s json {t2 - t1:.3f}s total {t2 - t0:.3f}s")
    assert t2 - t0 < 2.0
    assert h.count(b"<a ") == 600_000
    assert len(json.loads(j)["projects"]) == 600_000


# ---------------------------------------------------------------------------
# legacy JSON API
# ---------------------------------------------------------------------------

SDIST = "foo-1.0.tar.gz"
SDIST_PATH = f"packages/11/22/33/{SDIST}"


def upstream_file(filename: str, sha: str, **kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "filename": filename,
        "url": f"https://files.pythonhosted.org/packages/zz/{filename}",
        "digests": {"md5": "m" * 32, "sha256": sha, "blake2b_256": "c" * 64},
        "md5_digest": "m" * 32,
        "size": 10,
        "yanked": False,
    }
    d.update(kw)
    return d


def upstream_doc() -> dict[str, Any]:
    return {
        "info": {"name": "Foo", "version": "2.0", "summary": "s"},
        "last_serial": 41,
        "releases": {
            "0.9": [upstream_file("foo-0.9.tar.gz", "9" * 64)],
            "1.0": [
                upstream_file(WHEEL, SHA),
                upstream_file(SDIST, "f" * 64),  # snap has a different sha
                "not a dict",
                {"filename": 5},
            ],
            "2.0": [],
        },
        "urls": [upstream_file(WHEEL, SHA), upstream_file("gone.whl", "0" * 64)],
        "vulnerabilities": [{"id": "X"}],
    }


def api_snap() -> ProjectSnapshot:
    return snap(rf(), rf(filename=SDIST, path=SDIST_PATH, sha256="e" * 64, size=77))


def test_api_with_upstream() -> None:
    doc = json.loads(project_api_json(api_snap(), upstream_doc()))
    assert list(doc) == ["info", "last_serial", "releases", "urls", "vulnerabilities"]
    assert doc["info"] == {"name": "Foo", "version": "2.0", "summary": "s"}
    assert doc["last_serial"] == 41
    assert doc["vulnerabilities"] == [{"id": "X"}]
    assert doc["releases"]["0.9"] == []  # file not in snap: dropped
    assert doc["releases"]["2.0"] == []
    whl, sd = doc["releases"]["1.0"]  # malformed entries dropped
    assert whl["filename"] == WHEEL
    assert whl["url"] == f"../../{WHEEL_PATH}"
    assert whl["digests"] == {"md5": "m" * 32, "sha256": SHA, "blake2b_256": "c" * 64}
    assert whl["md5_digest"] == "m" * 32
    assert whl["size"] == 10
    # sha256 disagrees with what we serve: only our digest survives
    assert sd["url"] == f"../../{SDIST_PATH}"
    assert sd["digests"] == {"sha256": "e" * 64}
    assert "md5_digest" not in sd
    assert sd["size"] == 77
    assert [u["filename"] for u in doc["urls"]] == [WHEEL]
    assert doc["urls"][0]["url"] == f"../../{WHEEL_PATH}"
    assert "files.pythonhosted.org" not in json.dumps(doc["releases"]) + json.dumps(
        doc["urls"]
    )


@pytest.mark.parametrize(
    "upstream",
    [
        {},
        {"info": "x", "releases": [], "urls": {}},
        {"releases": {"1.0": "nope"}, "urls": [None, 1]},
    ],
)
def test_api_with_malformed_upstream(upstream: dict[str, Any]) -> None:
    doc = json.loads(project_api_json(api_snap(), upstream))
    assert doc["info"] == {"name": "Foo"}
    assert doc["last_serial"] == 42
    assert all(v == [] for v in doc["releases"].values())
    assert doc["urls"] == []
    assert "vulnerabilities" not in doc


def test_api_nan_is_refused() -> None:
    with pytest.raises(ValueError):
        project_api_json(api_snap(), {"info": {"x": float("nan")}})


def test_api_minimal() -> None:
    s = snap(
        rf(
            filename="foo-1.0.0-py3-none-any.whl",
            path="packages/a/foo-1.0.0-py3-none-any.whl",
            yanked="bad",
            requires_python=">=3",
            size=5,
            upload_time="2024-01-01T00:00:00Z",
        ),
        rf(filename="foo-2.0.tar.gz", path="packages/b/foo-2.0.tar.gz", yanked=""),
        rf(filename="foo-2.0.win32.exe", path="packages/c/foo-2.0.win32.exe"),
        rf(filename="foo-nightly.exe", path="packages/d/foo-nightly.exe"),
        versions=("1.0", "3.0"),
        serial=Serial(8),
    )
    doc = json.loads(project_api_json(s, None))
    assert doc["info"] == {"name": "Foo"}
    assert doc["last_serial"] == 8
    assert doc["urls"] == []
    assert list(doc["releases"]) == ["1.0", "3.0", "2.0", ""]
    assert doc["releases"]["3.0"] == []
    (w,) = doc["releases"]["1.0"]  # "1.0.0" wheel filed under the listed "1.0"
    assert w == {
        "filename": "foo-1.0.0-py3-none-any.whl",
        "url": "../../packages/a/foo-1.0.0-py3-none-any.whl",
        "digests": {"sha256": SHA},
        "packagetype": "bdist_wheel",
        "requires_python": ">=3",
        "size": 5,
        "upload_time_iso_8601": "2024-01-01T00:00:00Z",
        "yanked": True,
        "yanked_reason": "bad",
    }
    # The version comes from the filename as the filters read it, so a
    # bdist_wininst installer is filed with its release.
    sd, installer = doc["releases"]["2.0"]
    assert (sd["packagetype"], sd["yanked"], sd["yanked_reason"]) == (
        "sdist",
        True,
        None,
    )
    assert installer["filename"] == "foo-2.0.win32.exe"
    (exe,) = doc["releases"][""]  # no version in the name at all
    assert exe["filename"] == "foo-nightly.exe"
    assert exe["packagetype"] is None


def test_api_minimal_no_serial() -> None:
    doc = json.loads(project_api_json(replace(snap(), serial=None, versions=()), None))
    assert doc == {
        "info": {"name": "Foo"},
        "last_serial": None,
        "releases": {},
        "urls": [],
    }
