"""The README's first command: ``conf/quickstart.toml``, unchanged but for the
upstream URL, syncs a small servable mirror that pip installs from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness.clients import pip_env, run
from tests.harness.consistency import check_tree
from tests.harness.e2e import static_server
from tests.harness.fakepypi import FakePyPI

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "conf" / "quickstart.toml"
ALLOWED = ("requests", "urllib3", "idna", "certifi", "charset-normalizer")


@pytest.mark.slow
def test_quickstart_config_gives_a_servable_mirror(upstream: FakePyPI, tmp_path: Path) -> None:
    for name in (*ALLOWED, "not-asked-for"):
        for version in ("1.0", "1.1", "2.0", "2.1"):
            upstream.add_release(name, version)
    text = QUICKSTART.read_text()
    assert 'url = "https://pypi.org"' in text
    conf = tmp_path / "conf" / "quickstart.toml"
    conf.parent.mkdir()
    # The fake upstream is plain http on 127.0.0.1.
    conf.write_text(text.replace('url = "https://pypi.org"', f'url = "{upstream.url}"\nallow_http = true'))

    r = subprocess.run([sys.executable, "-m", "mirror", "sync", "--config", str(conf)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    web = tmp_path / "mirror-data" / "web"  # "../mirror-data", relative to the config file
    assert check_tree(web) == []
    root = json.loads((web / "simple" / "index.v1_json").read_bytes())
    assert sorted(p["name"] for p in root["projects"]) == sorted(ALLOWED)
    page = json.loads((web / "simple" / "requests" / "index.v1_json").read_bytes())
    assert {v for f in page["files"] for v in ("1.1", "2.0", "2.1", "1.0") if f"-{v}" in f["filename"]} == {
        "1.1", "2.0", "2.1"}, "latest = 3 keeps the three newest releases"

    # Served as it is by a plain static server, pip installs from it.
    with static_server(web) as url:
        dest = tmp_path / "dl"
        got = run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--index-url", f"{url}/simple/", "-d", str(dest), "requests"], pip_env())
    assert got.returncode == 0, got.stdout + got.stderr
    assert [p.name for p in dest.iterdir()] == ["requests-2.1-py3-none-any.whl"]
