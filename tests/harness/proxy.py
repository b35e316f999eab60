"""A real forward proxy for tests: tinyproxy on 127.0.0.1 (Debian's package,
installed by ``.ci/run``), optionally with Basic authentication.  It forwards
plain http requests and tunnels https with CONNECT, and logs every request,
which is how a test knows what went through it."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.e2e import free_port, stop_process, wait_listening


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
    for _ in range(5):
        port = free_port()
        conf = workdir / "tinyproxy.conf"
        conf.write_text(
            f"Port {port}\nListen 127.0.0.1\nTimeout 30\nMaxClients 64\nAllow 127.0.0.1\n"
            "LogLevel Info\nDisableViaHeader Yes\n"
            + (f"BasicAuth {auth[0]} {auth[1]}\n" if auth else "")
        )
        proc = subprocess.Popen([binary, "-d", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
        if wait_listening(port, proc, time.monotonic() + 10):
            break
        proc.kill()
        proc.wait(timeout=5)
    else:
        raise RuntimeError("tinyproxy did not start")
    try:
        yield Proxy(f"http://127.0.0.1:{port}", log)
    finally:
        stop_process(proc)
        out.close()
