"""`mirror run`: the daemon in-process (gauges, reload, exporter) and as a real process
(sd_notify, polling, SIGHUP, SIGTERM, the lock, a forced second-signal exit)."""

from __future__ import annotations


import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import trio

from mirror import cli
from mirror.config import load_config
from mirror.ops import daemon as daemon_module
from mirror.ops.daemon import Daemon, config_changes
from mirror.errors import DiskError
from mirror.metrics import Metrics
from mirror.ops.sdnotify import Notifier
from mirror.publish.state import State
from mirror.publish.tree import FileTree
from mirror.layout import Layout
from tests.harness.consistency import check_tree
from tests.harness.daemonproc import DaemonProcess, NotifySocket, sample, scrape, wait_until
from tests.harness.e2e import make_config, write_config
from tests.harness.fakepypi import FakePyPI


def populate(up: FakePyPI, n: int) -> None:
    for i in range(n):
        up.add_release(f"pkg-{i}", "1.0")


def page_files(web: Path, name: str) -> set[str]:
    try:
        doc = json.loads((web / "simple" / name / "index.v1_json").read_bytes())
    except FileNotFoundError:
        return set()
    return {f["filename"] for f in doc["files"]}


def files_in_tree(web: Path) -> int:
    return sum(1 for p in (web / "packages").rglob("*") if p.is_file())


async def get_metrics(address: str) -> str:
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://{address}/metrics")
        r.raise_for_status()
        return r.text


async def wait_for(pred: object, what: str, timeout: float = 20) -> None:
    assert callable(pred)
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(0.02)


# -- in-process ----------------------------------------------------------------


async def test_gauges_come_from_the_state_before_the_first_cycle(upstream: FakePyPI, tmp_path: Path) -> None:
    populate(upstream, 3)
    cfg = make_config(upstream.url, tmp_path / "m", daemon={"stop_timeout": 0.5},
                      metrics={"listen": "127.0.0.1:0"})
    await cli.run_sync(cfg, metrics=Metrics())
    # A second run leaves pkg-1 deferred: the state holds lag and a failure.
    upstream.add_release("pkg-1", "2.0")
    upstream.add_fault("status", match="/simple/pkg-1/", status=503)
    await cli.run_sync(cfg, metrics=Metrics())
    state = State.open(Layout(cfg.mirror.directory).db)
    files, nbytes = state.tree_totals()
    synced, serial = state.synced_serial(), state.serial
    state.close()
    assert serial > synced and files > 0
    # The daemon's first cycle hangs on the feed: what /metrics shows comes
    # from the state DB alone.
    upstream.add_fault("slow", match="/pypi", delay=30)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.settimeout(5)
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "notify")})
    metrics = Metrics()
    daemon = Daemon(cfg, config_path=None, metrics=metrics, notifier=notifier, handle_signals=False)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(daemon.run)
            ready = listener.recv(4096).decode()
            assert ready.startswith("READY=1\nSTATUS=starting")
            assert f"serial {synced}, lag {serial - synced}, 1 pending, 1 failed" in ready
            assert daemon.metrics_address is not None
            text = await get_metrics(daemon.metrics_address)
            assert sample(text, "mirror_synced_serial") == synced
            assert sample(text, "mirror_upstream_serial") == serial
            assert sample(text, "mirror_serial_lag") == serial - synced
            assert sample(text, "mirror_projects_pending") == 1
            assert sample(text, "mirror_projects_failed") == 1
            assert sample(text, "mirror_projects") == 3
            assert sample(text, "mirror_tree_files") == files
            assert sample(text, "mirror_tree_bytes") == nbytes
            assert sample(text, "mirror_files_pending_retirement") == 0
            assert sample(text, "mirror_last_success_timestamp_seconds") > 0  # type: ignore[operator]
            assert sample(text, "mirror_up") == 1
            assert sample(text, "mirror_info", version="0.1.0") == 1
            assert sample(text, "process_resident_memory_bytes") > 0  # type: ignore[operator]
            assert daemon.scheduler.in_cycle
            t0 = trio.current_time()
            daemon.request_stop("test")
        # The hung feed request was cut off at stop_timeout.
        assert trio.current_time() - t0 < 5
        rest = []
        while not rest or not rest[-1].startswith("STOPPING=1"):
            rest.append(listener.recv(4096).decode())
        assert rest[0].startswith("STATUS=syncing")
    finally:
        listener.close()
        notifier.close()
    assert metrics.registry.get_sample_value("mirror_up") == 0


