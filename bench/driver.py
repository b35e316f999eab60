"""A long-running mirror process driven one cycle at a time (stdin -> stdout JSON).

``mirror run`` (the daemon) is not on main yet, so this stands in for it:
one process, one trio run, the same ``Metrics`` across cycles, calling
``mirror.cli.run_sync`` on the same directory each time, exactly as the
one-shot ``mirror sync`` does.  Commands, one per line:

``cycle``  run one sync cycle; print wall, CPU (user+sys of the whole
           process, trio worker threads included), RSS now and peak RSS
``root``   time ``Syncer.publish_root`` on the current state (the root
           index render + atomic write of its three files)
``quit``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from typing import Any

import httpx
import trio

from mirror.cli import run_sync, setup_logging
from mirror.config import Config, load_config
from mirror.publish.lock import DirectoryLock
from mirror.metrics import Metrics
from mirror.publish.state import State
from mirror.sync.cycle import CycleReport, Syncer
from mirror.publish.tree import FileTree
from mirror.upstream.files import HttpxFiles
from mirror.layout import Layout


def child_pids(pid: int) -> list[int]:
    """Children of every thread of ``pid`` (trio starts processes from a
    worker thread, so the main thread's list alone misses them)."""
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return kids


def proc_status(field: str, pid: int | str = "self") -> int:
    """A memory figure of /proc/<pid>/status (VmRSS, VmHWM) in bytes; 0 if gone.

    Peak RSS is VmHWM, not ``ru_maxrss``: Linux carries the pre-exec high
    water mark of the forking process into ``ru_maxrss``, so every child of
    a big parent would look big."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def rss_now() -> int:
    return proc_status("VmRSS")


def peak_rss() -> int:
    return proc_status("VmHWM")


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def publish_root(cfg: Config) -> dict[str, Any]:
    state = State.open(Layout(cfg.mirror.directory).db)
    try:
        async with httpx.AsyncClient() as client:
            syncer = Syncer(cfg, client=client, files=HttpxFiles(client), state=state,
                            tree=FileTree.at(Layout(cfg.mirror.directory)), metrics=Metrics())
            report = CycleReport(projects_synced=1)
            # As after a cycle that added a project: both root pages are stale.
            state.set_meta(root_json_dirty=1, root_html_dirty=1)
            c0, t0 = cpu(), time.perf_counter()
            await syncer.publish_root(report)
            return {"wall": time.perf_counter() - t0, "cpu": cpu() - c0, "written": report.root_written}
    finally:
        state.close()


async def serve(cfg: Config) -> None:
    metrics = Metrics()
    while True:
        line = (await trio.to_thread.run_sync(sys.stdin.readline)).strip()
        if line in ("", "quit"):
            return
        if line == "cycle":
            c0, t0 = cpu(), time.perf_counter()
            report = await run_sync(cfg, metrics=metrics)
            out: dict[str, Any] = {
                "wall": time.perf_counter() - t0, "cpu": cpu() - c0,
                "files": report.files_downloaded, "bytes": report.bytes_downloaded,
                "projects": report.projects_synced, "pages": report.pages_written,
                "root_written": report.root_written, "failed": len(report.failed),
            }
        elif line == "root":
            out = await publish_root(cfg)
        else:
            out = {"error": f"unknown command {line!r}"}
        out.update(rss=rss_now(), peak_rss=peak_rss())
        print(json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.driver")
    p.add_argument("--config", required=True)
    args = p.parse_args(argv)
    setup_logging("warning", "text")
    logging.getLogger("mirror").setLevel(logging.WARNING)
    cfg = load_config(args.config)
    with DirectoryLock(cfg.mirror.directory / "state" / "lock"):
        print(json.dumps({"ready": True, "rss": rss_now(), "peak_rss": peak_rss()}), flush=True)
        trio.run(serve, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
