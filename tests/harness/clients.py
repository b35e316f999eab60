"""Real installers (pip, uv) run against a mirror, isolated from this machine.

The machines here carry pip configuration and local wheel folders
(``PIP_FIND_LINKS``, ``extra-index-url`` in pip.conf) that would let an
install succeed without the mirror; uv reads its own ``uv.toml`` and
``UV_*`` variables.  Every run gets an environment that names only the
mirror.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.harness.e2e import clean_pip_env

# Proxies would send 127.0.0.1 traffic elsewhere; an active venv or a
# PYTHONPATH would change what gets installed where.
_DROP = {"VIRTUAL_ENV", "CONDA_PREFIX", "PYTHONPATH", "PYTHONHOME"}
_PROXIES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def _without_proxies(env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in env.items() if k.lower() not in _PROXIES and k not in _DROP}
    env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


def pip_env() -> dict[str, str]:
    return _without_proxies(clean_pip_env())


def uv_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UV_", "PIP_"))}
    env["UV_NO_CONFIG"] = "1"  # no uv.toml / pyproject [tool.uv] from anywhere
    env["UV_CACHE_DIR"] = str(cache)
    env["UV_PYTHON_DOWNLOADS"] = "never"
    return _without_proxies(env)


def uv_binary() -> str:
    import uv  # the `uv` package from the test extra ships the binary

    return str(uv.find_uv_bin())


def make_venv(path: Path, *, with_pip: bool = True) -> Path:
    args = [sys.executable, "-m", "venv", str(path)]
    if not with_pip:
        args.append("--without-pip")
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    return path


def run(args: list[str], env: dict[str, str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, env=env, cwd=cwd, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL
    )
