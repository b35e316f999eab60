"""The shipped units under a real systemd: a minimal Debian (no procps)
booted with ``systemd-nspawn``, the project installed from wheels, and
``systemd/mirror.service``, ``mirror-pull.service`` and ``mirror-pull.timer``
run unchanged (drop-ins only for short intervals and the test's addresses).

The container shares the host's network: the fake PyPI and the rsync daemon
run here on 127.0.0.1.  A driver unit inside (``harness/systemd_driver.py``)
works through the steps with ``systemctl`` and writes what it saw to a bound
directory; the tests below assert on that, and on the tree it left.  One
boot serves every test of the module (about a minute, plus a debootstrap of
about a minute on the first run, cached after).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import nspawn
from tests.harness.consistency import check_tree
from tests.harness.fakepypi import FakePyPI
from tests.harness.rsyncd import rsync_daemon

UNITS = nspawn.ROOT / "systemd"
DRIVER = Path(__file__).parent / "harness" / "systemd_driver.py"
BOOT_TIMEOUT = 420

pytestmark = pytest.mark.slow

DRIVER_UNIT = """\
[Unit]
Description=mirror systemd test driver
After=multi-user.target

[Service]
Type=oneshot
ExecStart=/usr/bin/python3 /driver/systemd_driver.py
ExecStopPost=/usr/bin/systemctl poweroff --no-block
TimeoutStartSec=400

