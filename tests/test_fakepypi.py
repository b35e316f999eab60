"""Proof that the fake upstream and the wheel builder behave like the real thing.

Every other test trusts ``FakePyPI`` to speak PyPI's protocol and the fault
kinds to do what they claim; these tests pin that down with plain, synchronous
clients (httpx, xmlrpc.client, pip) so a mirror bug is never a fake bug.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import os
import signal
import ssl
import subprocess
import sys
import tarfile
import threading
import time
import xmlrpc.client
import zipfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from xml.parsers.expat import ExpatError

import httpx
import pytest

from tests.harness.fakepypi import FakePyPI, populate
from tests.harness.tls import make_ca
from tests.harness.wheels import make_blob_file, make_sdist, make_wheel

JSON = "application/vnd.pypi.simple.v1+json"
ACCEPT_JSON = {"Accept": JSON}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def client(upstream: FakePyPI) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=upstream.url, timeout=10) as c:
        yield c


@pytest.fixture
def files(upstream: FakePyPI) -> Iterator[httpx.Client]:
    """A client for the file host (files and .metadata live there)."""
    with httpx.Client(base_url=upstream.files_url, timeout=10) as c:
        yield c


def rpc(up: FakePyPI) -> Any:
    # Any: the proxy's methods are dynamic and their results untyped.
    return xmlrpc.client.ServerProxy(up.url + "/pypi", allow_none=True)


class Page(HTMLParser):
    """Collects anchors (attrs + text) and <meta> tags of a simple page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.anchors: list[tuple[dict[str, str | None], str]] = []
        self.meta: dict[str, str | None] = {}
        self._cur: dict[str, str | None] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._cur = dict(attrs)
        elif tag == "meta":
            d = dict(attrs)
            self.meta[d.get("name") or ""] = d.get("content")

    def handle_data(self, data: str) -> None:
        if self._cur is not None:
            self.anchors.append((self._cur, data))
            self._cur = None


def record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


# ---------------------------------------------------------------- wheels.py


def test_wheel_layout_and_record() -> None:
    w = make_wheel("Foo.Bar", "1.0", deps=["attrs>=1", "idna"], requires_python=">=3.8")
    assert w.filename == "foo_bar-1.0-py3-none-any.whl"
    zf = zipfile.ZipFile(io.BytesIO(w.content))
    names = zf.namelist()
    assert "foo_bar/__init__.py" in names
    assert names[-1] == "foo_bar-1.0.dist-info/RECORD"
    assert zf.read("foo_bar-1.0.dist-info/METADATA") == w.metadata
    meta = w.metadata.decode() if w.metadata else ""
    assert "Metadata-Version: 2.1\n" in meta
    assert "Name: Foo.Bar\n" in meta and "Version: 1.0\n" in meta
    assert "Requires-Dist: attrs>=1\nRequires-Dist: idna\n" in meta
    assert "Requires-Python: >=3.8\n" in meta
    wheel_file = zf.read("foo_bar-1.0.dist-info/WHEEL").decode()
    assert "Wheel-Version: 1.0\n" in wheel_file
    assert "Root-Is-Purelib: true\n" in wheel_file
    assert "Tag: py3-none-any\n" in wheel_file
    assert b'__version__ = "1.0"' in zf.read("foo_bar/__init__.py")

    rows = list(csv.reader(io.StringIO(zf.read(names[-1]).decode())))
    assert {r[0] for r in rows} == set(names)
    for path, digest, size in rows:
        if path.endswith("RECORD"):
            assert (digest, size) == ("", "")
        else:
            data = zf.read(path)
            assert (digest, size) == (record_hash(data), str(len(data)))


def test_builders_are_deterministic() -> None:
    assert make_wheel("a", "1") == make_wheel("a", "1")
    assert make_sdist("a", "1") == make_sdist("a", "1")
    assert make_wheel("a", "1").content != make_wheel("a", "2").content
    assert make_blob_file("a", "1", 1000, seed=1) == make_blob_file("a", "1", 1000, 1)
    assert make_blob_file("a", "1", 1000, 1) != make_blob_file("a", "1", 1000, 2)


