"""The real network: https with a private CA, a separate file host behind a
redirect, and a real forward proxy (tinyproxy) for the feed, the pages and
the files, in the main process and in download helpers.

Every sync here is the real ``mirror sync`` command against the fake PyPI on
127.0.0.1, with its files on a second listener."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import trio

from mirror.errors import UpstreamUnavailable
from mirror.metrics import Metrics
from mirror.upstream.client import Upstream
from mirror.upstream.transport import open_client
from tests.harness.consistency import check_tree
from tests.harness.e2e import make_config, write_config
from tests.harness.fakepypi import FakePyPI
from tests.harness.proxy import tinyproxy
from tests.harness.reliability import tree_files
from tests.harness.tls import make_ca

pytestmark = pytest.mark.slow

PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in PROXY_VARS and k not in PROXY_VARS}
    return {**env, **extra}


def sync(conf: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *args, "sync", "--config", str(conf)],
                          capture_output=True, text=True, env=env, timeout=120)


def populate(up: FakePyPI) -> None:
    up.sdist_redirects = True  # sdists reached through /packages/source/... on the index host
    for n in range(3):
        up.add_release(f"net-{n}", "1.0", provenance=n == 0)
        up.add_release(f"net-{n}", "2.0")


def assert_mirrored(up: FakePyPI, m: Path) -> None:
    """Every file and .metadata, at the validated path of the URL its page
    lists (for a redirected sdist, ``packages/source/...``), and nothing dangling."""
    web = m / "web"
    got = tree_files(web)
    n = 0
    for name in up.project_names():
        for fn in up.filenames(name):
            rel = urlsplit(up.file_url(name, fn)).path.lstrip("/")
            assert rel in got, f"{rel} missing; have {sorted(got)[:8]}"
            assert got[rel].read_bytes() == up.file_content(name, fn)
            if (md := up.file_metadata(name, fn)) is not None:
                assert got[rel + ".metadata"].read_bytes() == md
            n += 1
    assert n and any(r.startswith("packages/source/") for r in got)
    assert check_tree(web) == []
    assert any(p.name.endswith(".provenance") for p in got.values())


@pytest.fixture
def ca(tmp_path: Path) -> tuple[Path, Path, Path]:
    return make_ca(tmp_path / "ca")


def test_https_upstream_trusted_through_ca_bundle(tmp_path: Path, ca: tuple[Path, Path, Path]) -> None:
    cafile, cert, key = ca
    with FakePyPI(seed=5, tls=(cert, key)) as up:
        populate(up)
        m = tmp_path / "m"
        conf = write_config(tmp_path / "mirror.toml", up.url, m, upstream={"ca_bundle": str(cafile)})
        r = sync(conf, clean_env())
        assert r.returncode == 0, r.stderr
        assert_mirrored(up, m)
        # Pages on one host, files on the other, sdists through the redirect.
        paths = [t for _, t, _, _ in up.requests]
        assert any(t.startswith("/packages/source/") for t in paths)
        assert any(t.startswith("/integrity/") for t in paths)


def test_ssl_cert_file_and_dir_are_honoured_when_the_key_is_unset(tmp_path: Path, ca: tuple[Path, Path, Path]) -> None:
    cafile, cert, key = ca
    with FakePyPI(seed=5, tls=(cert, key)) as up:
        populate(up)
        m = tmp_path / "m"
        conf = write_config(tmp_path / "mirror.toml", up.url, m)
        r = sync(conf, clean_env(SSL_CERT_FILE=str(cafile)))
        assert r.returncode == 0, r.stderr
        assert_mirrored(up, m)
        bad = sync(conf, clean_env(SSL_CERT_FILE=str(tmp_path / "nope.pem")))
        assert bad.returncode == 2 and "SSL_CERT_FILE" in bad.stderr and "Traceback" not in bad.stderr
        # SSL_CERT_DIR: a directory of hashed certificate names (openssl rehash).
        certs = tmp_path / "certs"
        certs.mkdir()
        (certs / "corp-ca.pem").write_bytes(cafile.read_bytes())
        subprocess.run(["openssl", "rehash", str(certs)], check=True, capture_output=True, timeout=60)
        conf2 = write_config(tmp_path / "dir.toml", up.url, tmp_path / "m2")
        r = sync(conf2, clean_env(SSL_CERT_DIR=str(certs)))
        assert r.returncode == 0, r.stderr
        assert_mirrored(up, tmp_path / "m2")


def test_an_untrusted_certificate_is_one_clear_line_and_exit_4(tmp_path: Path, ca: tuple[Path, Path, Path]) -> None:
    _, cert, key = ca
    with FakePyPI(seed=5, tls=(cert, key)) as up:
        populate(up)
        conf = write_config(tmp_path / "mirror.toml", up.url, tmp_path / "m", upstream={"retries": 5, "backoff": 2})
        r = sync(conf, clean_env())
        assert r.returncode == 4, r.stderr
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert "Traceback" not in r.stderr
        err = [line for line in lines if "certificate of" in line]  # (the tmp path says "certificate" too)
        assert len(err) == 1, r.stderr
        assert f"127.0.0.1:{up.port}" in err[0] and "ca_bundle" in err[0]
        # No retries on the backoff schedule: it failed at the first answer.
        assert len(up.requests) == 0


async def test_a_refused_certificate_is_counted_and_not_retried(tmp_path: Path, ca: tuple[Path, Path, Path]) -> None:
    _, cert, key = ca
    with FakePyPI(seed=5, tls=(cert, key)) as up:
        cfg = make_config(up.url, tmp_path / "m").upstream
        metrics = Metrics()
        client = open_client(cfg, workers=2, version="test")
        try:
            with pytest.raises(UpstreamUnavailable, match="certificate of 127.0.0.1"):
                await Upstream(client, cfg, metrics=metrics).xmlrpc("changelog_last_serial")
        finally:
            await client.aclose()
        tls = metrics.registry.get_sample_value("mirror_upstream_errors_total", {"kind": "feed", "reason": "tls"})
        assert tls == 1


def test_everything_goes_through_an_authenticating_proxy(tmp_path: Path) -> None:
    """http upstream, proxy from the config with a password: the feed, the
    pages and both hosts' files are forwarded, and the password never shows."""
    with FakePyPI(seed=6) as up, tinyproxy(tmp_path / "proxy", auth=("mirror", "s3cret")) as proxy:
        populate(up)
        m = tmp_path / "m"
        url = proxy.url.replace("http://", "http://mirror:s3cret@")
        conf = write_config(tmp_path / "mirror.toml", up.url, m, upstream={"proxy": url})
        r = sync(conf, clean_env(), "--log-level", "info")
        assert r.returncode == 0, r.stderr
        assert_mirrored(up, m)
        seen = proxy.requests()
        assert any(s == f"POST {up.url}/pypi" for s in seen), seen[:5]
        assert any(s.startswith(f"GET {up.url}/simple/net-0/") for s in seen)
        assert any(s.startswith(f"GET {up.files_url}/packages/") for s in seen)
        assert any(s.startswith(f"GET {up.url}/packages/source/") for s in seen)
        # Every request the two hosts answered came through the proxy.
        forwarded = sorted(s.split(" ", 1)[0] + " " + urlsplit(s.split(" ", 1)[1]).path for s in seen)
        answered = sorted(f"{method} {urlsplit(target).path}" for method, target, _, _ in up.requests)
        assert forwarded == answered
        assert f"proxy http://mirror:***@127.0.0.1:{proxy.url.rsplit(':', 1)[1]} (upstream.proxy)" in r.stderr
        assert "s3cret" not in r.stderr
        status = subprocess.run([sys.executable, "-m", "mirror", "status", "--config", str(conf)],
                                capture_output=True, text=True, env=clean_env(), timeout=60)
        assert "mirror:***@" in status.stdout and "s3cret" not in status.stdout, status.stdout
        # A wrong password: the proxy's refusal (tinyproxy answers 401), a clear error, exit 4.
        bad = write_config(tmp_path / "bad.toml", up.url, tmp_path / "m2",
                           upstream={"proxy": proxy.url.replace("http://", "http://mirror:wrong@"), "retries": 0})
        r = sync(bad, clean_env())
        assert r.returncode == 4 and "HTTP 401" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_https_proxy_from_the_environment_tunnels_with_connect(tmp_path: Path, ca: tuple[Path, Path, Path]) -> None:
    """https upstream, HTTPS_PROXY from the environment: CONNECT tunnels for
    the index and the file host; NO_PROXY sends a second mirror direct."""
    cafile, cert, key = ca
    with FakePyPI(seed=7, tls=(cert, key)) as up, tinyproxy(tmp_path / "proxy") as proxy:
        populate(up)
        m = tmp_path / "m"
        conf = write_config(tmp_path / "mirror.toml", up.url, m, upstream={"ca_bundle": str(cafile)})
        r = sync(conf, clean_env(HTTPS_PROXY=proxy.url), "--log-level", "info")
        assert r.returncode == 0, r.stderr
        assert_mirrored(up, m)
        seen = proxy.requests()
        files_port = up.files_url.rsplit(":", 1)[1]
        assert f"CONNECT 127.0.0.1:{up.port}" in seen and f"CONNECT 127.0.0.1:{files_port}" in seen, seen
        # Every connection the two hosts accepted was a tunnel the proxy opened.
        assert len(seen) == up.connections and all(s.startswith("CONNECT ") for s in seen)
        assert f"proxy {proxy.url} (from HTTPS_PROXY)" in r.stderr
        before = len(seen)
        conf2 = write_config(tmp_path / "direct.toml", up.url, tmp_path / "m2", upstream={"ca_bundle": str(cafile)})
        r = sync(conf2, clean_env(HTTPS_PROXY=proxy.url, NO_PROXY="localhost,127.0.0.1"))
        assert r.returncode == 0, r.stderr
        assert len(proxy.requests()) == before, "NO_PROXY hosts must not go through the proxy"