async def test_progress_is_visible_while_a_cycle_runs(upstream: FakePyPI, tmp_path: Path) -> None:
    populate(upstream, 6)
    upstream.add_fault("slow", match="/simple/pkg-5/", delay=30)
    cfg = make_config(upstream.url, tmp_path / "m", metrics={"listen": "127.0.0.1:0"})
    daemon = Daemon(cfg, config_path=None, metrics=Metrics(), handle_signals=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        assert daemon.metrics_address is not None
        address = daemon.metrics_address

        async def pending() -> float | None:
            return sample(await get_metrics(address), "mirror_projects_pending")

        with trio.fail_after(20):
            while await pending() != 1:
                await trio.sleep(0.05)
        assert daemon.scheduler.in_cycle, "five of six done, the cycle still running"
        t0 = trio.current_time()
        daemon.request_stop("test")
    # Only a page fetch was in flight, no download: the stop did not wait.
    assert trio.current_time() - t0 < 2


async def test_reload_applies_a_good_config_and_keeps_the_old_one_otherwise(
    upstream: FakePyPI, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    populate(upstream, 1)
    m = tmp_path / "m"
    conf = write_config(tmp_path / "mirror.toml", upstream.url, m,
                        daemon={"poll_interval": 3600}, metrics={"listen": ""})
    metrics = Metrics()
    daemon = Daemon(load_config(conf), config_path=conf, metrics=metrics, handle_signals=False)

    def reloads(outcome: str) -> float:
        return metrics.registry.get_sample_value("mirror_config_reloads_total", {"outcome": outcome}) or 0

    async def reload_with(expect: str, count: int, **sections: dict[str, object]) -> None:
        write_config(conf, upstream.url, m, **{"daemon": {"poll_interval": 3600}, "metrics": {"listen": ""}, **sections})
        daemon.scheduler.request_reload()
        await wait_for(lambda: reloads(expect) == count, f"reload {expect} #{count}")

    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        await wait_for(lambda: daemon.scheduler.cycles == 1 and not daemon.scheduler.in_cycle, "first cycle")
        client = daemon._mirror.client
        await reload_with("ok", 1, mirror={"workers": 3}, daemon={"poll_interval": 1800})
        assert daemon.syncer.limiter.total_tokens == 3 and daemon.cfg.mirror.workers == 3
        assert daemon.scheduler.settings.poll_interval == 1800
        assert daemon._mirror.client is not client, "the pool is sized by workers"
        assert "mirror.workers: 8 -> 3; daemon.poll_interval: 3600.0 -> 1800.0" in caplog.text
        client = daemon._mirror.client
        await reload_with("ok", 2, mirror={"workers": 3}, daemon={"poll_interval": 900})
        assert daemon._mirror.client is client, "an unrelated change keeps the client"
        # A bad file, or a different directory, keeps everything as it was.
        conf.write_text(conf.read_text().replace("workers = 3", "workerz = 3"))
        daemon.scheduler.request_reload()
        await wait_for(lambda: reloads("error") == 1, "failed reload")
        assert "reload failed, keeping the running config" in caplog.text
        assert "unknown key(s): mirror.workerz" in caplog.text
        write_config(conf, upstream.url, tmp_path / "elsewhere", metrics={"listen": ""})
        daemon.scheduler.request_reload()
        await wait_for(lambda: reloads("error") == 2, "refused reload")
        assert "mirror.directory cannot change while running" in caplog.text
        assert daemon.cfg.mirror.workers == 3 and daemon.scheduler.settings.poll_interval == 900
        assert daemon.scheduler.cycles == 1, "a reload does not start a cycle"
        daemon.request_stop("test")


def test_config_changes_names_each_key(tmp_path: Path) -> None:
    a = make_config("http://127.0.0.1:1", tmp_path / "m")
    b = make_config("http://127.0.0.1:1", tmp_path / "m", mirror={"workers": 2}, upstream={"user_agent": "new (x@example.org)"},
                    filters={"allow": ["django"]})
    assert config_changes(a, b) == ["upstream.user_agent: (changed) -> (changed)", "mirror.workers: 8 -> 2", "filters: changed"]
    assert config_changes(a, a) == []


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
async def test_promtool_accepts_the_exposition(upstream: FakePyPI, tmp_path: Path) -> None:
    populate(upstream, 2)
    cfg = make_config(upstream.url, tmp_path / "m", daemon={"poll_interval": 3600}, metrics={"listen": "127.0.0.1:0"})
    daemon = Daemon(cfg, config_path=None, metrics=Metrics(), handle_signals=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        await wait_for(lambda: daemon.scheduler.cycles == 1 and not daemon.scheduler.in_cycle, "first cycle")
        assert daemon.metrics_address is not None
        text = await get_metrics(daemon.metrics_address)
        daemon.request_stop("test")
    assert sample(text, "mirror_cycle_duration_seconds_count") == 1
    r = await trio.run_process(["promtool", "check", "metrics"], stdin=text.encode(), capture_stdout=True,
                               capture_stderr=True, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()


def test_metrics_port_in_use_is_a_config_error(upstream: FakePyPI, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        conf = write_config(tmp_path / "mirror.toml", upstream.url, tmp_path / "m",
                            metrics={"listen": f"127.0.0.1:{port}"})
        assert cli.main(["run", "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert f"metrics.listen: cannot listen on 127.0.0.1:{port}: Address already in use" in err
    assert "Traceback" not in err


async def test_a_full_disk_backs_off_and_recovers(
    upstream: FakePyPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(upstream, 2)
    cfg = make_config(upstream.url, tmp_path / "m", daemon={"poll_interval": 0.1}, metrics={"listen": ""})
    real = FileTree.place
    calls = []

    def flaky(self: FileTree, tmp: Path, rel: str, sha256: str | None = None) -> None:
        calls.append(rel)
        if len(calls) == 1:
            self.discard(tmp)
            raise DiskError(f"publishing {rel}: No space left on device")
        real(self, tmp, rel, sha256)

    monkeypatch.setattr(FileTree, "place", flaky)
    metrics = Metrics()
    daemon = Daemon(cfg, config_path=None, metrics=metrics, handle_signals=False)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        await wait_for(lambda: value("mirror_cycles_total", outcome="error") == 1, "failed cycle")
        assert value("mirror_consecutive_failed_cycles") == 1
        t0 = trio.current_time()
        await wait_for(lambda: value("mirror_cycles_total", outcome="ok") == 1, "recovery")
        # The backoff after an error is at least MIN_BACKOFF, not poll_interval.
        assert trio.current_time() - t0 >= 0.8
        assert value("mirror_consecutive_failed_cycles") == 0
        daemon.request_stop("test")
    assert check_tree(cfg.mirror.directory / "web") == []
    assert len(json.loads((cfg.mirror.directory / "web/simple/index.v1_json").read_bytes())["projects"]) == 2


async def test_hard_deadline_when_a_thread_never_returns(
    upstream: FakePyPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(upstream, 1)
    cfg = make_config(upstream.url, tmp_path / "m", daemon={"stop_timeout": 0.2}, metrics={"listen": ""})
    release = threading.Event()
    entered = threading.Event()

    def hung_disk(self: FileTree, tmp: Path, rel: str, sha256: str | None = None) -> None:
        entered.set()
        release.wait(20)  # a rename on a wedged disk: no cancellation reaches it
        self.discard(tmp)
        raise DiskError("I/O error")

    monkeypatch.setattr(FileTree, "place", hung_disk)
    monkeypatch.setattr(daemon_module, "HARD_GRACE", 0.3)
    exits: list[tuple[int, float]] = []

    def exit_now(code: int) -> None:
        exits.append((code, trio.current_time()))
        release.set()  # let the test end; the real os._exit would not return

    daemon = Daemon(cfg, config_path=None, metrics=Metrics(), handle_signals=False, exit_now=exit_now)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        await trio.to_thread.run_sync(entered.wait, 20)
        t0 = trio.current_time()
        daemon.request_stop("test")
    assert [code for code, _ in exits] == [1]
    assert 0.5 - 0.05 <= exits[0][1] - t0 < 3


def test_cli_reports_errors_from_worker_tasks_without_a_traceback(
    upstream: FakePyPI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def full(self: FileTree, tmp: Path, rel: str, sha256: str | None = None) -> None:
        self.discard(tmp)
        raise DiskError(f"publishing {rel}: No space left on device")

    monkeypatch.setattr(FileTree, "place", full)
    populate(upstream, 2)
    conf = write_config(tmp_path / "mirror.toml", upstream.url, tmp_path / "m")
    assert cli.main(["sync", "--config", str(conf)]) == 5
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err


# -- real process ----------------------------------------------------------------

POLL = 1.0
# Time a one-project cycle may take on a loaded CI machine.
CYCLE_SLACK = 4.0


@pytest.mark.slow
def test_run_as_a_service(upstream: FakePyPI, tmp_path: Path) -> None:
    populate(upstream, 3)
    m = tmp_path / "m"
    web = m / "web"
    sections = {"daemon": {"poll_interval": POLL, "stop_timeout": 10}, "metrics": {"listen": "127.0.0.1:0"}}
    conf = write_config(tmp_path / "mirror.toml", upstream.url, m, **sections)  # type: ignore[arg-type]
    notify = NotifySocket()
    env = {"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "1000000"}
    try:
        with DaemonProcess(conf, env=env) as d:
            wait_until(lambda: notify.has("READY", "1"), 30, "READY=1")
            address = d.wait_log(r"metrics: serving http://(\S+)/metrics").group(1)
            wait_until(lambda: sample(scrape(address), "mirror_synced_serial") == upstream.serial, 30, "first cycle")

            # A new upstream release is in the tree within one poll interval.
            upstream.add_release("pkg-0", "2.0")
            took = wait_until(lambda: any("2.0" in f for f in page_files(web, "pkg-0")), 30, "new release")
            assert took <= POLL * 1.1 + CYCLE_SLACK
            wait_until(lambda: sample(scrape(address), "mirror_synced_serial") == upstream.serial, 30, "serial")
            text = scrape(address)
            assert sample(text, "mirror_upstream_serial") == upstream.serial
            assert sample(text, "mirror_serial_lag") == 0
            assert sample(text, "mirror_tree_files") == files_in_tree(web) > 0
            assert sample(text, "mirror_files_downloaded_total") == files_in_tree(web)
            assert sample(text, "mirror_projects_pending") == 0
            assert sample(text, "mirror_up") == 1

            # SIGHUP applies a changed config between cycles...
            write_config(conf, upstream.url, m, mirror={"workers": 3},
                         daemon={"poll_interval": 1.5, "stop_timeout": 10}, metrics={"listen": "127.0.0.1:0"})
            d.signal(signal.SIGHUP)
            d.wait_log(r"config reloaded from .*mirror\.workers: 8 -> 3; daemon\.poll_interval: 1\.0 -> 1\.5")
            # systemd heard RELOADING=1 (with the time), then READY=1 once done.
            wait_until(lambda: notify.has("STATUS") and any(
                m.get("READY") == "1" and m["STATUS"].startswith("config reloaded") for m in list(notify.messages)),
                10, "READY=1 after the reload")
            reload_msgs = [m for m in notify.messages if "RELOADING" in m or m.get("STATUS", "").startswith("config")]
            assert reload_msgs[0]["RELOADING"] == "1" and int(reload_msgs[0]["MONOTONIC_USEC"]) > 0
            assert reload_msgs[-1]["READY"] == "1" and reload_msgs[-1]["STATUS"].startswith("config reloaded;")
            # ...and a broken one is refused while the daemon keeps mirroring.
            conf.write_text(conf.read_text() + "\n[bogus]\n")
            d.signal(signal.SIGHUP)
            d.wait_log(r"reload failed, keeping the running config: .*unknown section\(s\) or key\(s\): bogus")
            wait_until(lambda: notify.has("STATUS") and any(
                m.get("READY") == "1" and m["STATUS"].startswith("reload refused") for m in list(notify.messages)),
                10, "READY=1 after a refused reload")
            upstream.add_release("pkg-1", "2.0")
            wait_until(lambda: any("2.0" in f for f in page_files(web, "pkg-1")), 30, "release after a bad reload")

            # A filter change by SIGHUP reaches the published pages with no
            # upstream change: pkg-0 keeps only its newest release.
            write_config(conf, upstream.url, m, mirror={"workers": 3}, filters={"latest": 1},
                         daemon={"poll_interval": 1.5, "stop_timeout": 10}, metrics={"listen": "127.0.0.1:0"})
            d.signal(signal.SIGHUP)
            wait_until(lambda: not any("-1.0" in f for f in page_files(web, "pkg-0")), 30, "filter applied")
            assert any("-2.0" in f for f in page_files(web, "pkg-0"))
            assert any("-1.0" in f for f in page_files(web, "pkg-2"))  # its only release stays

            # The lock: a second instance on the same directory exits at once.
            other = write_config(tmp_path / "other.toml", upstream.url, m, **sections)  # type: ignore[arg-type]
            for cmd in ("run", "sync"):
                r = subprocess.run([sys.executable, "-m", "mirror", cmd, "--config", str(other)],
                                   capture_output=True, text=True, timeout=60)
                assert r.returncode == 3, r.stderr
                assert f"locked by another mirror process (pid {d.pid})" in r.stderr

            assert notify.has("WATCHDOG", "1")
            assert notify.has("STATUS")
            d.signal(signal.SIGTERM)
            t0 = time.monotonic()
            assert d.wait(timeout=10 + 5) == 0, d.log
            assert time.monotonic() - t0 < 10
            assert notify.has("STOPPING", "1")
            assert "stopped cleanly" in d.log and "Traceback" not in d.log
    finally:
        notify.close()
    assert check_tree(web) == []
    assert list((m / "state" / "tmp").iterdir()) == []


@pytest.mark.slow
def test_stop_timeout_then_a_second_signal(upstream: FakePyPI, tmp_path: Path) -> None:
    populate(upstream, 2)
    m = tmp_path / "m"
    web = m / "web"
    hung = upstream.filenames("pkg-1")[0]
    fault = upstream.add_fault("slow", match=hung, delay=120)

    # One SIGTERM: the hung download gets stop_timeout, then the cycle is cut
    # and the daemon still exits 0.
    conf = write_config(tmp_path / "mirror.toml", upstream.url, m, daemon={"stop_timeout": 2},
                        metrics={"listen": ""})
    with DaemonProcess(conf) as d:
        wait_until(lambda: fault.fired >= 1, 30, "download in flight")
        d.signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert d.wait(timeout=20) == 0, d.log
        assert 1.5 <= time.monotonic() - t0 < 10
        assert "cycle cut short after stop_timeout" in d.log
    assert check_tree(web) == []
    assert list((m / "state" / "tmp").iterdir()) == []

    # A second SIGTERM does not wait for stop_timeout.
    conf = write_config(tmp_path / "mirror.toml", upstream.url, m, daemon={"stop_timeout": 60},
                        metrics={"listen": ""})
    fired = fault.fired
    with DaemonProcess(conf) as d:
        wait_until(lambda: fault.fired > fired, 30, "download in flight")
        d.signal(signal.SIGTERM)
        d.wait_log("SIGTERM: stopping")
        time.sleep(0.5)
        assert d.proc.poll() is None, "still finishing in-flight work"
        d.signal(signal.SIGTERM)
        t0 = time.monotonic()
        assert d.wait(timeout=10) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 5
        assert "second SIGTERM: exiting now" in d.log
    assert check_tree(web) == []
    # Nothing was lost: a plain sync finishes the job.
    upstream.clear_faults()
    assert cli.main(["sync", "--config", str(conf)]) == 0
    assert check_tree(web) == [] and hung in page_files(web, "pkg-1")
