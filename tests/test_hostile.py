"""A hostile upstream: each case asserts the exact outcome.

Refused entries are dropped with a log line naming the project and a
``mirror_upstream_rejected_total{kind}`` count, the rest of the mirror carries
on, and nothing appears outside the mirror directory (the filesystem around
it is listed before and after).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from mirror import cli
from mirror.config import Config
from mirror.metrics import Metrics
from mirror.plan.planner import group_listing
from mirror.publish.state import State
from mirror.sync.cycle import CycleReport
from mirror.layout import Layout
from tests.harness.consistency import check_tree
from tests.harness.e2e import make_config, write_config
from tests.harness.fakepypi import JSON_TYPE, FakePyPI
from tests.harness.reliability import HostileServer, snapshot_fs

SHA = hashlib.sha256(b"x").hexdigest()


def rejected(m: Metrics, kind: str) -> float:
    return m.registry.get_sample_value("mirror_upstream_rejected_total", {"kind": kind}) or 0.0


def download_errors(m: Metrics, reason: str) -> float:
    return m.registry.get_sample_value("mirror_download_errors_total", {"reason": reason}) or 0.0


def outside(tmp_path: Path) -> set[str]:
    """Everything around the mirror directory ``tmp_path/m``."""
    return {p for p in snapshot_fs(tmp_path) if p != "m" and not p.startswith("m/")}


async def sync(cfg: Config, m: Metrics) -> CycleReport:
    return await cli.run_sync(cfg, metrics=m)


def page_files(cfg: Config, name: str) -> set[str]:
    doc = json.loads((cfg.mirror.directory / "web/simple" / name / "index.v1_json").read_bytes())
    return {f["filename"] for f in doc["files"]}


def real_page(up: FakePyPI, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = httpx.get(f"{up.url}/simple/{name}/", headers={"Accept": JSON_TYPE}).json()
    return doc


def entry(filename: Any, url: Any, sha: Any = SHA, size: Any = 10) -> dict[str, Any]:
    return {"filename": filename, "url": url, "hashes": {"sha256": sha} if sha else {}, "size": size}


async def test_hostile_file_entries_are_refused_one_by_one(
    upstream: FakePyPI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.add_release("evil", "1.0")
    upstream.add_release("bystander", "1.0")
    doc = real_page(upstream, "evil")
    good = doc["files"]
    wheel = next(f for f in good if f["filename"].endswith(".whl"))
    u = upstream.url
    hostile: list[tuple[Any, str]] = [
        (entry("../../../../escape.whl", f"{u}/packages/../../../../escape.whl"), "path"),
        (entry("a/b.whl", f"{u}/packages/aa/bb/a/b.whl"), "path"),
        (entry("..\\..\\win.whl", f"{u}/packages/aa/bb/win.whl"), "path"),
        (entry("nul\x00.whl", f"{u}/packages/aa/bb/nul.whl"), "path"),
        (entry("/etc/passwd", f"{u}/etc/passwd"), "path"),
        (entry("pwn.whl", f"{u}/packages/%2e%2e/%2e%2e/%2e%2e/%2e%2e/pwn.whl"), "path"),
        (entry("pwn2.whl", f"{u}/packages/aa%2f..%2f..%2fpwn2.whl"), "path"),
        (entry("x" * 300 + ".whl", f"{u}/packages/aa/bb/{'x' * 300}.whl"), "path"),
        (entry("p.whl", f"{u}/packages/" + "/".join(["d" * 200] * 6) + "/p.whl"), "path"),
        (dict(wheel), "path"),  # listed twice
        (entry(wheel["filename"] + ".metadata", wheel["url"] + ".metadata"), "path"),  # a sidecar's path
        (entry("file.whl", "file:///etc/passwd"), "url"),
        (entry("ftp.whl", "ftp://127.0.0.1/ftp.whl"), "url"),
        (entry("js.whl", "javascript:alert(1)"), "url"),
        (entry("back.whl", f"{u}\\packages\\back.whl"), "url"),
        (entry("nohash.whl", f"{u}/packages/aa/bb/nohash.whl", sha=None), "malformed"),
        (entry("neg.whl", f"{u}/packages/aa/bb/neg.whl", size=-1), "malformed"),
        (entry(["not", "a", "name"], f"{u}/packages/aa/bb/list.whl"), "malformed"),
        (42, "malformed"),
    ]
    doc["files"] = good + [h for h, _ in hostile]
    upstream.set_raw_project_json("evil", doc)
    cfg = make_config(upstream.url, tmp_path / "m")
    before = outside(tmp_path)
    m = Metrics()
    with caplog.at_level(logging.WARNING, logger="mirror"):
        report = await sync(cfg, m)
    assert report.failed == {}
    assert page_files(cfg, "evil") == {f["filename"] for f in good}
    assert page_files(cfg, "bystander") == set(upstream.filenames("bystander"))
    for kind in ("path", "url", "malformed"):
        assert rejected(m, kind) == sum(1 for _, k in hostile if k == kind), kind
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evil: refused a file entry")]
    assert len(refusals) == len(hostile)
    assert any("escape.whl" in r for r in refusals) and any("file:///etc/passwd" in r for r in refusals)
    assert check_tree(cfg.mirror.directory / "web") == []
    assert outside(tmp_path) == before
    # Every path inside the tree is one that was verified and recorded.
    state = State.open(Layout(cfg.mirror.directory).db)
    recorded = {r[0] for r in state.db.execute("SELECT path FROM files")}
    on_disk = {
        os.path.relpath(os.path.join(d, f), cfg.mirror.directory / "web")
        for d, _, fs in os.walk(cfg.mirror.directory / "web/packages") for f in fs
    }
    assert on_disk == recorded


async def test_hostile_html_links_are_refused(upstream: FakePyPI, tmp_path: Path) -> None:
    upstream.add_release("htmlish", "1.0")
    upstream.html_only = True
    good = "".join(
        f'<a href="{upstream.file_url("htmlish", fn)}#sha256={upstream.file_sha256("htmlish", fn)}">{fn}</a>'
        for fn in upstream.filenames("htmlish")
    )
    bad = (
        f'<a href="file:///etc/shadow#sha256={SHA}">shadow</a>'
        f'<a href="{upstream.url}/packages/%2E%2E/%2E%2E/up.whl#sha256={SHA}">up.whl</a>'
        f'<a href="{upstream.url}/packages/aa/nohash.whl">nohash.whl</a>'
    )
    page = f'<html><head><meta name="pypi:repository-version" content="1.0"></head><body>{good}{bad}</body></html>'
    upstream.add_raw_route("/simple/htmlish/", body=page.encode(), headers={"Content-Type": "text/html"})
    cfg = make_config(upstream.url, tmp_path / "m")
    before = outside(tmp_path)
    m = Metrics()
    report = await sync(cfg, m)
    assert report.failed == {}
    assert page_files(cfg, "htmlish") == set(upstream.filenames("htmlish"))
    assert (rejected(m, "url"), rejected(m, "path"), rejected(m, "malformed")) == (1, 1, 1)
    assert check_tree(cfg.mirror.directory / "web") == [] and outside(tmp_path) == before


async def test_hostile_project_names_in_the_feed(
    upstream: FakePyPI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = ["../../etc", "a/b", "x" * 300, "-dash-", "sp ace", "café"]
    for name in bad:
        upstream.add_project(name)
    upstream.add_release("fine", "1.0")
    cfg = make_config(upstream.url, tmp_path / "m")
    before = outside(tmp_path)
    m = Metrics()
    with caplog.at_level(logging.WARNING, logger="mirror"):
        report = await sync(cfg, m)  # first sync: list_packages_with_serial
    assert report.failed == {} and report.projects_synced == 1
    assert rejected(m, "name") == len(bad)
    logged = [r.getMessage() for r in caplog.records if "refused project name" in r.getMessage()]
    assert len(logged) == len(bad) and any("'../../etc'" in line for line in logged)
    # Later events for them come through changelog_since_serial.
    for name in bad:
        upstream.remove_project(name)
    upstream.add_release("fine", "2.0")
    report = await sync(cfg, m)
    assert report.failed == {} and rejected(m, "name") == 2 * len(bad)
    web = cfg.mirror.directory / "web"
    assert sorted(os.listdir(web / "simple")) == ["fine", "index.html", "index.v1_html", "index.v1_json"]
    assert check_tree(web) == [] and outside(tmp_path) == before


async def test_root_index_names_that_are_invalid_or_collide(
    upstream: FakePyPI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.add_release("Foo.Bar", "1.0")
    upstream.add_release("plain", "1.0")
    s = upstream.project_serial("foo-bar")
    root = {
        "meta": {"api-version": "1.1", "_last-serial": upstream.serial},
        "projects": [
            {"name": "Foo.Bar", "_last-serial": s - 1},
            {"name": "foo_bar", "_last-serial": s},  # the same project once normalized
            {"name": "plain", "_last-serial": upstream.project_serial("plain")},
            {"name": "../../../etc", "_last-serial": 1},
            {"name": "nul\x00", "_last-serial": 1},
            {"name": 7, "_last-serial": 1},
            {"name": None},
            "just a string",
        ],
    }
    upstream.add_raw_route("/simple/", body=json.dumps(root).encode(), headers={"Content-Type": JSON_TYPE})
    cfg = make_config(upstream.url, tmp_path / "m", upstream={"feed": "simple"})
    before = outside(tmp_path)
    m = Metrics()
    with caplog.at_level(logging.WARNING, logger="mirror"):
        report = await sync(cfg, m)
    assert report.failed == {} and report.projects_synced == 2
    assert rejected(m, "name") == 6
    assert any("'Foo.Bar' (collides with 'foo_bar' after normalization)" in r.getMessage() for r in caplog.records)
    web = cfg.mirror.directory / "web"
    listed = json.loads((web / "simple/index.v1_json").read_bytes())["projects"]
    assert [p["name"] for p in listed] == ["foo_bar", "plain"]
    assert check_tree(web) == [] and outside(tmp_path) == before


def test_listing_names_that_collide_keep_the_newest() -> None:
    changes = group_listing({"Foo.Bar": 5, "foo_bar": 9, "FOO-BAR": 7, "ok": 1})
    assert changes.targets == {"foo-bar": 9, "ok": 1}
    assert changes.display["foo-bar"] == "foo_bar"
    assert len(changes.rejected) == 2 and all("collides" in r for r in changes.rejected)


async def test_api_version_2_is_refused_and_1_9_accepted(
    upstream: FakePyPI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("two", "onenine", "fine"):
        upstream.add_release(name, "1.0")
    for name, version in (("two", "2.0"), ("onenine", "1.9")):
        doc = real_page(upstream, name)
        doc["meta"]["api-version"] = version
        upstream.set_raw_project_json(name, doc)
    cfg = make_config(upstream.url, tmp_path / "m")
    m = Metrics()
    with caplog.at_level(logging.WARNING, logger="mirror"):
        report = await sync(cfg, m)
    assert set(report.failed) == {"two"} and "api-version 2.0" in report.failed["two"]
    assert rejected(m, "api_version") == 1
    assert any("api-version 1.9 is newer" in r.getMessage() for r in caplog.records)
    web = cfg.mirror.directory / "web"
    assert not (web / "simple/two").exists() and (web / "simple/onenine").exists()
    assert check_tree(web) == []


def test_root_index_api_version_2_stops_the_cycle(upstream: FakePyPI, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    upstream.add_release("fine", "1.0")
    root = {"meta": {"api-version": "2.0"}, "projects": [{"name": "fine", "_last-serial": 1}]}
    upstream.add_raw_route("/simple/", body=json.dumps(root).encode(), headers={"Content-Type": JSON_TYPE})
    conf = write_config(tmp_path / "mirror.toml", upstream.url, tmp_path / "m", upstream={"feed": "simple"})
    prom = tmp_path / "m.prom"
    assert cli.main(["sync", "--config", str(conf), "--metrics-textfile", str(prom)]) == 4
    err = capsys.readouterr().err
    assert "root index: api-version 2.0 has a major version above 1; refusing it" in err and "Traceback" not in err
    assert 'mirror_upstream_rejected_total{kind="api_version"} 1.0' in prom.read_text()


async def test_oversize_and_nested_json_pages_are_refused(
    upstream: FakePyPI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.add_release("small", "1.0", sdist=False)
    upstream.add_release("huge", "1.0", sdist=False)
    upstream.add_release("bomb", "1.0", sdist=False)
    doc = real_page(upstream, "huge")
    doc["padding"] = "x" * 5000
    upstream.set_raw_project_json("huge", doc)
    upstream.set_raw_project_json("bomb", b"[" * 4000)  # deeper than the JSON parser recurses
    cfg = make_config(upstream.url, tmp_path / "m", upstream={"max_page_bytes": 4096, "retries": 2})
    m = Metrics()
    report = await sync(cfg, m)
    assert set(report.failed) == {"huge", "bomb"}
    assert "exceeds max_page_bytes=4096" in report.failed["huge"]
    assert "invalid JSON" in report.failed["bomb"]
    assert rejected(m, "oversize") == 1  # not retried, counted once
    assert rejected(m, "malformed") == 3  # each attempt of "bomb"
    assert check_tree(cfg.mirror.directory / "web") == []


async def test_streamed_page_is_cut_at_the_cap() -> None:
    """No Content-Length: the body is counted while it streams."""
    from mirror.errors import MalformedResponse
    from mirror.upstream.client import Upstream

    sent = 0

    async def endless() -> Any:
        nonlocal sent
        while True:
            sent += 4096
            yield b"[" * 4096

    transport = httpx.MockTransport(lambda req: httpx.Response(200, content=endless()))
    cfg = make_config("https://up.invalid", Path("/nonexistent"), upstream={"max_page_bytes": 100_000}).upstream
    m = Metrics()
    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(MalformedResponse, match="exceeds max_page_bytes=100000"):
            await Upstream(client, cfg, metrics=m).request("GET", "https://up.invalid/simple/x/", kind="page")
    assert sent <= 100_000 + 4096
    assert rejected(m, "oversize") == 1


def _billion_laughs() -> bytes:
    names = "abcdefghi"
    ents = '<!ENTITY a "aaaaaaaaaa">' + "".join(
        f'<!ENTITY {n} "{("&" + prev + ";") * 10}">' for prev, n in zip(names, names[1:])
    )
    return (f'<?xml version="1.0"?><!DOCTYPE l [{ents}]><methodResponse><params><param><value>'
            "<string>&i;</string></value></param></params></methodResponse>").encode()


@pytest.mark.parametrize("body", [
    _billion_laughs(),  # expat refuses the entity amplification
    b"<not xml",
    # A serial no SQLite INTEGER can hold.
    b"<?xml version='1.0'?><methodResponse><params><param><value><int>1180591620717411303424</int>"
    b"</value></param></params></methodResponse>",
])
def test_malformed_xmlrpc_feed_stops_the_cycle(
    body: bytes, upstream: FakePyPI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.add_release("fine", "1.0")
    upstream.add_raw_route("/pypi", body=body, headers={"Content-Type": "text/xml"})
    conf = write_config(tmp_path / "mirror.toml", upstream.url, tmp_path / "m", upstream={"feed": "changelog"})
    capsys.readouterr()
    t0 = time.monotonic()
    assert cli.main(["sync", "--config", str(conf)]) == 4
    assert time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert "changelog_last_serial" in err and "Traceback" not in err
    assert not (tmp_path / "m/web/simple").exists()
    # feed = "auto" falls back to the root index and carries on.
    conf = write_config(tmp_path / "auto.toml", upstream.url, tmp_path / "m", upstream={"feed": "auto"})
    assert cli.main(["sync", "--config", str(conf)]) == 0
    assert check_tree(tmp_path / "m/web") == []


# -- file bodies that lie ----------------------------------------------------------


def _file_page(up: FakePyPI, name: str, files: list[dict[str, Any]]) -> None:
    up.add_project(name)
    up.set_raw_project_json(name, {"meta": {"api-version": "1.1"}, "name": name, "files": files})


async def test_body_larger_than_declared_stops_at_size_plus_one(upstream: FakePyPI, tmp_path: Path) -> None:
    with HostileServer() as hs:
        hs.routes["/packages/aa/bb/big-1.0.tar.gz"] = ("endless", None)
        _file_page(upstream, "big", [entry("big-1.0.tar.gz", f"{hs.url}/packages/aa/bb/big-1.0.tar.gz", size=1000)])
        upstream.add_release("fine", "1.0")
        cfg = make_config(upstream.url, tmp_path / "m", upstream={"retries": 1, "timeout": 5})
        m = Metrics()
        t0 = time.monotonic()
        report = await sync(cfg, m)
        took = time.monotonic() - t0
        sent = hs.sent["/packages/aa/bb/big-1.0.tar.gz"]
    assert set(report.failed) == {"big"}
    assert download_errors(m, "size_mismatch") == 2 and download_errors(m, "timeout") == 0
    # Two attempts, each cut after its first chunk (plus what the kernel's
    # socket buffers had accepted), not after a gigabyte.
    assert sent < 64 << 20, sent
    assert took < 10
    assert os.listdir(tmp_path / "m/state/tmp") == []
    assert not (tmp_path / "m/web/packages/aa").exists()


@pytest.mark.parametrize("which", ["sidecar", "dist"])
async def test_endless_body_of_unknown_size_is_cut_at_its_cap(upstream: FakePyPI, tmp_path: Path, which: str) -> None:
    """A sidecar without a hash (so without a size) is cut at
    ``max_page_bytes``; a distribution listed without a size (as on an
    HTML-only upstream) at ``max_unknown_file_bytes``.  Files of the same
    kind below the cap are kept."""
    content = os.urandom(3000)
    with HostileServer() as hs:
        if which == "sidecar":
            endless, failed = "/packages/aa/ok-1.0-py3-none-any.whl.metadata", "ok"
            hs.routes["/packages/aa/ok-1.0-py3-none-any.whl"] = ("bytes", content)
            f = entry("ok-1.0-py3-none-any.whl", f"{hs.url}/packages/aa/ok-1.0-py3-none-any.whl",
                      sha=hashlib.sha256(content).hexdigest(), size=len(content))
            f["core-metadata"] = True  # no hash: the size is unknown too
            _file_page(upstream, "ok", [f])
            caps = {"max_page_bytes": 65536}
            kept = "packages/aa/ok-1.0-py3-none-any.whl"
        else:
            endless, failed = "/packages/aa/big-1.0.tar.gz", "big"
            hs.routes["/packages/aa/small-1.0.tar.gz"] = ("bytes", content)
            _file_page(upstream, "big", [entry("big-1.0.tar.gz", f"{hs.url}{endless}", size=None)])
            _file_page(upstream, "small", [entry("small-1.0.tar.gz", f"{hs.url}/packages/aa/small-1.0.tar.gz",
                                                 sha=hashlib.sha256(content).hexdigest(), size=None)])
            caps = {"max_unknown_file_bytes": 1 << 20}
            kept = "packages/aa/small-1.0.tar.gz"
        hs.routes[endless] = ("endless", None)
        cfg = make_config(upstream.url, tmp_path / "m", upstream={"retries": 0, **caps})
        m = Metrics()
        report = await sync(cfg, m)
        sent = hs.sent[endless]
    assert set(report.failed) == {failed} and "size_mismatch" in report.failed[failed]
    assert download_errors(m, "size_mismatch") == 1
    assert sent < 64 << 20, sent
    assert not (tmp_path / "m/web" / endless.lstrip("/")).exists()
    if which == "dist":
        # The sidecar's project fails whole, so only here is a file published.
        assert (tmp_path / "m/web" / kept).read_bytes() == content
    assert os.listdir(tmp_path / "m/state/tmp") == []


async def test_trickling_body_hits_the_total_deadline(upstream: FakePyPI, tmp_path: Path) -> None:
    """Each byte arrives well within the per-read timeout; only the per-file
    deadline (timeout + size / 64 KB/s) can stop a 4000-byte file that would
    take 80 s, and for a sidecar of unknown size the deadline that moves with
    the bytes received does the same.  A body of unknown size that keeps
    above 64 KB/s may take longer than the timeout."""
    body = os.urandom(4000)
    steady = os.urandom(160 * 1024)
    with HostileServer() as hs:
        hs.routes["/packages/t/slow-1.0-py3-none-any.whl"] = ("trickle", (body, 0.02))
        hs.routes["/packages/t/meta-1.0-py3-none-any.whl"] = ("bytes", b"fine")
        hs.routes["/packages/t/meta-1.0-py3-none-any.whl.metadata"] = ("trickle", (body, 0.02))
        hs.routes["/packages/t/ok-1.0-py3-none-any.whl"] = ("bytes", b"fine")
        # 160 KB at ~128 KB/s: 1.25 s, more than twice the timeout.
        hs.routes["/packages/t/ok-1.0-py3-none-any.whl.metadata"] = ("trickle", (steady, 0.0625, 8192))
        ok = entry("ok-1.0-py3-none-any.whl", f"{hs.url}/packages/t/ok-1.0-py3-none-any.whl",
                   sha=hashlib.sha256(b"fine").hexdigest(), size=4)
        ok["core-metadata"] = True
        _file_page(upstream, "ok", [ok])
        slow = entry("slow-1.0-py3-none-any.whl", f"{hs.url}/packages/t/slow-1.0-py3-none-any.whl",
                     sha=hashlib.sha256(body).hexdigest(), size=len(body))
        meta = entry("meta-1.0-py3-none-any.whl", f"{hs.url}/packages/t/meta-1.0-py3-none-any.whl",
                     sha=hashlib.sha256(b"fine").hexdigest(), size=4)
        meta["core-metadata"] = True
        _file_page(upstream, "slow", [slow])
        _file_page(upstream, "meta", [meta])
        cfg = make_config(upstream.url, tmp_path / "m", upstream={"retries": 1, "timeout": 0.5})
        m = Metrics()
        t0 = time.monotonic()
        report = await sync(cfg, m)
        took = time.monotonic() - t0
    assert set(report.failed) == {"slow", "meta"}
    assert download_errors(m, "timeout") == 4
    assert took < 15, took
    md = cfg.mirror.directory / "web/packages/t/ok-1.0-py3-none-any.whl.metadata"
    assert md.read_bytes() == steady


# -- the tree itself ---------------------------------------------------------------


async def test_symlinks_in_the_tree_are_never_followed(
    upstream: FakePyPI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("p1", "p2", "p3", "fine"):
        upstream.add_release(name, "1.0")
    cfg = make_config(upstream.url, tmp_path / "m")
    web = cfg.mirror.directory / "web"
    # Files of p1 land under packages/<aa>: make that a link to the outside,
    # holding the right bytes so that even adopting them would "work".
    rels = [upstream.file_path("p1", fn).lstrip("/") for fn in upstream.filenames("p1")]
    aa = rels[0].split("/")[1]
    out1 = tmp_path / "out1"
    for rel in rels:
        if rel.split("/")[1] == aa:
            p = out1 / Path(*rel.split("/")[2:])
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(upstream.file_content("p1", rel.rsplit("/", 1)[1]))
    (web / "packages").mkdir(parents=True)
    (web / "packages" / aa).symlink_to(out1)
    out2 = tmp_path / "out2"
    out2.mkdir()
    (web / "simple").mkdir()
    (web / "simple/p2").symlink_to(out2)
    before = {p: (tmp_path / p).read_bytes() for p in snapshot_fs(tmp_path) if (tmp_path / p).is_file()}
    m = Metrics()
    with caplog.at_level(logging.WARNING, logger="mirror"):
        report = await sync(cfg, m)
    assert set(report.failed) == {"p1", "p2"}
    assert all("not a plain directory" in why or "unsafe path" in why for why in report.failed.values()), report.failed
    logged = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("p1: refused to write packages/") for line in logged)
    assert any(line.startswith("p2: not published, the tree is unsafe") for line in logged)
    assert os.listdir(out2) == []
    assert {p: (tmp_path / p).read_bytes() for p in snapshot_fs(tmp_path) if (tmp_path / p).is_file()
            and not p.startswith("m/")} == {p: b for p, b in before.items() if not p.startswith("m/")}
    assert check_tree(web) == []

    # A project removed upstream whose page directory became a link: its
    # pages are deleted after the root no longer lists it, never through it.
    out3 = tmp_path / "out3"
    out3.mkdir()
    for n in ("index.html", "index.v1_html", "index.v1_json"):
        (out3 / n).write_text("keep me")
    (web / "simple/p2").unlink()
    os.rename(web / "simple/p3", tmp_path / "p3-pages")
    (web / "simple/p3").symlink_to(out3)
    upstream.remove_project("p3")
    with caplog.at_level(logging.ERROR, logger="mirror"):
        report = await sync(cfg, m)
    assert report.projects_removed == 1 and report.failed == {"p1": report.failed["p1"]}
    assert sorted(os.listdir(out3)) == ["index.html", "index.v1_html", "index.v1_json"]
    assert all((out3 / n).read_text() == "keep me" for n in os.listdir(out3))
    assert any("not removing simple/p3/index.html" in r.getMessage() for r in caplog.records)
    assert check_tree(web) == []


async def test_one_path_with_two_hashes_never_overwrites_a_linked_file(
    upstream: FakePyPI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.add_release("alpha", "1.0")
    cfg = make_config(upstream.url, tmp_path / "m")
    m = Metrics()
    assert (await sync(cfg, m)).failed == {}
    fn = upstream.filenames("alpha")[0]
    path = upstream.file_path("alpha", fn)
    evil = b"other bytes under the same name"
    with HostileServer() as hs:
        # Another host, the same path after /packages/: the same place in our tree.
        hs.routes[path] = ("bytes", evil)
        _file_page(upstream, "beta", [entry(fn, hs.url + path, sha=hashlib.sha256(evil).hexdigest(), size=len(evil))])
        with caplog.at_level(logging.WARNING, logger="mirror"):
            report = await sync(cfg, m)
    assert report.failed == {}
    assert rejected(m, "path") == 1
    assert any(r.getMessage().startswith(f"beta: refused {fn}") for r in caplog.records)
    web = cfg.mirror.directory / "web"
    assert (web / path.lstrip("/")).read_bytes() == upstream.file_content("alpha", fn)
    assert page_files(cfg, "beta") == set()
    assert check_tree(web) == []


@pytest.mark.parametrize("body", [
    b"<html><body><a href=",  # garbage, or half an object from a cache
    b'<!DOCTYPE html><html><body><a href="/packages/a/demo-1.0.tar.gz#sha256=' + SHA.encode() + b'">demo-1.0.tar.gz</a>',
    b"",
])
def test_html_page_cut_short_is_malformed_not_empty(body: bytes) -> None:
    from mirror.errors import MalformedResponse
    from mirror.model import NormalizedName
    from mirror.upstream.parse import parse_project_html

    with pytest.raises(MalformedResponse, match="cut short"):
        parse_project_html(body, name=NormalizedName("demo"), page_url="https://up.test/simple/demo/",
                           header_serial=1, allow_http=False)