def test_sdist_contents() -> None:
    s = make_sdist("My_Pkg", "2.0")
    assert s.filename == "my_pkg-2.0.tar.gz" and s.metadata is None
    with tarfile.open(fileobj=io.BytesIO(s.content), mode="r:gz") as tar:
        names = tar.getnames()
        assert "my_pkg-2.0/PKG-INFO" in names
        assert "my_pkg-2.0/pyproject.toml" in names
        pkg_info = tar.extractfile("my_pkg-2.0/PKG-INFO")
        assert pkg_info is not None
        assert b"Name: My_Pkg\n" in pkg_info.read()
        assert {m.mtime for m in tar.getmembers()} == {315532800}


def test_blob_file_and_tags() -> None:
    b = make_blob_file("Big.One", "3.0", 12345, seed=7)
    assert b.filename == "big_one-3.0.tar.gz" and len(b.content) == 12345
    w = make_wheel("x", "1.0", tag="cp311-cp311-manylinux_2_17_x86_64")
    assert w.filename == "x-1.0-cp311-cp311-manylinux_2_17_x86_64.whl"
    assert w.python_version == "cp311"
    with zipfile.ZipFile(io.BytesIO(w.content)) as zf:
        assert b"Root-Is-Purelib: false" in zf.read("x-1.0.dist-info/WHEEL")


# ---------------------------------------------------------------- journal


def test_mutations_write_pypi_journal(upstream: FakePyPI) -> None:
    up = upstream
    files = up.add_release("Foo", "1.0")
    assert files == ["foo-1.0.tar.gz", "foo-1.0-py3-none-any.whl"]
    up.add_release("foo", "2.0", wheel=False)
    up.remove_file("foo", "foo-1.0.tar.gz")
    up.yank("foo", "1.0", "broken")
    up.unyank("FOO", "1.0")
    up.remove_release("foo", "2.0")
    up.touch("foo")
    before = up.serial
    up.set_status("foo", "archived", "done")
    assert up.serial == before  # PEP 792 status changes write no journal event
    up.remove_project("foo")
    actions = [(e[1], e[3]) for e in up.journal]
    assert actions == [
        (None, "create"),
        ("1.0", "new release"),
        ("1.0", "add source file foo-1.0.tar.gz"),
        ("1.0", "add py3 file foo-1.0-py3-none-any.whl"),
        ("2.0", "new release"),
        ("2.0", "add source file foo-2.0.tar.gz"),
        ("1.0", "remove file foo-1.0.tar.gz"),
        ("1.0", "yank release"),
        ("1.0", "unyank release"),
        ("2.0", "remove release"),
        (None, "add Owner alice"),
        (None, "remove project"),
    ]
    assert [e[4] for e in up.journal] == list(range(1, 13))
    assert all(e[0] == "Foo" for e in up.journal)
    assert up.serial == 12


def test_xmlrpc_calls_and_paging(upstream: FakePyPI) -> None:
    up = upstream
    up.add_release("alpha", "1.0")  # serials 1-4
    up.add_project("Beta")  # 5
    up.touch("alpha")  # 6
    up.changelog_page_size = 4
    with rpc(up) as proxy:
        assert proxy.changelog_last_serial() == 6
        first = proxy.changelog_since_serial(0)
        assert [e[4] for e in first] == [1, 2, 3, 4]
        assert first[0] == ["alpha", None, first[0][2], "create", 1]
        assert isinstance(first[0][2], int)
        second = proxy.changelog_since_serial(4)
        assert [(e[0], e[3], e[4]) for e in second] == [
            ("Beta", "create", 5),
            ("alpha", "add Owner alice", 6),
        ]
        assert proxy.changelog_since_serial(6) == []
        assert proxy.list_packages_with_serial() == {"alpha": 6, "Beta": 5}
        with pytest.raises(xmlrpc.client.Fault):
            proxy.no_such_method()
    up.xmlrpc_enabled = False
    with rpc(up) as proxy, pytest.raises(xmlrpc.client.ProtocolError) as exc:
        proxy.changelog_last_serial()
    assert exc.value.errcode == 404


# ---------------------------------------------------------------- simple pages


