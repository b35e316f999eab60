"""The shipped files operators copy: conf/mirror.toml, systemd/mirror.service,
conf/prometheus.yml.  Each is checked with the tool that will read it."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mirror.cli import build_parser
from mirror.config import Config, load_config, parse_duration
from mirror.ops.daemon import HARD_GRACE
from mirror.ops.exporter import split_listen

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf" / "mirror.toml"
UNIT = ROOT / "systemd" / "mirror.service"
PROMETHEUS = ROOT / "conf" / "prometheus.yml"
SECTIONS = ("upstream", "mirror", "daemon", "metrics")
# Keys whose shipped value is an example, not the default.
EXAMPLES = {"upstream.user_agent", "mirror.directory", "mirror.name"}

needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")


def documented_keys(text: str) -> dict[str, set[str]]:
    """section -> keys written as ``key = ...`` or ``# key = ...``."""
    keys: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        if m := re.match(r"^\[(\w+)\]", line):
            section = m.group(1)
        elif m := re.match(r"^#?\s?(\w+) = ", line):
            keys.setdefault(section, set()).add(m.group(1))
    return keys


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


def test_mirror_toml_documents_every_key_with_its_default() -> None:
    cfg = load_config(CONF)
    keys = documented_keys(CONF.read_text())
    default = Config()
    for section in SECTIONS:
        fields = {f.name for f in dataclasses.fields(getattr(default, section))}
        assert fields <= keys.get(section, set()), f"[{section}] does not document {sorted(fields - keys.get(section, set()))}"
        for name in fields - {k.split(".")[1] for k in EXAMPLES if k.startswith(section + ".")}:
            assert getattr(getattr(cfg, section), name) == getattr(getattr(default, section), name), f"{section}.{name}"


@needs_systemd
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at this venv's `mirror`,
    # and change nothing else.
    exe = Path(sys.executable).parent / "mirror"
    assert exe.exists()
    unit = tmp_path / "mirror.service"
    unit.write_text(UNIT.read_text().replace("/opt/mirror/venv/bin/mirror", str(exe)))
    assert str(exe) in unit.read_text()
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


@needs_systemd
def test_unit_security_exposure_is_at_most_2() -> None:
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    m = re.search(r"Overall exposure level for mirror\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout
    assert float(m.group(1)) <= 2.0, r.stdout


def test_unit_matches_the_daemon() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"] and s["Restart"] == ["on-failure"] and s["User"] == ["mirror"]
    # No /bin/kill needed (procps is missing from minimal images).
    assert s["ExecReload"] == ["/bin/sh -c 'kill -HUP \"$MAINPID\"'"]
    argv = shlex.split(s["ExecStart"][0])
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and args.config == "/etc/mirror/mirror.toml"
    cfg = load_config(CONF)
    assert s["ReadWritePaths"] == [str(cfg.mirror.directory)], "the unit must let the daemon write its directory"
    stop = parse_duration(s["TimeoutStopSec"][0], key="TimeoutStopSec", source=str(UNIT))
    assert stop > cfg.daemon.stop_timeout + HARD_GRACE
    assert parse_duration(s["WatchdogSec"][0], key="WatchdogSec", source=str(UNIT)) >= 60


@needs_promtool
def test_prometheus_example_is_valid_and_scrapes_the_default_port() -> None:
    r = subprocess.run(["promtool", "check", "config", str(PROMETHEUS)], capture_output=True, text=True,
                       timeout=60, cwd=PROMETHEUS.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["promtool", "check", "rules", str(PROMETHEUS.parent / "prometheus-alerts.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    host, port = split_listen(load_config(CONF).metrics.listen)
    assert f'"{host}:{port}"' in PROMETHEUS.read_text()


def test_object_headers_match_what_nginx_sends() -> None:
    """A bucket's objects carry the Content-Type and Cache-Control that
    conf/nginx.conf sends for the same path (mirror.layout owns both)."""
    from mirror import layout

    text = (ROOT / "conf" / "nginx.conf").read_text()
    types = dict((ext, media) for media, ext in re.findall(r"^\s+([\w./+-]+)\s+(\w+);$",
                                                          text.split("types {")[1].split("}")[0], re.M))
    charset = {"text/html", "text/plain"}  # `charset utf-8` with charset_types text/plain
    for rel in ("simple/x/index.html", "simple/x/index.v1_html", "simple/x/index.v1_json",
                "packages/a/b/c/x-1.0-py3-none-any.whl.metadata", "packages/a/b/c/x.whl.provenance",
                "packages/a/b/c/x-1.0.zip"):
        media = types[rel.rsplit(".", 1)[1]]
        want = f"{media}; charset=utf-8" if media in charset else media
        assert layout.content_type(rel) == want, rel
    assert layout.content_type("packages/a/b/c/x-1.0-py3-none-any.whl") == "application/octet-stream"
    assert "default_type application/octet-stream;" in text
    caches = dict(re.findall(r'location (\S+) \{[^}]*?add_header Cache-Control "([^"]+)"', text))
    assert layout.cache_control("packages/a/b/c/x.whl") == caches["/packages/"]
    assert layout.cache_control("simple/x/index.v1_json") == caches["/simple/"]
    assert layout.cache_control("pypi/x/json") == caches["/pypi/"]
    assert layout.cache_control("trace/host") == caches["/trace/"]
