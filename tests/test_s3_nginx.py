"""A tree in a bucket, served by Debian's nginx on the shipped
``conf/nginx-s3.conf`` in front of moto's S3 server, installed from with
pip and uv.  The upstream is stopped before any client runs, and the local
``web/`` is empty: every byte a client gets came out of the bucket."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from mirror import cli
from mirror.metrics import Metrics
from tests.harness.clients import make_venv, pip_env, run, uv_binary, uv_env
from tests.harness.consistency import check_tree
from tests.harness.e2e import make_config
from tests.harness.fakepypi import FakePyPI
from tests.harness.nginx import CLIENT_ACCEPT, JSON, V1_HTML, REPO, Nginx, nginx_binary, run_nginx
from tests.harness.s3 import bucket_snapshot, moto_server

pytest.importorskip("boto3")
pytest.importorskip("moto")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed (.ci/run installs Debian's nginx)"),
]

S3_SITE = REPO / "conf" / "nginx-s3.conf"


@dataclass
class Served:
    nginx: Nginx
    tmp: Path
    files: dict[str, bytes]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("nginx-s3")
    with moto_server(tmp) as s3:
        bucket = s3.make_bucket("pypi-mirror-test")
        with FakePyPI(seed=0) as up:
            up.add_release("Hello-Dep", "1.0", provenance=True)
            up.add_release("hello-app", "1.0", deps=["hello-dep>=1.0"])
            cfg = make_config(up.url, tmp / "m", storage=s3.storage(tmp, bucket, prefix="pypi/web"))
            report = trio.run(lambda: cli.run_sync(cfg, metrics=Metrics()))
            assert report.failed == {}
            files = {f: up.file_content(n, f) for n in ("hello-dep", "hello-app") for f in up.filenames(n)}
        assert not any((tmp / "m" / "web").rglob("*")) if (tmp / "m" / "web").exists() else True
        assert check_tree(bucket_snapshot(s3.client(), bucket, tmp / "snap", prefix="pypi/web")) == []
        endpoint = s3.endpoint.removeprefix("http://")
        rewrite = {
            "    server 127.0.0.1:9000;\n": f"    server {endpoint};\n",
            'set $pypi_bucket_root "/pypi-mirror/web";': f'set $pypi_bucket_root "/{bucket}/pypi/web";',
            'set $pypi_bucket_host "127.0.0.1:9000";': f'set $pypi_bucket_host "{endpoint}";',
        }
        with run_nginx(None, tmp / "nginx", site_conf=S3_SITE, rewrite=rewrite) as nginx:
            yield Served(nginx, tmp, files)


def _file_urls(c: httpx.Client, page_url: str) -> dict[str, Any]:
    from urllib.parse import urljoin

    page = c.get(page_url, headers={"Accept": JSON}).json()
    return {f["filename"]: urljoin(page_url, f["url"]) for f in page["files"]}


def test_negotiation_headers_and_files_come_from_the_bucket(served: Served) -> None:
    with httpx.Client(timeout=10) as c:
        for path in ("simple/", "simple/hello-app/"):
            url = f"{served.nginx.url}/{path}"
            for accept, want in {CLIENT_ACCEPT: JSON, V1_HTML: V1_HTML, f"{JSON};q=0, text/html": "text/html",
                                 "*/*": "text/html"}.items():
                r = c.get(url, headers={"Accept": accept})
                assert r.status_code == 200, (path, accept, r.status_code)
                assert r.headers["content-type"].split(";")[0] == want, (path, accept)
                assert "Accept" in [v.strip() for v in ",".join(r.headers.get_list("vary")).split(",")]
                assert r.headers["cache-control"] == "public, max-age=600"
                assert not any(k.lower().startswith(("x-amz-", "x-amzn-")) for k in r.headers), r.headers
            r = c.get(url)
            assert r.headers["content-type"] == "text/html; charset=utf-8" and r.text.startswith("<!DOCTYPE html>")
        r = c.get(f"{served.nginx.url}/simple/", headers={"Accept": JSON, "Accept-Encoding": "gzip"})
        assert r.headers.get("content-encoding") == "gzip" and r.json()["projects"]
        r = c.get(f"{served.nginx.url}/simple/hello-app")
        assert r.status_code == 301 and r.headers["location"] == "/simple/hello-app/"
        assert c.get(f"{served.nginx.url}/simple/no-such-project/").status_code == 404
        assert c.get(f"{served.nginx.url}/packages/no/such/file.whl").status_code == 404
        # Only GET goes through (a denied method shows as a 404, like any refusal).
        assert c.put(f"{served.nginx.url}/packages/x.whl", content=b"x").status_code in (403, 404, 405)
        assert c.get(f"{served.nginx.url}/packages/x.whl").status_code == 404
        files = {**_file_urls(c, f"{served.nginx.url}/simple/hello-app/"),
                 **_file_urls(c, f"{served.nginx.url}/simple/hello-dep/")}
        assert set(files) == set(served.files)
        for name, url in files.items():
            r = c.get(url)
            assert r.status_code == 200 and r.content == served.files[name]
            assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
            assert r.headers["content-type"] == "application/octet-stream", name
            if name.endswith(".whl"):
                r = c.get(url + ".metadata")
                assert r.status_code == 200 and r.headers["content-type"] == "text/plain; charset=utf-8"


def test_pip_and_uv_install_through_nginx_from_the_bucket(served: Served) -> None:
    venv = make_venv(served.tmp / "pip-venv")
    r = run([str(venv / "bin/pip"), "install", "--index-url", served.nginx.index, "hello-app"], pip_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Successfully installed hello-app-1.0 hello-dep-1.0" in r.stdout, r.stdout
    uv_venv = make_venv(served.tmp / "uv-venv", with_pip=False)
    r = run([uv_binary(), "pip", "install", "--no-cache", "--python", str(uv_venv / "bin/python"),
             "--index-url", served.nginx.index, "hello-app"], uv_env(served.tmp / "uv-cache"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "+ hello-app==1.0" in r.stderr and "+ hello-dep==1.0" in r.stderr, r.stderr
    for python in (venv / "bin/python", uv_venv / "bin/python"):
        r = run([str(python), "-c", "import hello_app, hello_dep; print(hello_app.__version__)"], pip_env())
        assert r.stdout.strip() == "1.0", r.stdout + r.stderr
    # Both clients got the PEP 691 JSON pages and the PEP 658 metadata.
    entries = served.nginx.entries()
    pages = [e for e in entries if e["uri"] in ("/simple/hello-app/", "/simple/hello-dep/")
             and e["user_agent"].startswith(("pip/", "uv/"))]
    assert pages and {e["content_type"] for e in pages} == {JSON}
    assert any(e["uri"].endswith(".metadata") and e["status"] == 200 for e in entries)