[Install]
WantedBy=multi-user.target
"""


def _user(root: Path, name: str) -> tuple[int, int]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        f = line.split(":")
        if f[0] == name:
            return int(f[2]), int(f[3])
    raise AssertionError(f"no user {name} in the container")


def _provision(root: Path, wheels: Path) -> None:
    """What docs/service.md tells an operator to do, in the container."""
    nspawn.run_in(root, """
        python3 -m venv /opt/mirror/venv
        /opt/mirror/venv/bin/pip install --quiet --no-index --find-links /wheels mirror
        useradd --system --home-dir /srv/pypi --no-create-home --shell /usr/sbin/nologin mirror
        mkdir -p /etc/mirror /srv/pypi
        chown mirror:mirror /srv/pypi
        test ! -e /bin/kill && test ! -e /usr/bin/kill
    """, binds={wheels: "/wheels"})
    # The driver installs the shipped units from /units, as docs/service.md says.
    etc = root / "etc" / "systemd" / "system"
    (etc / "mirror-test.service").write_text(DRIVER_UNIT)
    (etc / "multi-user.target.wants" / "mirror-test.service").symlink_to("/etc/systemd/system/mirror-test.service")


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], str, Path]]:
    if (why := nspawn.unavailable()) is not None:
        nspawn.skip(why)
    base = nspawn.base_rootfs()
    tmp = tmp_path_factory.mktemp("systemd")
    wheels = nspawn.build_wheels(tmp / "wheels")
    root = nspawn.copy_rootfs(base, tmp / "root")
    nspawn.probe(root)
    _provision(root, wheels)
    srv, results = tmp / "srv", tmp / "results"
    srv.mkdir()
    results.mkdir()
    # /srv/pypi is this directory bound in: it belongs to the container's user.
    uid, gid = _user(root, "mirror")
    os.chown(srv, uid, gid)
    with FakePyPI(seed=3) as upstream:
        for n in range(3):
            for v in ("1.0", "1.1"):
                upstream.add_release(f"svc-{n}", v)
        with rsync_daemon(srv / "web", tmp / "rsyncd") as rsync_url:
            (results / "params.json").write_text(json.dumps({
                "upstream": upstream.url, "serial": upstream.serial, "rsync": rsync_url,
            }))
            t0 = time.monotonic()
            try:
                boot = nspawn.boot(root, binds={srv: "/srv/pypi", results: "/results"},
                                   ro_binds={DRIVER.parent: "/driver", UNITS: "/units"},
                                   timeout=BOOT_TIMEOUT)
                console = boot.stdout + boot.stderr
            except subprocess.TimeoutExpired as e:
                console = f"(killed after {BOOT_TIMEOUT}s) {e.stdout!r}"
            took = time.monotonic() - t0
    path = results / "results.json"
    assert path.exists(), f"the driver wrote nothing in {took:.0f}s; console:\n{console[-4000:]}"
    res = json.loads(path.read_text())
    journal = (results / "journal.txt").read_text() if (results / "journal.txt").exists() else ""
    assert res.get("finished"), f"the driver did not finish ({res.get('done')}); console:\n{console[-3000:]}"
    yield res, journal, srv


def _step(res: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in res, f"step {name!r} never ran: {res.get('failed', '')}"
    got = res[name]
    assert "error" not in got, got["error"]
    return got


def test_start_returns_at_ready_and_status_shows_the_sync(booted: tuple[dict[str, Any], str, Path]) -> None:
    res, _, _ = booted
    s = _step(res, "start")
    assert s["rc"] == 0, s["stderr"]
    after = s["after_start"]
    assert after["Type"] == "notify" and after["ActiveState"] == "active" and after["SubState"] == "running"
    # READY=1 comes before the first cycle ends: systemctl start returned
    # with STATUS= already set by the daemon.
    assert re.match(r"(starting|syncing)", after["StatusText"]), after
    assert re.fullmatch(r"idle; next poll in \d+s; serial \d+, lag 0, 0 pending, 0 failed", s["status_synced"])
    assert s["root_index"]
    assert after["WatchdogUSec"] == "2min"
    # No /bin/kill in the container: the shipped ExecReload still works.
    assert "/bin/sh" in after["ExecReload"]


def test_reload_without_procps_picks_up_a_config_change(booted: tuple[dict[str, Any], str, Path]) -> None:
    r = _step(booted[0], "reload")
    assert r["rc"] == 0, r["stderr"]
    assert r["state"] == {"ActiveState": "active", "NRestarts": "0"}


def test_stop_is_clean_and_within_timeout(booted: tuple[dict[str, Any], str, Path]) -> None:
    for name in ("stop", "final_stop"):
        s = _step(booted[0], name)
        assert s["rc"] == 0
        assert s["took"] < 60, f"{name}: {s['took']:.1f}s is past TimeoutStopSec"
        assert s["state"]["ActiveState"] == "inactive" and s["state"]["Result"] == "success", s


def test_watchdog_is_fed_and_a_wedged_loop_is_restarted(booted: tuple[dict[str, Any], str, Path]) -> None:
    res, journal, srv = booted
    w = _step(res, "watchdog")
    assert w["state"]["WatchdogUSec"] == "4s"
    pings = w["pings"]
    assert pings[0] > 0 and pings[0] < pings[1] < pings[2], f"no fresh WATCHDOG=1 every 2.5s: {pings}"
    x = _step(res, "wedged")
    assert x["new_pid"] != x["signalled_pid"]
    assert x["state"] == {"NRestarts": "1", "ActiveState": "active"}
    assert "Watchdog timeout" in journal
    # SIGSTOP'ed mid-whatever and killed by systemd: the tree is whole.
    assert check_tree(srv / "web") == []


def test_restart_on_failure_after_a_crash(booted: tuple[dict[str, Any], str, Path]) -> None:
    c = _step(booted[0], "crash")
    assert c["state"]["NRestarts"] == "2" and c["state"]["ActiveState"] == "active"
    assert c["new_pid"] != c["signalled_pid"]
    assert check_tree(booted[2] / "web") == []


def test_notify_reload_waits_for_the_new_config(booted: tuple[dict[str, Any], str, Path]) -> None:
    n = _step(booted[0], "notify_reload")
    assert n["restart_rc"] == 0
    assert n["unit"]["Type"] == "notify-reload"
    assert n["rc"] == 0, n["stderr"]
    assert n["applied_when_reload_returned"], "systemctl reload returned before the new config was in force"
    # A refused config ends the reload too, and the service keeps running.
    assert n["bad_rc"] == 0, n["bad_stderr"]
    assert n["refused_when_reload_returned"]
    assert n["state"]["ActiveState"] == "active"


def test_journal_priorities(booted: tuple[dict[str, Any], str, Path]) -> None:
    p = _step(booted[0], "priorities")
    assert "reload failed, keeping the running config" in p["warning"]
    assert "running on /srv/pypi" not in p["warning"], "info lines must not show at -p warning"
    assert "config reloaded" not in p["warning"]
    assert "running on /srv/pypi" in p["info"]
    # journald took the prefix as the priority, it is not in the text.
    assert not re.search(r"(?m)^<\d>", p["info"])


def test_pull_service_and_timer(booted: tuple[dict[str, Any], str, Path]) -> None:
    p = _step(booted[0], "pull")
    assert p["rc"] == 0, p["stderr"] + p["log"]
    assert p["state"]["Result"] == "success" and p["state"]["ExecMainStatus"] == "0", p["log"]
    assert p["pulled_root"]
    assert p["timer_rc"] == 0 and p["timer"]["ActiveState"] == "active"
    assert p["after_timer"] == {"Result": "success", "ExecMainStatus": "0"}, p["log"]
    # One summary line per pull: the one started by hand, the one by the timer.
    assert p["runs"] == 2, p["log"]
    assert p["enabled"] == ["enabled", "enabled"]


def test_journal_holds_no_traceback_or_sandbox_denial(booted: tuple[dict[str, Any], str, Path]) -> None:
    _, journal, _ = booted
    assert journal.count("mirror run") or "running on /srv/pypi" in journal
    for bad in ("Traceback", "Operation not permitted", "status=31/SYS", "Bad system call", "203/EXEC"):
        assert bad not in journal, f"{bad!r} in the journal:\n" + "\n".join(
            line for line in journal.splitlines() if bad in line)
