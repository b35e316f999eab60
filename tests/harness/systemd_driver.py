"""Runs inside the booted test container (``tests/test_systemd.py``), as the
oneshot unit ``mirror-test.service``, with the container's own Python and
its stdlib only.

It drives the shipped units through ``systemctl`` as an operator would and
writes what it saw to ``/results/results.json`` after every step, so a step
that hangs or fails still leaves the ones before it for the host to read.
It asserts nothing itself: the host test does, on these facts.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import traceback
from pathlib import Path

RESULTS = Path("/results")
PARAMS = json.loads((RESULTS / "params.json").read_text())
CONF = Path("/etc/mirror/mirror.toml")
UNITS = Path("/etc/systemd/system")
out: dict[str, object] = {"done": []}


def save() -> None:
    tmp = RESULTS / "results.json.tmp"
    tmp.write_text(json.dumps(out, indent=1))
    tmp.replace(RESULTS / "results.json")


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def show(unit: str, *props: str) -> dict[str, str]:
    r = run("systemctl", "show", unit, *(a for p in props for a in ("-p", p)))
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def wait(what: str, pred, timeout: float = 60.0) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        time.sleep(0.2)
    return time.monotonic() - t0


def journal(*args: str) -> str:
    return run("journalctl", "--no-pager", "--output=cat", *args).stdout


def write_config(poll: str, extra: str = "") -> None:
    CONF.write_text(
        "[upstream]\n"
        f'url = "{PARAMS["upstream"]}"\n'
        "allow_http = true\n"
        'user_agent = "mirror-systemd-test (tests@example.org)"\n'
        "xmlrpc_interval = 0\n"
        "[mirror]\n"
        'directory = "/srv/pypi"\n'
        'name = "primary-test"\n'
        "[daemon]\n"
        f'poll_interval = "{poll}"\n'
        'stop_timeout = "10s"\n'
        "[metrics]\n"
        'listen = "127.0.0.1:0"\n' + extra
    )


def synced() -> bool:
    s = show("mirror", "StatusText")["StatusText"]
    return s.startswith("idle") and f"serial {PARAMS['serial']}, lag 0" in s


def step(name: str):  # type: ignore[no-untyped-def]
    def wrap(fn):  # type: ignore[no-untyped-def]
        def go() -> None:
            t0 = time.monotonic()
            try:
                out[name] = fn()
            except Exception:
                out[name] = {"error": traceback.format_exc()}
                raise
            finally:
                out["done"].append(name)  # type: ignore[attr-defined]
                out[f"{name}_seconds"] = round(time.monotonic() - t0, 2)
                save()
        return go
    return wrap


@step("start")
def start() -> dict[str, object]:
    write_config("2s")
    # docs/service.md, step 3, as written there.
    run("cp", "/units/mirror.service", "/etc/systemd/system/")
    run("systemctl", "daemon-reload")
    t0 = time.monotonic()
    r = run("systemctl", "enable", "--now", "mirror")
    took = time.monotonic() - t0
    state = show("mirror", "ActiveState", "SubState", "Type", "StatusText", "MainPID", "WatchdogUSec",
                 "ExecReload")
    if r.returncode != 0:
        raise RuntimeError(f"systemctl start mirror: {r.stderr}")
    first = wait("first sync", synced, 120)
    return {"rc": r.returncode, "stderr": r.stderr, "took": took, "after_start": state, "first_sync": first,
            "status_synced": show("mirror", "StatusText")["StatusText"],
            "root_index": Path("/srv/pypi/web/simple/index.html").exists()}


@step("reload")
def reload() -> dict[str, object]:
    write_config("3s")
    r = run("systemctl", "reload", "mirror")
    took = wait("reload applied", lambda: "daemon.poll_interval: 2.0 -> 3.0" in journal("-u", "mirror"), 30)
    return {"rc": r.returncode, "stderr": r.stderr, "applied_after": took,
            "state": show("mirror", "ActiveState", "NRestarts")}


@step("stop")
def stop() -> dict[str, object]:
    t0 = time.monotonic()
    r = run("systemctl", "stop", "mirror")
    return {"rc": r.returncode, "took": time.monotonic() - t0,
            "state": show("mirror", "ActiveState", "Result", "ExecMainStatus", "ExecMainCode")}


def dropin(unit: str, name: str, text: str) -> None:
    d = UNITS / f"{unit}.d"
    d.mkdir(exist_ok=True)
    (d / name).write_text(text)
    run("systemctl", "daemon-reload")


@step("watchdog")
def watchdog() -> dict[str, object]:
    # A short watchdog and restart delay, so the test sees them work.
    dropin("mirror.service", "test-watchdog.conf",
           "[Service]\nWatchdogSec=4s\nRestartSec=1s\nLimitCORE=0\n")
    write_config("2s")
    r = run("systemctl", "start", "mirror")
    if r.returncode != 0:
        raise RuntimeError(f"systemctl start mirror: {r.stderr}")
    wait("synced after restart", synced, 60)
    pings = []
    for _ in range(3):
        pings.append(int(show("mirror", "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] or 0))
        time.sleep(2.5)
    return {"rc": r.returncode, "pings": pings, "state": show("mirror", "WatchdogUSec", "NRestarts")}


def signal_and_wait(sig: signal.Signals, restarts: int, what: str) -> dict[str, object]:
    """Send ``sig`` to the main process; wait until systemd restarted it
    (``NRestarts`` = ``restarts``) and the new one has synced."""
    pid = int(show("mirror", "MainPID")["MainPID"])
    os.kill(pid, sig)
    took = wait(f"restart after {what}", lambda: show("mirror", "NRestarts")["NRestarts"] == str(restarts)
                and show("mirror", "ActiveState")["ActiveState"] == "active", 60)
    wait(f"synced after the restart after {what}", synced, 60)
    return {"signalled_pid": pid, "new_pid": int(show("mirror", "MainPID")["MainPID"]), "took": took,
            "state": show("mirror", "NRestarts", "ActiveState")}


@step("wedged")
def wedged() -> dict[str, object]:
    # A stopped process is a wedged event loop: no WATCHDOG=1 any more.
    return signal_and_wait(signal.SIGSTOP, 1, "the watchdog")


@step("crash")
def crash() -> dict[str, object]:
    return signal_and_wait(signal.SIGKILL, 2, "kill -9")


@step("notify_reload")
def notify_reload() -> dict[str, object]:
    # The shipped drop-in for systemd >= 253; a change of Type= needs a restart.
    run("install", "-D", "-m", "644", "/units/notify-reload.conf",
        "/etc/systemd/system/mirror.service.d/notify-reload.conf")
    run("systemctl", "daemon-reload")
    r0 = run("systemctl", "restart", "mirror")
    wait("synced under notify-reload", synced, 60)
    typ = show("mirror", "Type", "ExecReload")
    write_config("4s")
    r = run("systemctl", "reload", "mirror")
    # systemctl returned: with notify-reload the new config is already in force.
    applied = "daemon.poll_interval: 2.0 -> 4.0" in journal("-u", "mirror")
    write_config("4s", "[bogus]\nkey = 1\n")
    refusals = journal("-u", "mirror").count("reload failed, keeping the running config")
    bad = run("systemctl", "reload", "mirror")
    refused = journal("-u", "mirror").count("reload failed, keeping the running config") == refusals + 1
    return {"restart_rc": r0.returncode, "unit": typ, "rc": r.returncode, "stderr": r.stderr,
            "applied_when_reload_returned": applied, "bad_rc": bad.returncode, "bad_stderr": bad.stderr,
            "refused_when_reload_returned": refused, "state": show("mirror", "ActiveState", "NRestarts")}


@step("priorities")
def priorities() -> dict[str, object]:
    return {"warning": journal("-u", "mirror", "-p", "warning"),
            "info": journal("-u", "mirror", "-p", "info")}


@step("final_stop")
def final_stop() -> dict[str, object]:
    write_config("2s")
    t0 = time.monotonic()
    r = run("systemctl", "stop", "mirror")
    return {"rc": r.returncode, "took": time.monotonic() - t0,
            "state": show("mirror", "ActiveState", "Result", "TimeoutStopUSec")}


@step("pull")
def pull() -> dict[str, object]:
    Path("/srv/pull").mkdir(exist_ok=True)
    run("chown", "mirror:mirror", "/srv/pull")
    run("cp", "/units/mirror-pull.service", "/units/mirror-pull.timer", "/etc/systemd/system/")
    run("systemctl", "daemon-reload")
    dropin("mirror-pull.service", "test-source.conf",
           "[Service]\nExecStart=\n"
           f"ExecStart=/opt/mirror/venv/bin/mirror pull {PARAMS['rsync']} /srv/pull/web\n"
           "ReadWritePaths=/srv/pull\n")
    r = run("systemctl", "start", "mirror-pull.service", timeout=300)
    state = show("mirror-pull.service", "Result", "ExecMainStatus", "ActiveState", "ExecMainStartTimestampMonotonic")
    # The timer, made quick: the list of monotonic timers is reset, then one.
    dropin("mirror-pull.timer", "test-quick.conf",
           "[Timer]\nOnBootSec=\nOnActiveSec=1s\nOnUnitInactiveSec=10min\nRandomizedDelaySec=0\nAccuracySec=100ms\n")
    before = state["ExecMainStartTimestampMonotonic"]
    t = run("systemctl", "enable", "--now", "mirror-pull.timer")

    def ran_again() -> bool:
        s = show("mirror-pull.service", "ExecMainStartTimestampMonotonic", "ActiveState")
        return s["ExecMainStartTimestampMonotonic"] != before and s["ActiveState"] == "inactive"

    took = wait("a pull started by the timer", ran_again, 60)
    return {"rc": r.returncode, "stderr": r.stderr, "state": state, "timer_rc": t.returncode, "timer_took": took,
            "after_timer": show("mirror-pull.service", "Result", "ExecMainStatus"),
            "timer": show("mirror-pull.timer", "ActiveState"),
            "pulled_root": Path("/srv/pull/web/simple/index.html").exists(),
            "runs": journal("-u", "mirror-pull.service").count("INFO mirror: pull: "),
            "enabled": run("systemctl", "is-enabled", "mirror-pull.timer", "mirror").stdout.split(),
            "log": journal("-u", "mirror-pull.service")}


def main() -> None:
    try:
        for fn in (start, reload, stop, watchdog, wedged, crash, notify_reload, priorities, final_stop, pull):
            fn()
    except Exception:
        out["failed"] = traceback.format_exc()
    finally:
        (RESULTS / "journal.txt").write_text(run("journalctl", "--no-pager", "--boot").stdout)
        out["finished"] = True
        save()


if __name__ == "__main__":
    main()
