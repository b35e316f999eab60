"""A real ``rsync --daemon`` on 127.0.0.1 for tests, configured from the shipped
``conf/rsyncd.conf`` (only what needs root, and the module path, are changed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.harness.e2e import start_on_free_port, stop_process

SHIPPED = Path(__file__).resolve().parent.parent.parent / "conf" / "rsyncd.conf"


def daemon_config(web: Path, workdir: Path) -> str:
    """The shipped config with the module pointing at ``web`` and no root-only options."""
    text = SHIPPED.read_text()
    text = re.sub(r"(?m)^(uid|gid) = .*\n", "", text)
    text = re.sub(r"(?m)^use chroot = .*$", "use chroot = no", text)
    text = re.sub(r"(?m)^pid file = .*$", f"pid file = {workdir / 'rsyncd.pid'}", text)
    text = re.sub(r"(?m)^log file = .*$", f"log file = {workdir / 'rsyncd.log'}", text)
    text, n = re.subn(r"(?m)^(\s*)path = .*$", rf"\g<1>path = {web}", text)
    assert n == 1, "conf/rsyncd.conf must define exactly one module path"
    return text


@contextmanager
def rsync_daemon(web: Path, workdir: Path) -> Iterator[str]:
    """Serve ``web`` as module ``pypi``; yields ``rsync://127.0.0.1:PORT/pypi/``."""
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (.ci/run installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "rsyncd.conf"
    conf.write_text(daemon_config(web, workdir))
    proc, port = start_on_free_port(lambda port: subprocess.Popen(
        ["rsync", "--daemon", "--no-detach", f"--config={conf}", f"--port={port}", "--address=127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    ), "rsync --daemon")
    try:
        yield f"rsync://127.0.0.1:{port}/pypi/"
    finally:
        stop_process(proc)
        if proc.stderr is not None:
            proc.stderr.close()
