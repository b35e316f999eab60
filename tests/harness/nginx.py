"""Run Debian's nginx on the shipped ``conf/nginx.conf`` for end-to-end tests.

The site file is used as shipped; only three lines are rewritten, and each
rewrite must match exactly once so that a change to the conf that moves them
fails loudly here instead of silently testing something else:

* ``root /srv/pypi/web;``  -> the test's tree
* every ``listen ...;``    -> one ``listen 127.0.0.1:<port>;``
* the ``access_log`` path  -> a file in the test directory (same format)

It is wrapped in a minimal main config (no daemon, pid, error log and temp
paths under the test directory), the way ``conf.d/*.conf`` is included in
Debian's ``http`` block.  nginx cannot listen on port 0 and report the port,
so a free port is picked and the start is retried if another process grabs
it first.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.e2e import free_port, stop_process, wait_listening

REPO = Path(__file__).resolve().parent.parent.parent
JSON = "application/vnd.pypi.simple.v1+json"
V1_HTML = "application/vnd.pypi.simple.v1+html"
# What pip and uv send (pip's exact header).
CLIENT_ACCEPT = f"{JSON}, {V1_HTML}; q=0.1, text/html; q=0.01"
SITE_CONF = REPO / "conf" / "nginx.conf"
SHIPPED_ROOT = "root /srv/pypi/web;"
_ACCESS_LOG = re.compile(r"^(\s*access_log\s+)(\S+)(\s+pypi_mirror;)\s*$", re.M)
_LISTEN = re.compile(r"^\s*listen\s+[^;]+;[^\n]*\n", re.M)


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def site_for_test(text: str, *, web: Path | None, port: int, access_log: Path) -> str:
    """The shipped site with root (``web=None``: a site without one), listen
    and access_log pointed at the test."""
    if web is not None:
        assert text.count(SHIPPED_ROOT) == 1, f"{SITE_CONF}: expected one '{SHIPPED_ROOT}'"
        text = text.replace(SHIPPED_ROOT, f"root {web};")
    assert len(_ACCESS_LOG.findall(text)) == 1, f"{SITE_CONF}: expected one 'access_log ... pypi_mirror;'"
    text = _ACCESS_LOG.sub(lambda m: f"{m[1]}{access_log}{m[3]}", text)
    listens = _LISTEN.findall(text)
    assert listens, f"{SITE_CONF}: no listen directive"
    first = True

    def one_listen(m: re.Match[str]) -> str:
        nonlocal first
        out = f"    listen 127.0.0.1:{port};\n" if first else ""
        first = False
        return out

    return _LISTEN.sub(one_listen, text)


def _main_conf(prefix: Path, site: Path) -> str:
    lines = [
        "daemon off;",
        f"pid {prefix}/nginx.pid;",
        f"error_log {prefix}/error.log info;",
        "worker_processes 1;",
    ]
    if os.geteuid() == 0:
        # Workers would drop to nobody, who cannot read pytest's 0700 tmp dirs.
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
        lines.append(f"user {user} {group};")
    lines += [
        "events { worker_connections 128; }",
        "http {",
        # Debian builds nginx with absolute temp paths under /var/lib/nginx.
        *(f"    {k}_temp_path {prefix}/tmp-{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
        f"    include {site};",
        "}",
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Nginx:
    url: str
    prefix: Path
    access_log: Path
    proc: subprocess.Popen[bytes]

    @property
    def index(self) -> str:
        """The simple index, as pip's ``--index-url``."""
        return f"{self.url}/simple/"

    def log_mark(self) -> int:
        """Number of access log lines so far: pass to ``entries(since=...)``."""
        return len(self._lines())

    def entries(self, since: int = 0) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self._lines()[since:]]

    def wait_entries(
        self, since: int, done: Callable[[list[dict[str, Any]]], bool], *, timeout: float = 15.0
    ) -> list[dict[str, Any]]:
        """Entries after ``since`` once ``done(entries)`` holds (or the deadline passes).

        nginx logs a request after it has sent the response, so a client can
        be done before its last line is written: poll instead of reading once.
        """
        deadline = time.monotonic() + timeout
        while True:
            entries = self.entries(since)
            if done(entries) or time.monotonic() > deadline:
                return entries
            time.sleep(0.02)

    def _lines(self) -> list[str]:
        try:
            return self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return []

    def error_log(self) -> str:
        try:
            return (self.prefix / "error.log").read_text()[-4000:]
        except FileNotFoundError:
            return ""


@contextmanager
def run_nginx(web: Path | None, prefix: Path, *, site_conf: Path = SITE_CONF,
              rewrite: dict[str, str] | None = None) -> Iterator[Nginx]:
    """nginx serving ``web`` with the shipped site config, on 127.0.0.1.
    ``rewrite``: more exact lines to replace (each must occur once)."""
    binary = nginx_binary()
    assert binary is not None, "nginx not installed"
    prefix.mkdir(parents=True, exist_ok=True)
    access_log = prefix / "access.log"
    shipped = site_conf.read_text()
    for old, new in (rewrite or {}).items():
        assert shipped.count(old) == 1, f"{site_conf}: expected one {old!r}"
        shipped = shipped.replace(old, new)
    for _attempt in range(3):
        port = free_port()
        site = prefix / "site.conf"
        site.write_text(site_for_test(shipped, web=web, port=port, access_log=access_log))
        main = prefix / "nginx.conf"
        main.write_text(_main_conf(prefix, site))
        out = open(prefix / "nginx.out", "wb")
        proc = subprocess.Popen(
            [binary, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(main)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        out.close()
        server = Nginx(f"http://127.0.0.1:{port}", prefix, access_log, proc)
        if wait_listening(port, proc, time.monotonic() + 15):
            break
        stop_process(proc)
        errors = server.error_log() + (prefix / "nginx.out").read_text()
        if "Address already in use" not in errors:
            raise RuntimeError(f"nginx did not start:\n{errors}")
    else:
        raise RuntimeError("nginx: no free port after 3 attempts")
    try:
        yield server
    finally:
        stop_process(proc)
