"""kill -9 at random instants of a real `mirror sync` process.

After every kill the tree as published at that instant must be consistent
(every link resolves to the promised bytes), hold no byte that is not a
complete upstream file, and the state database must open and pass SQLite's
integrity check.  A final run completes the mirror.  A file that was in the
tree when a run was killed is never downloaded again, and the bytes fetched
twice are bounded by what was in flight at each kill.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from mirror.layout import Layout
from mirror.publish.state import State
from tests.harness.e2e import write_config
from tests.harness.fakepypi import FakePyPI, populate
from tests.harness.reliability import check_published, foreign_files, mirror_problems, tree_files, upstream_files

KILLS = 24
WORKERS = 8
SEED = 20260606


def _spawn(conf: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "mirror", "--log-level", "warning", "sync", "--config", str(conf)],
            stdout=out, stderr=out, cwd=Path(__file__).parent.parent,
        )


def _file_requests(up: FakePyPI, start: int) -> list[tuple[str, int]]:
    with up._lock:
        recs = up.requests[start:]
    return [(r[1].lstrip("/"), r[3]) for r in recs if r[0] == "GET" and r[1].startswith("/packages/") and r[2] == 200]


@pytest.mark.slow
def test_kill_9_at_random_instants_loses_nothing(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    with FakePyPI(seed=SEED) as up:
        populate(up, 150, seed=SEED, blob_size=20_000)
        expected = upstream_files(up)
        max_size = max(len(b) for b in expected.values())
        # Every file answers after a short pause, so a run lasts a few
        # seconds and a kill lands in the middle of real work.
        up.add_fault("slow", match="/packages/", delay=0.03)
        up.add_fault("slow", match="/simple/", delay=0.01)
        directory = tmp_path / "m"
        conf = write_config(tmp_path / "mirror.toml", up.url, directory, mirror={"workers": WORKERS})
        web = directory / "web"
        log = tmp_path / "runs.log"

        committed: set[str] = set()  # in the tree when some run was killed
        again: list[str] = []  # ... and requested by a later run
        leftovers = 0
        kills = 0
        while kills < KILLS:
            start = len(up.requests)
            proc = _spawn(conf, log)
            if rng.random() < 0.2:
                # Somewhere in start-up, opening the state or reading the feed.
                time.sleep(rng.uniform(0.0, 0.6))
            else:
                # After a random amount of real progress, then a little more.
                target = start + rng.randint(1, 60)
                deadline = time.monotonic() + 20
                while len(up.requests) < target and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.05))
            if proc.poll() is not None:
                break  # finished before we could kill it: the mirror is complete
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(10) == -signal.SIGKILL
            kills += 1
            again += [rel for rel, _ in _file_requests(up, start) if rel in committed]
            # The tree as a client sees it right now.
            assert check_published(web) == [], f"after kill {kills}"
            assert foreign_files(web, expected) == [], f"after kill {kills}"
            committed |= set(tree_files(web))
            leftovers += len(os.listdir(directory / "state" / "tmp")) if (directory / "state" / "tmp").exists() else 0
            if (directory / "state" / "mirror.sqlite3").exists():
                db = sqlite3.connect(directory / "state" / "mirror.sqlite3")
                assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
                db.close()
        assert kills >= 20, f"only {kills} kills before the mirror completed"

        start = len(up.requests)
        up.clear_faults()
        final = subprocess.run(
            [sys.executable, "-m", "mirror", "sync", "--config", str(conf)],
            capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
        )
        assert final.returncode == 0, final.stderr[-3000:]
        again += [rel for rel, _ in _file_requests(up, start) if rel in committed]
        assert again == [], f"re-downloaded files that were already in the tree: {again[:5]}"
        assert mirror_problems(web, up) == []
        assert os.listdir(directory / "state" / "tmp") == []
        state = State.open(Layout(directory).db)
        assert state.todo_count() == 0 and state.synced_serial() == up.serial
        assert state.tree_totals() == (len(expected) + _provenance_count(web), _tree_bytes(web))
        state.close()

        fetched = Counter[str]()
        nbytes = Counter[str]()
        for rel, n in _file_requests(up, 0):
            fetched[rel] += 1
            nbytes[rel] += n
        redownloaded = sum(nbytes[rel] - nbytes[rel] // fetched[rel] for rel in fetched)
        bound = kills * WORKERS * max_size
        print(f"\nkills={kills} leftover temps cleaned={leftovers} files={len(expected)} "
              f"re-downloaded={redownloaded} bytes ({sum(fetched.values()) - len(fetched)} requests) bound={bound}")
        assert redownloaded <= bound


def _provenance_count(web: Path) -> int:
    return sum(1 for rel in tree_files(web) if rel.endswith(".provenance"))


def _tree_bytes(web: Path) -> int:
    return sum(p.stat().st_size for p in tree_files(web).values())


_DIE_AFTER = """
import os, sys
from pathlib import Path
from mirror.publish.state import State
state = State.open(Path(sys.argv[1]) / "mirror.sqlite3")
def trace(sql):
    if sys.argv[2] in sql:
        os._exit(9)  # as if killed -9 when this statement starts: the ones before it ran
state.db.set_trace_callback(trace)
state.record_file("packages/aa/f.whl", 10, "0" * 64)
"""


@pytest.mark.parametrize("statement", ["INSERT INTO files", "DELETE FROM retire"])
def test_a_state_update_dies_whole_or_not_at_all(statement: str, tmp_path: Path) -> None:
    """Each State method is one transaction, even when the process dies
    between two of its statements."""
    r = subprocess.run([sys.executable, "-c", _DIE_AFTER, str(tmp_path), statement],
                       cwd=Path(__file__).parent.parent, timeout=60)
    assert r.returncode == 9
    state = State.open(tmp_path / "mirror.sqlite3")
    rows = state.db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files").fetchone()
    assert state.tree_totals() == tuple(rows) == (0, 0)
    state.record_file("packages/aa/f.whl", 10, "0" * 64)
    assert state.tree_totals() == (1, 10)
    state.close()
