"""A real forward proxy for tests: tinyproxy on 127.0.0.1 (Debian's package,
installed by ``.ci/run``), optionally with Basic authentication.  It forwards
plain http requests and tunnels https with CONNECT, and logs every request,
which is how a test knows what went through it."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.e2e import start_on_free_port, stop_process


@dataclass
class Proxy:
    url: str  # without credentials
    log: Path

    def requests(self) -> list[str]:
        """"GET http://host:port/path" and "CONNECT host:port" lines seen so far."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return re.findall(r"Request \(file descriptor \d+\): (\S+ \S+)", text)


@contextmanager
def tinyproxy(workdir: Path, *, auth: tuple[str, str] | None = None) -> Iterator[Proxy]:
    binary = shutil.which("tinyproxy")
    if binary is None:
        pytest.skip("tinyproxy is not installed (.ci/run installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "tinyproxy.log"
    out = open(log, "ab")  # with -d and no LogFile, it logs to stdout
    conf = workdir / "tinyproxy.conf"

    def start(port: int) -> subprocess.Popen[bytes]:
        conf.write_text(
            f"Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 64\nAllow 127.0.0.1\n"
            "LogLevel Info\nDisableViaHeader Yes\n"
            + (f"BasicAuth {auth[0]} {auth[1]}\n" if auth else "")
        )
        return subprocess.Popen([binary, "-d", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)

    proc, port = start_on_free_port(start, "tinyproxy")
    try:
        yield Proxy(f"http://127.0.0.1:{port}", log)
    finally:
        stop_process(proc)
        out.close()
