"""Churn: the upstream keeps changing, the primary keeps publishing, and a
secondary pulls through a real rsync daemon over and over.  After every pull
the secondary must be consistent: every link of every page resolves to a file
with the right sha256."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.consistency import check_tree
from tests.e2e import write_config
from tests.fakepypi import FakePyPI
from tests.rsyncd import rsync_daemon

PULLS = 20  # at least this many pulls...
MAX_PULLS = 40
DEADLINE = 75.0  # ...and at most this long for the loop (seconds)
_SUMMARY = re.compile(
    r"pull: (?P<mode>\w+): now at generation (?P<gen>\d+).*?(?P<files>\d+) file\(s\) in stage 1, "
    r"(?P<pages>\d+) page\(s\), (?P<late>\d+) late file\(s\), (?P<deleted>\d+) deleted"
)


class Churn:
    """Random upstream changes of every kind PyPI makes (seeded)."""

    def __init__(self, up: FakePyPI, seed: int) -> None:
        self.up = up
        self.rng = random.Random(seed)
        self.n = 0

    def step(self) -> None:
        up, rng = self.up, self.rng
        self.n += 1
        names = up.project_names()
        kind = rng.choice(["release", "release", "project", "yank", "remove_file", "remove_release", "remove_project"])
        if kind == "project" or len(names) < 4:
            up.add_release(f"Churn_{self.n}", "1.0", provenance=rng.random() < 0.3)
            return
        name = rng.choice(names)
        versions = up.versions(name)
        if kind == "release":
            up.add_release(name, f"{len(versions) + 1}.{self.n}", requires_python=">=3.8")
        elif kind == "yank":
            up.yank(name, rng.choice(versions), "churn")
        elif kind == "remove_file" and up.filenames(name):
            up.remove_file(name, rng.choice(up.filenames(name)))
        elif kind == "remove_release" and len(versions) > 1:
            up.remove_release(name, rng.choice(versions))
        elif kind == "remove_project" and len(names) > 6:
            up.remove_project(name)
        else:
            up.add_release(name, f"{len(versions) + 1}.{self.n}")


class PrimaryLoop:
    """Publishes cycles in a background thread while the upstream churns.

    Each cycle is one `mirror sync` process.  Once `mirror run` (the daemon)
    exists, ``_run`` can start it once with a short ``poll_interval`` and
    keep only the churn in this loop; the test below does not change."""

    def __init__(self, conf: Path, churn: Churn) -> None:
        self.conf = conf
        self.churn = churn
        self.stop_event = threading.Event()
        self.cycles = 0
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, name="primary", daemon=True)

    def cycle(self) -> None:
        r = subprocess.run(
            [sys.executable, "-m", "mirror", "sync", "--config", str(self.conf)],
            capture_output=True, text=True, timeout=120,
        )
        if r.returncode != 0:
            self.errors.append(r.stderr[-2000:])
        self.cycles += 1

    def _run(self) -> None:
        while not self.stop_event.is_set():
            for _ in range(self.churn.rng.randint(1, 3)):
                self.churn.step()
            self.cycle()
            self.stop_event.wait(0.05)

    def __enter__(self) -> PrimaryLoop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join(timeout=150)


@pytest.mark.slow
def test_secondary_stays_consistent_under_churn(upstream: FakePyPI, tmp_path: Path) -> None:
    for i in range(6):
        upstream.add_release(f"pkg-{i}", "1.0", provenance=(i == 0))
    conf = write_config(
        tmp_path / "mirror.toml", upstream.url, tmp_path / "m",
        mirror={"name": "primary", "retire_after": "4s", "workers": 4},
    )
    web = tmp_path / "m" / "web"
    dest = tmp_path / "second"
    churn = Churn(upstream, seed=4)
    loop = PrimaryLoop(conf, churn)
    loop.cycle()  # a first tree to pull
    pulls: list[dict[str, str]] = []
    with rsync_daemon(web, tmp_path / "rsyncd") as source, loop:
        start = time.monotonic()
        while len(pulls) < MAX_PULLS and (len(pulls) < PULLS or time.monotonic() - start < 20):
            assert time.monotonic() - start < DEADLINE, f"only {len(pulls)} pulls in {DEADLINE}s"
            r = subprocess.run(
                [sys.executable, "-m", "mirror", "pull", source, str(dest), "--name", "second"],
                capture_output=True, text=True, timeout=60,
            )
            assert r.returncode == 0, r.stderr[-3000:]
            problems = check_tree(dest)
            assert problems == [], f"pull {len(pulls) + 1} left an inconsistent tree: {problems[:5]}"
            m = _SUMMARY.search(r.stderr)
            pulls.append(m.groupdict() if m else {"mode": "up-to-date"})
    assert loop.errors == [], loop.errors[0]
    lists = [p for p in pulls if p["mode"] == "lists"]
    assert loop.cycles >= 10 and len(lists) >= 10, (loop.cycles, pulls)
    assert sum(int(p["files"]) for p in lists) > 0
    assert sum(int(p["deleted"]) for p in lists) > 0, "no retirement or removal reached the secondary"
    # Quiet again: one more cycle and pull make the secondary an exact copy.
    loop.cycle()
    with rsync_daemon(web, tmp_path / "rsyncd2") as source:
        subprocess.run([sys.executable, "-m", "mirror", "pull", source, str(dest), "--name", "second"],
                       check=True, capture_output=True, timeout=60)
    assert check_tree(dest) == []

    def served(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*")
            if p.is_file() and not p.relative_to(root).as_posix().startswith((".~pull~/", "trace/"))
        }

    assert served(dest) == served(web)
