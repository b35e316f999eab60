"""``[mirror] root_interval``: a long cycle republishes the root index with
the projects published so far; the serial and the trace move only when the
cycle completes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from mirror.metrics import Metrics
from mirror.ops.compose import open_mirror
from tests.harness.consistency import check_tree
from tests.harness.e2e import make_config
from tests.harness.fakepypi import FakePyPI


def root_names(web: Path) -> set[str]:
    doc = json.loads((web / "simple" / "index.v1_json").read_bytes())
    return {p["name"] for p in doc["projects"]}


async def test_the_root_grows_during_a_long_cycle(upstream: FakePyPI, tmp_path: Path) -> None:
    for n in range(4):
        upstream.add_release(f"early-{n}", "1.0")
    for n in range(2):
        upstream.add_release(f"late-{n}", "1.0")
    # The late projects' pages take 3 s: the cycle lasts at least that long.
    upstream.add_fault("slow", match="/simple/late-", delay=3.0)
    m = tmp_path / "m"
    web = m / "web"
    cfg = make_config(upstream.url, m, mirror={"root_interval": 0.2, "name": "me"})
    seen: list[tuple[set[str], int, bool]] = []
    async with open_mirror(cfg, metrics=Metrics()) as mirror:
        syncer = mirror.syncer()
        async with trio.open_nursery() as nursery:
            done = trio.Event()

            async def cycle() -> None:
                await syncer.sync_once()
                done.set()

            nursery.start_soon(cycle)
            with trio.fail_after(30):
                while not done.is_set():
                    await trio.sleep(0.05)
                    if (web / "simple" / "index.v1_json").exists() and not done.is_set():
                        # The trace first, then names and serial from one read of the
                        # root: the root is replaced before the trace is written, so a
                        # trace seen here means the root read next is the final one.
                        trace = (web / "trace" / "me").exists()
                        doc = json.loads((web / "simple" / "index.v1_json").read_bytes())
                        names = {p["name"] for p in doc["projects"]}
                        seen.append((names, doc["meta"]["_last-serial"], trace))
                        # Every page the root links is there, at every instant.  (The
                        # three root files are each replaced atomically, one after
                        # another: during a root write they may list different
                        # projects for a moment, all of whose pages are there.)
                        assert [e for e in check_tree(web) if not e.startswith("root HTML and JSON disagree")] == []
        final = mirror.state.synced_serial()
    assert seen, "no root index before the cycle ended"
    early = {f"early-{n}" for n in range(4)}
    mid = [names for names, _, _ in seen if names == early]
    assert mid, f"the root never showed the early projects alone: {seen[:3]}"
    # Mid-cycle: the root's serial is the one up to which everything is out
    # (the late projects' events are not), and no trace is written yet.
    late = min(upstream.project_serial("late-0"), upstream.project_serial("late-1"))
    # (The cycle's own final root may be seen between its rename and the
    # trace's, which come in that order: it lists the late projects.)
    assert all(serial < late and not trace for names, serial, trace in seen if not names >= {"late-0", "late-1"}), seen
    assert root_names(web) == early | {"late-0", "late-1"}
    assert final == upstream.serial and (web / "trace" / "me").exists()


async def test_zero_means_only_at_the_end(upstream: FakePyPI, tmp_path: Path) -> None:
    upstream.add_release("early", "1.0")
    upstream.add_release("late", "1.0")
    upstream.add_fault("slow", match="/simple/late/", delay=1.0)
    m = tmp_path / "m"
    cfg = make_config(upstream.url, m, mirror={"root_interval": 0})
    async with open_mirror(cfg, metrics=Metrics()) as mirror:
        syncer = mirror.syncer()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(syncer.sync_once)
            await trio.sleep(0.6)
            assert not (m / "web" / "simple" / "index.v1_json").exists()
    assert root_names(m / "web") == {"early", "late"}


def test_config(tmp_path: Path) -> None:
    assert make_config("http://127.0.0.1:1", tmp_path / "m").mirror.root_interval == 600
    assert make_config("http://127.0.0.1:1", tmp_path / "m", mirror={"root_interval": "2m"}).mirror.root_interval == 120
    with pytest.raises(Exception, match="root_interval"):
        make_config("http://127.0.0.1:1", tmp_path / "m", mirror={"root_interval": "soon"})


@pytest.mark.slow
def test_a_first_sync_killed_again_and_again_serves_what_it_has(upstream: FakePyPI, tmp_path: Path) -> None:
    """kill -9 of a long first sync, three times, each after more than one
    root_interval: each time the root index exists, links only pages that
    are there, and lists more; the last run completes it."""
    import signal
    import subprocess
    import sys
    import time

    from tests.harness.e2e import write_config

    for n in range(40):
        upstream.add_release(f"long-{n:02d}", "1.0")
    upstream.add_fault("slow", match="/simple/long-", delay=0.5)
    m = tmp_path / "m"
    web = m / "web"
    conf = write_config(tmp_path / "mirror.toml", upstream.url, m, mirror={"workers": 2, "root_interval": 0.5})
    listed: list[int] = [0]
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "mirror", "sync", "--config", str(conf)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Killed as soon as this run's root lists more than the last one did:
        # it was written while the cycle ran, one root_interval in.
        deadline = time.monotonic() + 60
        while not ((web / "simple" / "index.v1_json").exists() and len(root_names(web)) > listed[-1]):
            assert proc.poll() is None, "the sync ended before it was killed"
            assert time.monotonic() < deadline, "no root index within a root_interval"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        # A kill between the three root renames can leave them listing
        # different projects (all present) until the next root write.
        assert [e for e in check_tree(web) if not e.startswith("root HTML and JSON disagree")] == []
        listed.append(len(root_names(web)))
    assert listed[-1] < 40, listed
    r = subprocess.run([sys.executable, "-m", "mirror", "sync", "--config", str(conf)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(root_names(web)) == 40 and check_tree(web) == []
