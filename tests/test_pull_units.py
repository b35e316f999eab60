"""The shipped systemd units for secondaries pass `systemd-analyze verify`."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_pull_units_verify_and_are_hardened(tmp_path: Path) -> None:
    service = (UNITS / "mirror-pull.service").read_text()
    assert "/opt/mirror/venv/bin/mirror pull " in service
    # verify checks that ExecStart exists: point it at this checkout's CLI.
    mirror_bin = Path(sys.executable).with_name("mirror")
    (tmp_path / "mirror-pull.service").write_text(service.replace("/opt/mirror/venv/bin/mirror", str(mirror_bin)))
    shutil.copy(UNITS / "mirror-pull.timer", tmp_path / "mirror-pull.timer")
    r = subprocess.run(
        ["systemd-analyze", "verify", "mirror-pull.service", "mirror-pull.timer"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    r = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "mirror-pull.service"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    m = re.search(r"Overall exposure level for mirror-pull.service: ([0-9.]+)", r.stdout + r.stderr)
    assert m and float(m.group(1)) <= 2.0, r.stdout[-2000:]