def test_project_json_page(upstream: FakePyPI, client: httpx.Client) -> None:
    up = upstream
    up.add_release("Foo.Bar", "1.10", requires_python=">=3.8", provenance=True)
    up.add_release("foo-bar", "1.9", yanked=True)
    up.add_release("foo-bar", "1.2")
    up.yank("foo-bar", "1.2", "security")
    r = client.get("/simple/foo-bar/", headers=ACCEPT_JSON)
    assert r.status_code == 200
    assert r.headers["content-type"] == JSON
    assert r.headers["x-pypi-last-serial"] == str(up.project_serial("foo-bar"))
    doc = r.json()
    assert doc["meta"] == {"api-version": "1.4", "_last-serial": up.serial}
    assert doc["name"] == "foo-bar"
    assert doc["versions"] == ["1.2", "1.9", "1.10"]
    assert doc["project-status"] == {"status": "active"}
    by_name = {f["filename"]: f for f in doc["files"]}
    assert len(by_name) == 6
    whl = by_name["foo_bar-1.10-py3-none-any.whl"]
    content = up.file_content("foo-bar", whl["filename"])
    b2 = hashlib.blake2b(content, digest_size=32).hexdigest()
    assert (
        whl["url"] == f"{up.files_url}/packages/{b2[:2]}/{b2[2:4]}/{b2[4:]}/{whl['filename']}"
    )
    assert whl["hashes"] == {"sha256": hashlib.sha256(content).hexdigest()}
    assert whl["size"] == len(content)
    assert whl["requires-python"] == ">=3.8"
    assert whl["yanked"] is False
    assert len(whl["upload-time"]) == 27 and whl["upload-time"].endswith("Z")
    meta = up.file_metadata("foo-bar", whl["filename"])
    assert meta is not None
    meta_hash = {"sha256": hashlib.sha256(meta).hexdigest()}
    assert whl["core-metadata"] == whl["data-dist-info-metadata"] == meta_hash
    assert whl["provenance"].startswith(up.url + "/integrity/")
    sdist = by_name["foo_bar-1.10.tar.gz"]
    assert sdist["core-metadata"] is False and sdist["data-dist-info-metadata"] is False
    assert by_name["foo_bar-1.9.tar.gz"]["yanked"] is True
    assert by_name["foo_bar-1.2.tar.gz"]["yanked"] == "security"
    assert by_name["foo_bar-1.2.tar.gz"]["requires-python"] is None
    assert by_name["foo_bar-1.2.tar.gz"]["provenance"] is None

    # The advertised URLs serve exactly the advertised bytes.
    assert client.get(whl["url"]).content == content
    assert client.get(whl["url"] + ".metadata").content == meta
    assert client.get(sdist["url"] + ".metadata").status_code == 404
    prov = client.get(whl["provenance"])
    assert prov.headers["content-type"] == "application/json"
    assert prov.json() == {"version": 1, "attestation_bundles": []}
    dl = client.get(sdist["url"])
    assert dl.headers["content-type"] == "application/octet-stream"
    assert int(dl.headers["content-length"]) == sdist["size"]


def test_project_html_page(upstream: FakePyPI, client: httpx.Client) -> None:
    up = upstream
    up.add_release("pkg", "1.0", requires_python=">=3.8,<4", provenance=True)
    up.add_release("pkg", "0.9", wheel=False)
    up.yank("pkg", "0.9", 'bad "quote"')
    up.set_status("pkg", "deprecated", "use other")
    r = client.get("/simple/pkg/", headers={"Accept": "text/html"})
    assert r.headers["content-type"] == "text/html"
    assert r.headers["x-pypi-last-serial"] == str(up.project_serial("pkg"))
    page = Page(r.text)
    assert page.meta["pypi:repository-version"] == "1.4"
    assert page.meta["pypi:project-status"] == "deprecated"
    assert page.meta["pypi:project-status-reason"] == "use other"
    anchors = {text: attrs for attrs, text in page.anchors}
    assert set(anchors) == {
        "pkg-0.9.tar.gz",
        "pkg-1.0.tar.gz",
        "pkg-1.0-py3-none-any.whl",
    }
    whl = anchors["pkg-1.0-py3-none-any.whl"]
    sha = up.file_sha256("pkg", "pkg-1.0-py3-none-any.whl")
    href = whl["href"] or ""
    assert href == up.file_url("pkg", "pkg-1.0-py3-none-any.whl") + f"#sha256={sha}"
    assert whl["data-requires-python"] == ">=3.8,<4"  # unescaped by the parser
    assert ("&gt;=3.8,&lt;4") in r.text
    meta = up.file_metadata("pkg", "pkg-1.0-py3-none-any.whl") or b""
    expected = f"sha256={hashlib.sha256(meta).hexdigest()}"
    assert whl["data-core-metadata"] == whl["data-dist-info-metadata"] == expected
    assert (whl["data-provenance"] or "").endswith("/provenance")
    assert "data-yanked" not in whl
    assert anchors["pkg-0.9.tar.gz"]["data-yanked"] == 'bad "quote"'
    assert "data-core-metadata" not in anchors["pkg-1.0.tar.gz"]

    doc = client.get("/simple/pkg/", headers=ACCEPT_JSON).json()
    assert doc["project-status"] == {"status": "deprecated", "reason": "use other"}


