"""Download helper processes (``[mirror] download_processes``).

A helper fetches a batch of files exactly as the in-process downloader
would, and never writes anything but temp files; the parent commits.  These tests run
real helper processes against the loopback fake upstream.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from bench.driver import child_pids
from mirror import cli
from mirror.config import UpstreamConfig, default_download_processes
from mirror.fetch.attempt import FileJob, Outcome, Verified
from mirror.fetch.downloader import Downloader
from mirror.errors import ProjectNotFound, StalePage, DownloadError
from mirror.fetch.pool import FetchPool, NoWorker, prefer_here
from mirror.metrics import Metrics
from mirror.sync.cycle import POOL_MIN_PROJECTS, Syncer
from mirror.publish.tree import FileTree, Tree
from mirror.upstream.client import Upstream
from mirror.upstream.transport import open_client, open_files
from mirror.layout import Layout
from mirror.model import NormalizedName
from tests.harness.e2e import make_config, write_config
from tests.harness.fakepypi import FakePyPI, populate
from tests.harness.reliability import foreign_files, mirror_problems, upstream_files


def _upcfg(url: str, **kw: object) -> UpstreamConfig:
    return UpstreamConfig(url=url, allow_http=True, user_agent="mirror-tests (tests@example.org)", **kw)  # type: ignore[arg-type]


def _one_file(up: FakePyPI) -> tuple[str, bytes, str]:
    """URL, bytes and sha256 of a new wheel upstream."""
    up.add_release("alpha", "1.0")
    [(rel, data)] = [(r, b) for r, b in upstream_files(up).items() if r.endswith(".whl")][:1]
    return f"{up.files_url}/{rel}", data, hashlib.sha256(data).hexdigest()


async def _fetch(pool: FetchPool, url: str, *, sha256: str, size: int) -> Verified:
    """One file through a helper: its verified temp, or its error raised."""
    [outcome] = await pool.fetch_batch([FileJob(url, "packages/x", sha256, size, None)])
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _tree(directory: Path) -> Tree:
    tree = FileTree.at(Layout(directory))
    tree.prepare()
    return tree


def _temps(directory: Path) -> list[str]:
    return sorted(os.listdir(directory / "state" / "tmp"))


async def test_a_helper_returns_a_verified_fsynced_temp(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    with FakePyPI(seed=1) as up:
        url, data, sha = _one_file(up)
        metrics = Metrics()
        async with FetchPool.open(_upcfg(up.url, retries=0), Layout(tmp_path), processes=2, workers=4,
                                  metrics=metrics) as pool:
            v = await _fetch(pool, url, sha256=sha, size=len(data))
            assert (v.size, v.sha256) == (len(data), sha)
            assert v.tmp.parent == tree.tmp and v.tmp.read_bytes() == data
            v.tmp.unlink()
            # A wrong promise is the same error the in-process path raises,
            # and leaves no temp behind.
            with pytest.raises(DownloadError) as e:
                await _fetch(pool, url, sha256="0" * 64, size=len(data))
            assert e.value.reason == "hash_mismatch"
            with pytest.raises(DownloadError) as e:
                await _fetch(pool, url, sha256=sha, size=len(data) - 1)
            assert e.value.reason == "size_mismatch"
            with pytest.raises(DownloadError) as e:
                await _fetch(pool, f"{up.url}/packages/no/such.whl", sha256=sha, size=1)
            assert (e.value.reason, e.value.detail) == ("http_status", "HTTP 404")
            # One batch: every outcome in order, each file counted at home.
            outcomes = await pool.fetch_batch([FileJob(url, "a", sha, len(data), None),
                                               FileJob(url, "b", "0" * 64, len(data), None),
                                               FileJob(url, "c", sha, len(data), None)])
            assert [type(o).__name__ for o in outcomes] == ["Verified", "HashMismatch",
                                                            "Verified"]
            for o in outcomes:
                if isinstance(o, Verified):
                    assert o.tmp.read_bytes() == data
                    o.tmp.unlink()
            assert metrics.registry.get_sample_value("mirror_files_downloaded_total") == 3
            assert metrics.registry.get_sample_value("mirror_download_errors_total", {"reason": "hash_mismatch"}) == 2
            assert metrics.registry.get_sample_value("mirror_upstream_requests_total", {"kind": "file"}) == 7
            pids = [h.proc.pid for h in pool.helpers]
        assert _temps(tmp_path) == []
        # Closing the pool ends every helper.
        assert all(h.proc.returncode == 0 for h in pool.helpers), [h.proc.returncode for h in pool.helpers]
        assert len(set(pids)) == 2


async def test_a_helper_fetches_and_parses_pages_and_counts_them_at_home(tmp_path: Path) -> None:
    """Pages fetched in a helper are the pages the main process would get,
    errors keep their type and fields, and the counts reach the parent."""
    _tree(tmp_path)
    metrics = Metrics()

    def count(name: str, **labels: str) -> float:
        return metrics.registry.get_sample_value(name, labels) or 0

    with FakePyPI(seed=1) as up:
        up.add_release("alpha", "1.0")
        cfg = _upcfg(up.url, retries=1, backoff=0.01, stale_retries=1)
        async with FetchPool.open(cfg, Layout(tmp_path), processes=1, workers=4, metrics=metrics) as pool, \
                open_client(cfg, workers=4, version="t") as client:
            here = await Upstream(client, cfg, metrics=Metrics()).project_page(NormalizedName("alpha"), min_serial=0)
            there = await pool.page("alpha", min_serial=0)
            assert there == here and there.files
            assert pool.helpers[0].cpu > 0  # what it has used so far came with the answer
            assert count("mirror_upstream_requests_total", kind="page") == 1
            with pytest.raises(ProjectNotFound):
                await pool.page("no-such-project", min_serial=0)
            up.add_fault("stale", match="/simple/alpha/")
            up.add_release("alpha", "2.0")
            with pytest.raises(StalePage) as e:
                await pool.page("alpha", min_serial=up.serial)
            assert (e.value.name, e.value.expected) == ("alpha", up.serial)
            assert count("mirror_stale_pages_total") == 2
            assert count("mirror_upstream_requests_total", kind="page") == 4  # 1 + 1 + 2 (one stale retry)


async def test_a_cancelled_attempt_leaves_no_temp(tmp_path: Path) -> None:
    _tree(tmp_path)
    with FakePyPI(seed=1) as up:
        url, data, sha = _one_file(up)
        up.add_fault("slow", match="/packages/", delay=2.0)
        async with FetchPool.open(_upcfg(up.url), Layout(tmp_path), processes=1, workers=4, metrics=Metrics()) as pool:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    await trio.sleep(0.2)
                    assert pool.busy()  # what the daemon's stop asks: a batch is in a helper

                nursery.start_soon(watch)
                with trio.move_on_after(0.5) as scope:
                    await _fetch(pool, url, sha256=sha, size=len(data))
            assert scope.cancelled_caught
            assert not pool.busy()
            # The helper dropped that download and still serves the next one.
            up.clear_faults()
            (await _fetch(pool, url, sha256=sha, size=len(data))).tmp.unlink()
        assert _temps(tmp_path) == []


async def test_a_dead_helper_means_downloading_in_process(tmp_path: Path) -> None:
    tree = _tree(tmp_path)
    with FakePyPI(seed=1) as up:
        url, data, sha = _one_file(up)
        up.add_fault("slow", match="/packages/", delay=1.0)
        cfg = _upcfg(up.url, retries=0)
        async with FetchPool.open(cfg, Layout(tmp_path), processes=1, workers=2, metrics=Metrics()) as pool:
            files = open_files(cfg, workers=2, version="t")
            dl = Downloader(files, tree.tmp, cfg=cfg, metrics=Metrics(), limiter=trio.CapacityLimiter(2))
            dl.pool = pool
            async with trio.open_nursery() as nursery:

                async def kill_soon() -> None:
                    await trio.sleep(0.3)
                    pool.helpers[0].proc.send_signal(signal.SIGKILL)

                nursery.start_soon(kill_soon)
                # In flight in the helper when it dies: done again in-process.
                [v] = await dl.fetch_batch([FileJob(url, "packages/x", sha, len(data), None)])
            assert isinstance(v, Verified) and v.tmp.read_bytes() == data
            v.tmp.unlink()
            assert not pool.helpers[0].alive
            with pytest.raises(NoWorker):
                await _fetch(pool, url, sha256=sha, size=len(data))
            await files.aclose()
        assert _temps(tmp_path) == []


@pytest.mark.parametrize("kind", ["status", "truncate", "corrupt", "reset"])
async def test_faults_through_helpers_end_in_a_complete_mirror(kind: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Syncer, "pool_min_projects", 1)
    served = 0
    fetch_batch = FetchPool.fetch_batch

    async def counted(self: FetchPool, jobs: list[FileJob]) -> list[Outcome]:
        nonlocal served
        result = await fetch_batch(self, jobs)
        served += sum(isinstance(o, Verified) for o in result)
        return result

    monkeypatch.setattr(FetchPool, "fetch_batch", counted)
    with FakePyPI(seed=3) as up:
        populate(up, 8, seed=3)
        expected = upstream_files(up)
        up.add_fault(kind, match="/packages/", rate=0.5, **({"status": 503} if kind == "status" else {}))
        cfg = make_config(up.url, tmp_path / "m", upstream={"retries": 3},
                          mirror={"workers": 4, "download_processes": 2})
        metrics = Metrics()
        web = cfg.mirror.directory / "web"
        downloaded = 0
        for _ in range(8):
            report = await cli.run_sync(cfg, metrics=metrics)
            downloaded += report.files_downloaded
            assert foreign_files(web, expected) == []
            if not report.failed:
                break
        assert not report.failed
        assert sum(f.fired for f in up._faults) >= 3
        assert mirror_problems(web, up) == []
        assert _temps(cfg.mirror.directory) == []
        reason = {"status": "http_status", "truncate": "truncated", "corrupt": "hash_mismatch", "reset": "connection"}[kind]
        # Errors seen in the helpers are counted by the parent.
        assert (metrics.registry.get_sample_value("mirror_download_errors_total", {"reason": reason}) or 0) > 0
        assert metrics.registry.get_sample_value("mirror_files_downloaded_total") == downloaded > 0
        assert served == downloaded  # every file came through a helper
        # and every answered request of theirs is counted at home
        requests = metrics.registry.get_sample_value("mirror_upstream_requests_total", {"kind": "file"}) or 0
        assert requests >= downloaded


def test_pages_go_where_less_cpu_has_gone() -> None:
    assert prefer_here(5.0, []) is True  # no helper left
    assert prefer_here(1.0, [2.0, 0.5]) is True  # at or below the helpers' average
    assert prefer_here(1.25, [2.0, 0.5]) is True
    assert prefer_here(1.3, [2.0, 0.5]) is False


def test_default_leaves_one_cpu_to_the_main_process() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert default_download_processes() == max(0, min(4, cpus - 1))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_kill_9_of_the_parent_ends_its_helpers_and_loses_nothing(tmp_path: Path) -> None:
    with FakePyPI(seed=5) as up:
        populate(up, POOL_MIN_PROJECTS + 60, seed=5)
        expected = upstream_files(up)
        up.add_fault("slow", match="/packages/", delay=0.05)
        directory = tmp_path / "m"
        conf = write_config(tmp_path / "mirror.toml", up.url, directory,
                            mirror={"workers": 8, "download_processes": 2})
        cmd = [sys.executable, "-m", "mirror", "--log-level", "info", "sync", "--config", str(conf)]
        log = open(tmp_path / "run.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, cwd=Path(__file__).parent.parent)
        try:
            deadline = time.monotonic() + 60
            # Wait until helpers run and files are on their way.
            while time.monotonic() < deadline and not (
                len(child_pids(proc.pid)) == 2 and sum(1 for r in up.requests if r[1].startswith("/packages/")) > 20
            ):
                assert proc.poll() is None, (tmp_path / "run.log").read_text()[-2000:]
                time.sleep(0.02)
            helpers = child_pids(proc.pid)
            assert len(helpers) == 2
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            deadline = time.monotonic() + 10
            while any(_alive(h) for h in helpers) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not any(_alive(h) for h in helpers), "helpers outlived their parent"
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        assert foreign_files(directory / "web", expected) == []
        up.clear_faults()
        final = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=Path(__file__).parent.parent)
        assert final.returncode == 0, final.stderr[-3000:]
        assert "helper process" in final.stderr
        assert mirror_problems(directory / "web", up) == []
        assert _temps(directory) == []


async def test_a_temp_path_outside_state_tmp_is_never_taken_from_a_helper(tmp_path: Path) -> None:
    _tree(tmp_path)
    victim = tmp_path / "keep.part"
    victim.write_bytes(b"x")
    with FakePyPI(seed=1) as up:
        async with FetchPool.open(_upcfg(up.url), Layout(tmp_path), processes=1, workers=4, metrics=Metrics()) as pool:
            for frame in [("files", 10**9, [("ok", str(victim), 1, "0" * 64)], {}, 1.0),
                          ("files", 10**9, [("ok", "/etc/passwd", 1, "0" * 64)], {}, 1.0)]:
                with pytest.raises(ValueError):
                    pool._answer(pool.helpers[0], frame)
    assert victim.read_bytes() == b"x"


async def test_helpers_that_cannot_start_leave_the_downloads_in_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(Syncer, "pool_min_projects", 1)

    async def no_processes(*a: object, **kw: object) -> None:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(trio.lowlevel, "open_process", no_processes)
    with FakePyPI(seed=4) as up:
        populate(up, 3, seed=4)
        cfg = make_config(up.url, tmp_path / "m", mirror={"download_processes": 2})
        report = await cli.run_sync(cfg, metrics=Metrics())
        assert not report.failed and report.files_downloaded > 0
        assert mirror_problems(cfg.mirror.directory / "web", up) == []
    assert "could not start a download process" in caplog.text