async def test_download_helpers_use_the_same_proxy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first-sync-sized cycle downloads in helper processes: they inherit
    the config's proxy, so their files show in the proxy's log too."""
    from mirror.ops.compose import open_mirror
    from mirror.sync.cycle import Syncer

    monkeypatch.setattr(Syncer, "pool_min_projects", 0)
    with FakePyPI(seed=8) as up, tinyproxy(tmp_path / "proxy") as proxy:
        populate(up)
        cfg = make_config(up.url, tmp_path / "m", upstream={"proxy": proxy.url}, mirror={"download_processes": 1})
        metrics = Metrics()
        async with open_mirror(cfg, metrics=metrics) as mirror:
            report = await mirror.syncer().sync_once()
        assert not report.failed
        await trio.sleep(0.2)
        files = [s for s in proxy.requests() if s.startswith(f"GET {up.files_url}/packages/")]
        assert len(files) >= report.files_downloaded - 3 > 0  # sdists come through the index host's redirect
        assert_mirrored(up, tmp_path / "m")


def test_json_status_names_the_proxy(tmp_path: Path) -> None:
    with FakePyPI(seed=9) as up:
        up.add_release("one", "1.0")
        conf = write_config(tmp_path / "mirror.toml", up.url, tmp_path / "m", upstream={"proxy": "none"})
        assert sync(conf, clean_env(HTTPS_PROXY="http://127.0.0.1:9")).returncode == 0
        r = subprocess.run([sys.executable, "-m", "mirror", "status", "--json", "--config", str(conf)],
                           capture_output=True, text=True, env=clean_env(), timeout=60)
        doc = json.loads(r.stdout)
        assert doc["upstream"] == up.url and doc["network"].startswith("no proxy")