def test_quarantined_project_offers_no_files(
    upstream: FakePyPI, client: httpx.Client
) -> None:
    upstream.add_release("q", "1.0")
    upstream.set_status("q", "quarantined")
    doc = client.get("/simple/q/", headers=ACCEPT_JSON).json()
    assert doc["project-status"] == {"status": "quarantined"}
    assert doc["files"] == [] and doc["versions"] == []


def test_root_index_both_formats(upstream: FakePyPI, client: httpx.Client) -> None:
    up = upstream
    up.add_release("Zeta_Pkg", "1.0")
    up.add_project("alpha")
    r = client.get("/simple/", headers=ACCEPT_JSON)
    assert r.headers["content-type"] == JSON
    assert r.json() == {
        "meta": {"api-version": "1.4", "_last-serial": up.serial},
        "projects": [
            {"name": "alpha", "_last-serial": 5},
            {"name": "Zeta_Pkg", "_last-serial": 4},
        ],
    }
    r = client.get("/simple/")
    assert r.headers["content-type"] == "text/html"
    page = Page(r.text)
    assert page.meta["pypi:repository-version"] == "1.4"
    assert [(a["href"], t) for a, t in page.anchors] == [
        ("/simple/alpha/", "alpha"),
        ("/simple/zeta-pkg/", "Zeta_Pkg"),
    ]
    assert client.get("/simple").status_code == 301


@pytest.mark.parametrize(
    ("accept", "is_json"),
    [
        (None, False),
        ("text/html", False),
        (JSON, True),
        (f"{JSON}, text/html;q=0.1", True),
        (f"{JSON};q=0.2, text/html", False),
        (f"{JSON}, text/html", True),  # equal preference: JSON wins
        (f"{JSON};q=0, text/html", False),
        (f"text/html;q=0.01, {JSON};q=0.02", True),
        ("application/vnd.pypi.simple.latest+json", True),
    ],
)
def test_content_negotiation(
    upstream: FakePyPI, client: httpx.Client, accept: str | None, is_json: bool
) -> None:
    upstream.add_project("p")
    headers = {"Accept": accept} if accept is not None else {}
    for path in ("/simple/", "/simple/p/"):
        r = client.get(path, headers=headers)
        assert (r.headers["content-type"] == JSON) is is_json, path


def test_html_only_ignores_accept(upstream: FakePyPI, client: httpx.Client) -> None:
    upstream.add_project("p")
    upstream.html_only = True
    for path in ("/simple/", "/simple/p/"):
        r = client.get(path, headers=ACCEPT_JSON)
        assert r.headers["content-type"] == "text/html"


