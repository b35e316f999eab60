"""End to end as an operator runs it: mirror sync -> nginx (conf/nginx.conf) -> pip and uv.

One tree is synced from the fake upstream and served by Debian's nginx on
the shipped site config for the whole module; the upstream is stopped before
any client runs, so whatever installs came from the mirror.  The nginx
access log (the conf's own JSON format, with the Content-Type sent) shows
what each client was actually given.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest
import trio

from mirror import cli
from mirror.metrics import Metrics
from tests.harness.clients import make_venv, pip_env, run, uv_binary, uv_env
from tests.harness.consistency import check_tree
from tests.harness.e2e import make_config
from tests.harness.fakepypi import FakePyPI
from tests.harness.nginx import CLIENT_ACCEPT, JSON, V1_HTML, Nginx, nginx_binary, run_nginx

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (.ci/run installs Debian's nginx)"),
]



@dataclass
class Served:
    nginx: Nginx
    web: Path
    tmp: Path
    files: dict[str, tuple[str, bytes]]  # filename -> (sha256, content)
    metadata: dict[str, bytes]  # wheel filename -> core metadata


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("nginx-e2e")
    with FakePyPI(seed=0) as up:
        up.add_release("Hello-Dep", "1.0", provenance=True)
        up.add_release("hello-app", "1.0", deps=["hello-dep>=1.0"])
        cfg = make_config(up.url, tmp / "m")
        report = trio.run(lambda: cli.run_sync(cfg, metrics=Metrics()))
        assert report.failed == {}
        files = {
            f: (up.file_sha256(n, f), up.file_content(n, f))
            for n in ("hello-dep", "hello-app") for f in up.filenames(n)
        }
        metadata = {
            f: md for n in ("hello-dep", "hello-app") for f in up.filenames(n)
            if (md := up.file_metadata(n, f)) is not None
        }
    # The upstream is gone from here on: every byte a client gets is ours.
    web = tmp / "m" / "web"
    assert check_tree(web) == []
    with run_nginx(web, tmp / "nginx") as nginx:
        yield Served(nginx, web, tmp, files, metadata)


def _get(client: httpx.Client, url: str, accept: str | None = None) -> httpx.Response:
    headers = {"Accept": accept} if accept is not None else {}
    return client.get(url, headers=headers)


def _file_urls(client: httpx.Client, page_url: str) -> dict[str, dict[str, Any]]:
    page = _get(client, page_url, JSON).json()
    return {
        f["filename"]: {
            **f,
            "abs": urljoin(page_url, f["url"]),
            "provenance_abs": f["provenance"] and urljoin(page_url, f["provenance"]),
        }
        for f in page["files"]
    }


def test_content_negotiation_types_and_cache_headers(served: Served) -> None:
    with httpx.Client(timeout=10) as c:
        for path in ("simple/", "simple/hello-app/"):
            url = f"{served.nginx.url}/{path}"
            cases = {
                CLIENT_ACCEPT: JSON,
                "application/vnd.pypi.simple.latest+json": JSON,
                V1_HTML: V1_HTML,
                f"{V1_HTML}, {JSON}; q=0": V1_HTML,
                f"{JSON};q=0, text/html": "text/html",
                "text/html": "text/html",
                "*/*": "text/html",
            }
            for accept, want in cases.items():
                r = _get(c, url, accept)
                assert r.status_code == 200, (path, accept)
                assert r.headers["content-type"].split(";")[0] == want, (path, accept, r.headers["content-type"])
                assert "Accept" in [v.strip() for v in ",".join(r.headers.get_list("vary")).split(",")]
                assert r.headers["cache-control"] == "public, max-age=600"
            r = c.get(url)  # no Accept header at all: PEP 503 HTML
            assert r.headers["content-type"] == "text/html; charset=utf-8"
            assert r.text.startswith("<!DOCTYPE html>")
            doc = _get(c, url, CLIENT_ACCEPT).json()
            assert doc["meta"]["api-version"].startswith("1.")
        # Big JSON pages are compressed on the way out.
        r = c.get(f"{served.nginx.url}/simple/", headers={"Accept": JSON, "Accept-Encoding": "gzip"})
        assert r.headers.get("content-encoding") == "gzip" and r.json()["projects"]
        # A project URL without its slash is redirected, relatively.
        r = c.get(f"{served.nginx.url}/simple/hello-app")
        assert r.status_code == 301 and r.headers["location"] == "/simple/hello-app/"
        assert c.get(f"{served.nginx.url}/simple/no-such-project/").status_code == 404

        files = {
            **_file_urls(c, f"{served.nginx.url}/simple/hello-app/"),
            **_file_urls(c, f"{served.nginx.url}/simple/hello-dep/"),
        }
        assert set(files) == set(served.files)
        for name, f in files.items():
            r = c.get(f["abs"])
            assert r.status_code == 200 and r.content == served.files[name][1]
            assert r.headers["content-type"] == "application/octet-stream", name
            assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
            if name in served.metadata:
                r = c.get(f["abs"] + ".metadata")
                assert r.content == served.metadata[name]
                assert r.headers["content-type"] == "text/plain; charset=utf-8"
                assert "immutable" in r.headers["cache-control"]
            if f["provenance"]:
                r = c.get(f["provenance_abs"])
                assert r.headers["content-type"] == "application/json"
                assert isinstance(r.json(), dict)
        assert any(f["provenance"] for f in files.values())
        r = c.get(f"{served.nginx.url}/last-modified")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert r.headers["cache-control"] == "no-cache"


def _project_pages(entries: list[dict[str, Any]], agent: str) -> list[dict[str, Any]]:
    return [
        e for e in entries
        if e["user_agent"].startswith(agent) and e["uri"] in ("/simple/hello-app/", "/simple/hello-dep/")
    ]


def _metadata_gets(entries: list[dict[str, Any]], agent: str) -> set[str]:
    return {
        e["uri"].rsplit("/", 1)[-1] for e in entries
        if e["user_agent"].startswith(agent) and e["uri"].endswith(".metadata") and e["status"] == 200
    }


def _assert_json_and_metadata(served: Served, since: int, agent: str) -> None:
    wheels = {f"{f}.metadata" for f in served.metadata}
    entries = served.nginx.wait_entries(
        since, lambda es: len(_project_pages(es, agent)) >= 2 and _metadata_gets(es, agent) >= wheels
    )
    pages = _project_pages(entries, agent)
    assert {e["uri"] for e in pages} == {"/simple/hello-app/", "/simple/hello-dep/"}, entries
    # Every project page this client got was the PEP 691 JSON one.
    assert {e["content_type"] for e in pages} == {JSON}, pages
    assert all(e["status"] == 200 and JSON in e["accept"] for e in pages)
    # PEP 658: the resolver read the dependency from the .metadata file,
    # served as text.
    assert _metadata_gets(entries, agent) == wheels, entries
    assert {e["content_type"] for e in entries if e["uri"].endswith(".metadata")} == {"text/plain; charset=utf-8"}


def _imports(python: Path) -> str:
    r = run([str(python), "-c", "import hello_app, hello_dep; print(hello_app.__version__, hello_dep.__version__)"],
            pip_env())
    return r.stdout.strip() + r.stderr


@pytest.fixture(scope="module")
def pip_venv(served: Served) -> Path:
    return make_venv(served.tmp / "pip-venv")


def test_pip_install_resolves_the_dependency_through_nginx(served: Served, pip_venv: Path) -> None:
    mark = served.nginx.log_mark()
    r = run([str(pip_venv / "bin/pip"), "install", "--index-url", served.nginx.index, "hello-app"], pip_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Successfully installed hello-app-1.0 hello-dep-1.0" in r.stdout, r.stdout
    assert _imports(pip_venv / "bin/python") == "1.0 1.0"
    _assert_json_and_metadata(served, mark, "pip/")


def test_uv_pip_install_resolves_the_dependency_through_nginx(served: Served) -> None:
    venv = make_venv(served.tmp / "uv-venv", with_pip=False)
    mark = served.nginx.log_mark()
    r = run(
        [uv_binary(), "pip", "install", "--no-cache", "--python", str(venv / "bin/python"),
         "--index-url", served.nginx.index, "hello-app"],
        uv_env(served.tmp / "uv-cache"),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "+ hello-app==1.0" in r.stderr and "+ hello-dep==1.0" in r.stderr, r.stderr
    assert _imports(venv / "bin/python") == "1.0 1.0"
    _assert_json_and_metadata(served, mark, "uv/")


def _requirements(path: Path, served: Served, *, corrupt: bool = False) -> Path:
    lines = []
    for project in ("hello-app", "hello-dep"):
        wheel = next(f for f in served.files if f.endswith(".whl") and f.startswith(project.replace("-", "_")))
        sha = served.files[wheel][0]
        if corrupt and project == "hello-dep":
            sha = hashlib.sha256(b"not the file").hexdigest()
        lines.append(f"{project}==1.0 --hash=sha256:{sha}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pip_download_require_hashes(served: Served, pip_venv: Path) -> None:
    pip = str(pip_venv / "bin/pip")
    dest = served.tmp / "downloads"
    req = _requirements(served.tmp / "req.txt", served)
    args = [pip, "download", "--require-hashes", "--only-binary", ":all:", "--index-url", served.nginx.index, "-d"]
    r = run([*args, str(dest), "-r", str(req)], pip_env())
    assert r.returncode == 0, r.stdout + r.stderr
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in dest.iterdir()}
    assert got == {name: served.files[name][0] for name in got} and len(got) == 2, got
    # The same download with one wrong pin must fail: the hashes are checked.
    bad = _requirements(served.tmp / "bad.txt", served, corrupt=True)
    r = run([*args, str(served.tmp / "bad-downloads"), "-r", str(bad)], pip_env())
    assert r.returncode != 0
    assert "DO NOT MATCH THE HASHES" in r.stderr, r.stderr


def test_access_log_is_one_json_object_per_request(served: Served) -> None:
    with httpx.Client(timeout=10) as c:
        mark = served.nginx.log_mark()
        c.get(f"{served.nginx.url}/simple/hello-dep/", headers={"Accept": CLIENT_ACCEPT, "User-Agent": 'odd "agent"'})

    def ours(es: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [e for e in es if e["user_agent"].startswith("odd")]

    (entry,) = ours(served.nginx.wait_entries(mark, lambda es: len(ours(es)) >= 1))
    assert entry["uri"] == "/simple/hello-dep/" and entry["status"] == 200
    # escape=json: a quote in a header cannot break the line apart.
    assert entry["content_type"] == JSON and entry["user_agent"] == 'odd "agent"'
