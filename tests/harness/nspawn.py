"""A Debian system booted under ``systemd-nspawn``, for the unit tests that
need a real systemd as PID 1.

``base_rootfs`` debootstraps a minimal Debian (``minbase`` plus systemd,
Python, rsync and passwd: no procps, so no ``/bin/kill``) once and caches it
under ``$MIRROR_TEST_CACHE`` (default ``~/.cache/mirror-tests``).  Each test
run copies it, installs the project from wheels built from this checkout
(``pip wheel``; the container gets no package index), and boots the copy with
``systemd-nspawn -b --register=no --keep-unit`` on the host's network, so the
container reaches servers the test started on 127.0.0.1.

Nothing here needs a bus, machined or a systemd on the host.
``unavailable()`` says why the tests cannot run (not root, no nspawn, no
debootstrap); a debootstrap that fails (no network to the Debian archive)
skips too, unless ``MIRROR_REQUIRE_SYSTEMD=1`` (set by ``.ci/run``) turns
every skip into a failure.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
SUITE = "trixie"  # systemd 257: has Type=notify-reload
ARCHIVE = "http://deb.debian.org/debian"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "passwd", "rsync")
NSPAWN = ("systemd-nspawn", "--quiet", "--register=no", "--keep-unit")


def required() -> bool:
    return os.environ.get("MIRROR_REQUIRE_SYSTEMD") == "1"


def skip(why: str) -> None:
    if required():
        pytest.fail(f"MIRROR_REQUIRE_SYSTEMD=1 but: {why}")
    pytest.skip(why)


def unavailable() -> str | None:
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    for tool in ("systemd-nspawn", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (.ci/run installs systemd-container and debootstrap)"
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("MIRROR_TEST_CACHE") or Path.home() / ".cache" / "mirror-tests")


def base_rootfs(timeout: float = 600) -> Path:
    """The cached minimal Debian, built on first use (about a minute)."""
    key = hashlib.sha256(f"{SUITE} {ARCHIVE} {' '.join(PACKAGES)}".encode()).hexdigest()[:12]
    final = cache_dir() / f"debian-{SUITE}-{key}"
    if (final / "usr" / "lib" / "systemd" / "systemd").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".debian-{SUITE}-", dir=final.parent))
    try:
        r = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(work / "root"), ARCHIVE],
            capture_output=True, text=True, timeout=timeout,
        )
        if r.returncode != 0:
            skip(f"debootstrap {SUITE} failed (no route to {ARCHIVE}?): {(r.stdout + r.stderr)[-800:]}")
        shutil.rmtree(final, ignore_errors=True)
        (work / "root").rename(final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def build_wheels(dest: Path) -> Path:
    """This checkout and its dependencies as wheels (all pure Python)."""
    dest.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return dest


def copy_rootfs(base: Path, dest: Path) -> Path:
    r = subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(dest)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return dest


def probe(root: Path) -> None:
    """Skip (or fail, under MIRROR_REQUIRE_SYSTEMD=1) when nspawn cannot start
    a container here at all (no namespaces, a sandbox that forbids them)."""
    r = subprocess.run([*NSPAWN, "--directory", str(root), "--pipe", "/bin/true"], capture_output=True, text=True,
                       timeout=120)
    if r.returncode != 0:
        skip(f"systemd-nspawn cannot start a container here: {(r.stdout + r.stderr).strip()[-500:]}")


def run_in(root: Path, script: str, *, binds: dict[Path, str] | None = None, timeout: float = 300) -> str:
    """Run ``script`` with /bin/sh in the container, not booted."""
    args = [*NSPAWN, "--directory", str(root), "--pipe"]
    args += [f"--bind-ro={host}:{inside}" for host, inside in (binds or {}).items()]
    r = subprocess.run([*args, "/bin/sh", "-ec", script], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"in the container: {script}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def boot(root: Path, *, binds: dict[Path, str], ro_binds: dict[Path, str] | None = None,
         timeout: float) -> subprocess.CompletedProcess[str]:
    """Boot the container until it powers itself off (or ``timeout``)."""
    args = [*NSPAWN, "--directory", str(root), "--boot", "--console=pipe"]
    args += [f"--bind={host}:{inside}" for host, inside in binds.items()]
    args += [f"--bind-ro={host}:{inside}" for host, inside in (ro_binds or {}).items()]
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