def test_etag_and_304(upstream: FakePyPI, client: httpx.Client) -> None:
    up = upstream
    up.add_release("p", "1.0")
    for path in ("/simple/", "/simple/p/"):
        r = client.get(path, headers=ACCEPT_JSON)
        etag = r.headers["etag"]
        assert etag.startswith('"') and not etag.startswith("W/")
        again = client.get(path, headers={**ACCEPT_JSON, "If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        assert again.headers["etag"] == etag
        # Different representation, different tag.
        html_tag = client.get(path).headers["etag"]
        assert html_tag != etag
        assert client.get(path, headers={"If-None-Match": etag}).status_code == 200
    old = client.get("/simple/p/", headers=ACCEPT_JSON).headers["etag"]
    up.add_release("p", "2.0")
    r = client.get("/simple/p/", headers={**ACCEPT_JSON, "If-None-Match": old})
    assert r.status_code == 200 and r.headers["etag"] != old


def test_redirect_query_and_404(upstream: FakePyPI, client: httpx.Client) -> None:
    up = upstream
    up.add_release("Foo_Bar", "1.0")
    r = client.get("/simple/Foo_Bar/")
    assert r.status_code == 301
    assert r.headers["location"] == "/simple/foo-bar/"
    assert client.get("/simple/foo-bar").headers["location"] == "/simple/foo-bar/"
    followed = client.get(
        "/simple/FOO.bar/", headers=ACCEPT_JSON, follow_redirects=True
    )
    assert followed.status_code == 200 and followed.json()["name"] == "foo-bar"
    # Cache-busting query strings are ignored.
    busted = client.get("/simple/foo-bar/?cb=123", headers=ACCEPT_JSON)
    assert busted.json()["name"] == "foo-bar"
    assert client.get("/simple/nope/").status_code == 404
    assert client.get("/simple/No_Pe/").status_code == 404

    url = up.file_url("foo-bar", "foo_bar-1.0-py3-none-any.whl")
    up.remove_project("Foo_Bar")
    assert client.get("/simple/foo-bar/").status_code == 404
    assert client.get("/simple/foo-bar/", headers=ACCEPT_JSON).status_code == 404
    assert client.get("/pypi/foo-bar/json").status_code == 404
    assert client.get(url).status_code == 404
    assert client.get(url + ".metadata").status_code == 404
    assert client.get("/simple/", headers=ACCEPT_JSON).json()["projects"] == []


def test_removed_file_404_but_shared_blob_survives(
    upstream: FakePyPI, files: httpx.Client
) -> None:
    up = upstream
    blob = make_blob_file("blob", "1.0", 4096, seed=3)
    up.add_file("a", "1.0", blob)
    up.add_file("b", "1.0", blob)  # same bytes, same URL path
    path = up.file_path("a", blob.filename)
    assert path == up.file_path("b", blob.filename)
    up.remove_file("a", blob.filename)
    assert files.get(path).content == blob.content  # still referenced by b
    up.remove_release("b", "1.0")
    assert files.get(path).status_code == 404


def test_range_requests(upstream: FakePyPI, files: httpx.Client) -> None:
    blob = make_blob_file("r", "1.0", 1000, seed=1)
    upstream.add_file("r", "1.0", blob)
    path = upstream.file_path("r", blob.filename)
    r = files.get(path, headers={"Range": "bytes=600-"})
    assert r.status_code == 206 and r.content == blob.content[600:]
    assert r.headers["content-range"] == "bytes 600-999/1000"
    assert files.get(path, headers={"Range": "bytes=2000-"}).status_code == 416


def test_legacy_json(upstream: FakePyPI, client: httpx.Client) -> None:
    up = upstream
    up.add_release("Pkg", "1.0", deps=["dep"])
    up.add_release("pkg", "2.0")
    up.add_release("pkg", "3.0b1")
    up.yank("pkg", "2.0", "oops")
    r = client.get("/pypi/pkg/json")
    doc = r.json()
    assert r.headers["x-pypi-last-serial"] == str(up.project_serial("pkg"))
    assert doc["info"]["name"] == "Pkg"
    assert doc["info"]["version"] == "1.0"  # newest final non-yanked
    assert doc["last_serial"] == up.project_serial("pkg")
    assert list(doc["releases"]) == ["1.0", "2.0", "3.0b1"]
    f = doc["releases"]["2.0"][0]
    content = up.file_content("pkg", f["filename"])
    assert f["digests"] == {
        "md5": hashlib.md5(content).hexdigest(),
        "sha256": hashlib.sha256(content).hexdigest(),
        "blake2b_256": hashlib.blake2b(content, digest_size=32).hexdigest(),
    }
    assert f["yanked"] is True and f["yanked_reason"] == "oops"
    assert f["size"] == len(content) and f["upload_time_iso_8601"].endswith("Z")
    assert {x["packagetype"] for x in doc["releases"]["1.0"]} == {
        "sdist",
        "bdist_wheel",
    }
    assert {x["filename"] for x in doc["urls"]} == {
        "pkg-1.0.tar.gz",
        "pkg-1.0-py3-none-any.whl",
    }


# ---------------------------------------------------------------- faults


def test_fault_status_count_and_match(upstream: FakePyPI, client: httpx.Client) -> None:
    upstream.add_project("p")
    fault = upstream.add_fault("status", match="/simple/p/", count=2, status=502)
    assert client.get("/simple/").status_code == 200  # no match
    assert [client.get("/simple/p/").status_code for _ in range(3)] == [502, 502, 200]
    assert fault.fired == 2
    upstream.add_fault("status", headers={"Retry-After": "1"})
    r = client.get("/simple/")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    upstream.clear_faults()
    assert client.get("/simple/").status_code == 200


def test_fault_rate_is_seeded() -> None:
    def run() -> list[int]:
        with FakePyPI(seed=42) as up, httpx.Client(base_url=up.url) as c:
            up.add_fault("status", rate=0.5)
            return [c.get("/simple/").status_code for _ in range(20)]

    first = run()
    assert first == run()
    assert 200 in first and 503 in first


def test_fault_reset(upstream: FakePyPI, client: httpx.Client) -> None:
    upstream.add_fault("reset", match="/simple/", count=1)
    # SO_LINGER 0 turns close() into an RST: a read error, not a clean EOF.
    with pytest.raises(httpx.ReadError, match="reset"):
        client.get("/simple/")
    assert upstream.requests[-1] == ("GET", "/simple/", 0, 0)
    assert client.get("/simple/").status_code == 200


def test_fault_truncate(upstream: FakePyPI, files: httpx.Client) -> None:
    blob = make_blob_file("t", "1.0", 100_000, seed=5)
    upstream.add_file("t", "1.0", blob)
    path = upstream.file_path("t", blob.filename)
    upstream.add_fault("truncate", match="/packages/", count=1)
    with pytest.raises(httpx.RemoteProtocolError, match="received 50000 bytes"):
        files.get(path)
    assert upstream.requests[-1] == ("GET", path, 200, 50_000)
    assert files.get(path).content == blob.content


def test_fault_corrupt(upstream: FakePyPI, files: httpx.Client) -> None:
    upstream.add_release("c", "1.0", sdist=False)
    (fn,) = upstream.filenames("c")
    path = upstream.file_path("c", fn)
    upstream.add_fault("corrupt", match=fn, count=1)
    bad = files.get(path).content
    assert len(bad) == len(upstream.file_content("c", fn))
    assert hashlib.sha256(bad).hexdigest() != upstream.file_sha256("c", fn)
    assert files.get(path).content == upstream.file_content("c", fn)


def test_fault_stale(upstream: FakePyPI, client: httpx.Client) -> None:
    up = upstream
    up.add_release("s", "1.0")
    old_serial = up.project_serial("s")
    up.add_release("s", "2.0")
    fault = up.add_fault("stale", count=2)
    # Only project pages can be stale: the root neither fires nor uses it up.
    root = client.get("/simple/", headers=ACCEPT_JSON).json()
    assert root["meta"]["_last-serial"] == up.serial and fault.fired == 0
    r = client.get("/simple/s/", headers=ACCEPT_JSON)
    doc = r.json()
    assert (
        int(r.headers["x-pypi-last-serial"])
        == doc["meta"]["_last-serial"]
        == old_serial
    )
    assert old_serial < up.project_serial("s")
    assert doc["versions"] == ["1.0"]
    html = client.get("/simple/s/")
    assert int(html.headers["x-pypi-last-serial"]) == old_serial
    assert "s-2.0.tar.gz" not in html.text
    fresh = client.get("/simple/s/", headers=ACCEPT_JSON)
    assert int(fresh.headers["x-pypi-last-serial"]) == up.project_serial("s")
    # Only one state ever: still served under a lower serial.
    up.add_project("single")
    up.add_fault("stale", match="/simple/single/", count=1)
    r = client.get("/simple/single/", headers=ACCEPT_JSON)
    assert int(r.headers["x-pypi-last-serial"]) < up.project_serial("single")


def test_fault_slow(upstream: FakePyPI, client: httpx.Client) -> None:
    upstream.add_fault("slow", match="/simple/", count=1, delay=0.3)
    t0 = time.monotonic()
    assert client.get("/simple/").status_code == 200
    assert time.monotonic() - t0 >= 0.3
    with pytest.raises(httpx.ReadTimeout):
        upstream.add_fault("slow", count=1, delay=1.0)
        client.get("/simple/", timeout=0.2)


def test_fault_malformed(upstream: FakePyPI, client: httpx.Client) -> None:
    upstream.add_project("m")
    upstream.add_fault("malformed", count=3)
    r = client.get("/simple/m/", headers=ACCEPT_JSON)
    assert r.status_code == 200 and r.headers["content-type"] == JSON
    with pytest.raises(json.JSONDecodeError):
        r.json()
    assert client.get("/simple/m/").headers["content-type"] == "text/html"
    with rpc(upstream) as proxy, pytest.raises(ExpatError):
        proxy.changelog_last_serial()
    assert client.get("/simple/m/", headers=ACCEPT_JSON).json()["name"] == "m"


def test_raw_project_json_and_routes(upstream: FakePyPI, client: httpx.Client) -> None:
    up = upstream
    up.add_release("h", "1.0")
    hostile = {
        "meta": {"api-version": "1.0"},
        "name": "h",
        "files": [{"filename": "../x"}],
    }
    up.set_raw_project_json("H", hostile)
    r = client.get("/simple/h/", headers=ACCEPT_JSON)
    assert r.json() == hostile
    assert r.headers["x-pypi-last-serial"] == str(up.project_serial("h"))
    up.set_raw_project_json("h", b"\xff\xfe not json")
    assert client.get("/simple/h/", headers=ACCEPT_JSON).content == b"\xff\xfe not json"
    up.set_raw_project_json("h", None)
    assert client.get("/simple/h/", headers=ACCEPT_JSON).json()["name"] == "h"

    up.add_raw_route("/weird/path", 418, b"teapot", {"X-Test": "1"})
    r = client.get("/weird/path?q=1")
    assert (r.status_code, r.content, r.headers["x-test"]) == (418, b"teapot", "1")
    up.add_raw_route("/liar", 200, b"short", {"Content-Length": "100"})
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/liar")


# ---------------------------------------------------------------- log, threads


def test_request_log(upstream: FakePyPI, client: httpx.Client) -> None:
    up = upstream
    up.add_release("p", "1.0")
    up.reset_log()
    with rpc(up) as proxy:
        proxy.changelog_since_serial(up.serial)
    assert len(up.requests) == 1 and up.requests[0][:3] == ("POST", "/pypi", 200)
    r = client.get("/simple/p/?x=1", headers=ACCEPT_JSON)
    client.head("/simple/p/")
    assert up.requests[1] == ("GET", "/simple/p/?x=1", 200, len(r.content))
    assert up.requests[2] == ("HEAD", "/simple/p/", 200, 0)
    assert up.bytes_sent() == sum(rec[3] for rec in up.requests)
    assert len(up.requests_matching("/simple/")) == 2
    up.reset_log()
    assert up.requests == []


def test_mutations_while_serving(upstream: FakePyPI) -> None:
    up = upstream
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        with httpx.Client(base_url=up.url) as c:
            while not stop.is_set():
                try:
                    for name in up.project_names()[-3:]:
                        r = c.get(f"/simple/{name}/", headers=ACCEPT_JSON)
                        assert r.status_code in (200, 404)
                        if r.status_code == 200:
                            doc = r.json()
                            assert (
                                int(r.headers["x-pypi-last-serial"])
                                == doc["meta"]["_last-serial"]
                            )
                except BaseException as exc:  # noqa: BLE001 - reported below
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(40):
            up.add_release(f"p{i % 5}", f"1.{i}", sdist=False)
            if i % 7 == 6:
                up.remove_project(f"p{i % 5}")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert not errors
    assert [e[4] for e in up.journal] == list(range(1, up.serial + 1))


# ---------------------------------------------------------------- processes


def _clean_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PIP_") and k not in ("PYTHONPATH", "PYTHONHOME")
    }
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


@pytest.mark.slow
def test_pip_installs_wheel_from_fake(upstream: FakePyPI, tmp_path: Path) -> None:
    up = upstream
    up.add_release("Demo.Pkg", "0.1")
    up.add_release("demo-pkg", "0.2", requires_python=">=3.8", provenance=True)
    up.add_release("demo-pkg", "0.3", requires_python="<3")  # pip must skip it
    venv = tmp_path / "venv"
    env = _clean_env()
    subprocess.run(
        [sys.executable, "-m", "venv", str(venv)], check=True, env=env, timeout=120
    )
    pip = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--disable-pip-version-check",
        "--no-cache-dir",
        "--no-input",
        "--index-url",
        f"{up.url}/simple/",
        "demo.pkg",
    ]
    out = subprocess.run(
        pip, check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stdout + out.stderr
    check = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import demo_pkg; print(demo_pkg.__version__)",
        ],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.stdout.strip() == "0.2", check.stderr
    paths = [rec[1] for rec in up.requests]
    assert "/simple/demo-pkg/" in paths
    assert any(p.endswith("demo_pkg-0.2-py3-none-any.whl") for p in paths)
    # pip took the PEP 658 metadata (and checked it against core-metadata).
    assert any(p.endswith("demo_pkg-0.2-py3-none-any.whl.metadata") for p in paths)


