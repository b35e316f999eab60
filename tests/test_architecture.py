"""The package layout is a contract: import-linter checks it (pyproject's
``[tool.importlinter]``), here and so in CI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def lint_available() -> None:
    if not LINT.exists():
        pytest.fail(f"{LINT} is missing: install the test extra (pip install -e '.[test]')")


def test_the_import_contracts_hold(lint_available: None) -> None:
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 kept, 0 broken" in r.stdout


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        # fetch must never reach into publish (it hands out temp files only)
        ("mirror/fetch/attempt.py", "from mirror.publish import tree", "mirror.fetch is not allowed to import mirror.publish"),
        # nothing below ops imports ops
        ("mirror/sync/cycle.py", "from mirror.ops import status", "mirror.sync is not allowed to import mirror.ops"),
        # the planner does no I/O
        ("mirror/plan/valve.py", "import os", "mirror.plan is not allowed to import os"),
        ("mirror/publish/render.py", "import trio", "mirror.publish.render is not allowed to import trio"),
    ],
)
def test_a_violation_breaks_the_contract(lint_available: None, tmp_path: Path, module: str, line: str,
                                         broken: str) -> None:
    shutil.copytree(ROOT / "mirror", tmp_path / "mirror")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / module, "a") as f:
        f.write(f"\n{line}\n")
    r = _lint(tmp_path)
    assert r.returncode != 0
    assert broken in r.stdout, r.stdout