def test_standalone_process(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.harness.fakepypi",
            "--port",
            "0",
            "--projects",
            "5",
            "--seed",
            "3",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("URL http://127.0.0.1:")
        url = line.split()[1]
        with httpx.Client(base_url=url) as c:
            doc: Any = c.get("/simple/", headers=ACCEPT_JSON).json()
        assert len(doc["projects"]) == 5
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_populate_is_reproducible() -> None:
    a, b = FakePyPI(), FakePyPI()
    populate(a, 20, seed=9)
    populate(b, 20, seed=9)
    assert a.project_names() == b.project_names()
    assert [(e[0], e[1], e[3], e[4]) for e in a.journal] == [
        (e[0], e[1], e[3], e[4]) for e in b.journal
    ]
    name = a.project_names()[-1]
    assert a.filenames(name) == b.filenames(name)


def test_files_come_from_a_second_host_provenance_from_the_first(tmp_path: Path) -> None:
    with FakePyPI(seed=1) as up:
        up.add_release("two-hosts", "1.0", provenance=True)
        assert up.files_url != up.url
        fn = next(f for f in up.filenames("two-hosts") if f.endswith(".whl"))
        path = up.file_path("two-hosts", fn)
        with httpx.Client(timeout=10) as c:
            page = c.get(f"{up.url}/simple/two-hosts/", headers=ACCEPT_JSON).json()
            entry = next(f for f in page["files"] if f["filename"] == fn)
            assert entry["url"] == up.files_url + path
            assert c.get(up.files_url + path).content == up.file_content("two-hosts", fn)
            assert c.get(up.files_url + path + ".metadata").status_code == 200
            # Not on the index host, and nothing but files on the file host.
            assert c.get(up.url + path).status_code == 404
            assert c.get(up.files_url + "/simple/").status_code == 404
            legacy = c.get(f"{up.url}/pypi/two-hosts/json").json()
            assert legacy["urls"][0]["url"].startswith(up.files_url + "/packages/")
            prov = c.get(f"{up.url}/integrity/two-hosts/1.0/{fn}/provenance")
            assert prov.status_code == 200
            assert c.get(f"{up.files_url}/integrity/two-hosts/1.0/{fn}/provenance").status_code == 404


def test_sdists_behind_the_packages_source_redirect() -> None:
    with FakePyPI(seed=1) as up:
        up.sdist_redirects = True
        up.add_release("redir", "1.0")
        sdist = next(f for f in up.filenames("redir") if f.endswith(".tar.gz"))
        url = up.file_url("redir", sdist)
        assert url == f"{up.url}/packages/source/r/redir/{sdist}"
        with httpx.Client(timeout=10) as c:
            r = c.get(url)
            assert r.status_code == 301 and r.headers["location"] == up.files_url + up.file_path("redir", sdist)
            assert c.get(url, follow_redirects=True).content == up.file_content("redir", sdist)


def test_tls_on_both_hosts(tmp_path: Path) -> None:
    ca, cert, key = make_ca(tmp_path / "ca")
    with FakePyPI(seed=1, tls=(cert, key)) as up:
        up.add_release("secure", "1.0")
        assert up.url.startswith("https://") and up.files_url.startswith("https://")
        fn = up.filenames("secure")[0]
        ctx = ssl.create_default_context(cafile=str(ca))
        with httpx.Client(verify=ctx, timeout=10) as c:
            assert c.get(f"{up.url}/simple/secure/").status_code == 200
            assert c.get(up.file_url("secure", fn)).content == up.file_content("secure", fn)
        with httpx.Client(timeout=10) as c, pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            c.get(f"{up.url}/simple/")
        # A client that refused the certificate did not wedge the server.
        with httpx.Client(verify=ctx, timeout=10) as c:
            assert c.get(f"{up.url}/simple/").status_code == 200
