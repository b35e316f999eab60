"""The three benchmark scenarios; each returns a dict of measured figures.

* ``initial_sync``: raw baseline, raw+disk and ``mirror sync`` on one corpus.
* ``scale``: a pre-seeded mirror following a large upstream; no-change and
  one-change cycles in one long-running process (``bench.driver``).
* ``root_publish``: ``Syncer.publish_root`` on a synthetic state.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import corpus, references
from bench.driver import child_pids, proc_status
from bench.seed import seed_state, seeded_project
from bench.upstream import Upstream
from mirror.config import default_download_processes
from mirror.layout import Layout

ROOT = Path(__file__).resolve().parent.parent
MB = 1e6


def write_config(path: Path, url: str, directory: Path, *, workers: int, xmlrpc_interval: float) -> Path:
    path.write_text(
        "[upstream]\n"
        f'url = "{url}"\nallow_http = true\nfeed = "changelog"\n'
        'user_agent = "mirror-bench (bench@example.org)"\n'
        f"xmlrpc_interval = {xmlrpc_interval}\ntimeout = 60\n"
        "[mirror]\n"
        f'directory = "{directory}"\nworkers = {workers}\n'
    )
    return path


def settle() -> None:
    """Let the previous run's writeback and deletions reach the disk first,
    so a run is not charged for flushing its predecessor's gigabyte."""
    os.sync()
    time.sleep(2)


def run_child(cmd: list[str]) -> dict[str, Any]:
    """Run a child to completion: wall time, CPU (user+sys) via wait4, peak RSS by polling VmHWM."""
    return run_children([cmd])


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def run_children(cmds: list[list[str]]) -> dict[str, Any]:
    """Run children side by side: wall until the last exits, summed CPU and
    peak RSS (each process's peak, including the children's own children),
    the worst exit code, their outputs joined."""
    t0 = time.perf_counter()
    busy0, total0 = host_cpu()
    outs = [tempfile.TemporaryFile() for _ in cmds]
    try:
        procs = [subprocess.Popen(c, cwd=ROOT, stdout=o, stderr=subprocess.DEVNULL) for c, o in zip(cmds, outs)]
        peak = {p.pid: 0 for p in procs}
        user = sys_ = 0.0
        rc = 0
        running = {p.pid for p in procs}
        while running:
            for pid in list(running):
                done, status, ru = os.wait4(pid, os.WNOHANG)
                if done:
                    running.discard(pid)
                    user += ru.ru_utime
                    sys_ += ru.ru_stime
                    rc = max(rc, abs(os.waitstatus_to_exitcode(status)))
                else:
                    # The child and its own children (download helpers).
                    for q in (pid, *child_pids(pid)):
                        peak[q] = max(peak.get(q, 0), proc_status("VmHWM", q))
            if running:
                time.sleep(0.02)
        wall = time.perf_counter() - t0
        busy1, total1 = host_cpu()
        text = ""
        for o in outs:
            o.seek(0)
            text += o.read().decode(errors="replace")
    finally:
        for o in outs:
            o.close()
    return {"wall": wall, "cpu": user + sys_, "user": user, "sys": sys_,
            "peak_rss": sum(peak.values()), "rc": rc, "stdout": text,
            # Share of all CPUs busy during the run (every process, the
            # server included): near 1.0, the run was bound by CPU.
            "host_busy": (busy1 - busy0) / max(1, total1 - total0)}


def _rates(r: dict[str, Any], files: int, nbytes: int) -> dict[str, Any]:
    r = {k: v for k, v in r.items() if k != "stdout"}
    r["files_per_s"] = files / r["wall"]
    r["mb_per_s"] = nbytes / MB / r["wall"]
    return r


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-figure medians of several runs of one command."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["runs"] = runs
    return out


def initial_sync(work: Path, *, files: int, seed: int, workers: int, keep: bool, rounds: int = 3,
                 bandersnatch: str | None = None, floors: bool = False, s3: str | None = None) -> dict[str, Any]:
    """Every contender on one corpus, ``rounds`` times in turn.

    Per round: the raw httpx baseline, the curl baseline, bandersnatch (when
    ``bandersnatch`` names its binary), ``mirror sync`` and, with ``floors``,
    raw+disk in one and in two processes.  Interleaved rounds and medians,
    because on a shared machine the same command's wall time drifts by tens
    of percent within minutes; each round's ratios compare runs made back to
    back.  ``s3`` ("moto" or "radosgw"): also ``mirror sync`` into a bucket on
    that server, started here (``tests.harness.s3``), next to the
    filesystem run; the server's own CPU is not the mirror's and is not
    counted."""
    root = work / "corpus"
    t0 = time.perf_counter()
    stats = corpus.generate(root, files=files, seed=seed)
    gen = time.perf_counter() - t0
    manifest = root / "manifest.json"
    n_urls = stats.files + stats.sidecars
    out: dict[str, Any] = {"corpus": {**stats.__dict__, "urls": n_urls, "generate_s": gen}, "rounds": rounds,
                           "download_processes": default_download_processes()}
    keys = ["raw", "curl", *(["bandersnatch"] if bandersnatch else []), "mirror",
            *(["mirror_s3"] if s3 else []), *(["raw_disk", "raw_disk_2", "lean_disk_2"] if floors else [])]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
    with contextlib.ExitStack() as stack:
        up = stack.enter_context(Upstream(root, work / "run-sync"))
        bucket_server = _start_s3(stack, s3, work) if s3 else None
        if bucket_server is not None:
            out["s3_server"] = bucket_server.kind
        out["server"] = up.server
        py = sys.executable
        raw_cmd = [py, "-m", "bench.raw", "--url", up.url, "--manifest", str(manifest), "--concurrency", str(workers)]
        for n in range(rounds):
            print(f"sync: round {n + 1}/{rounds} ...", file=sys.stderr, flush=True)
            settle()
            raw = run_child(raw_cmd)
            if raw["rc"] != 0:
                raise RuntimeError(f"raw baseline failed: {raw['stdout'][-2000:]}")
            runs["raw"].append(_rates(raw, n_urls, stats.bytes))
            up.traffic()

            curl_dir = work / "curl"
            shutil.rmtree(curl_dir, ignore_errors=True)
            cmd = references.curl_command(up.url, manifest, curl_dir, concurrency=workers)
            settle()
            c = run_child(cmd)
            if c["rc"] != 0:
                raise RuntimeError(f"curl baseline failed ({c['rc']}): {c['stdout'][-2000:]}")
            runs["curl"].append(_rates(c, n_urls, stats.bytes))
            shutil.rmtree(curl_dir, ignore_errors=True)
            up.traffic()

            if bandersnatch:
                bdir = work / "bandersnatch"
                shutil.rmtree(bdir, ignore_errors=True)
                bdir.mkdir()
                bconf = references.bandersnatch_config(work / "bandersnatch.conf", up.url, bdir)
                settle()
                b = run_child(references.bandersnatch_command(bandersnatch, bconf))
                got = references.count_files(bdir / "web" / "packages")
                if b["rc"] != 0 or got != (n_urls, stats.bytes):
                    raise RuntimeError(f"bandersnatch exited {b['rc']} holding {got} (want {(n_urls, stats.bytes)})")
                m = _rates(b, n_urls, stats.bytes)
                m["upstream_by_kind"] = up.traffic().by_kind
                runs["bandersnatch"].append(m)
                shutil.rmtree(bdir, ignore_errors=True)

            mdir = work / "mirror-sync"
            shutil.rmtree(mdir, ignore_errors=True)
            cfg = write_config(work / "sync.toml", up.url, mdir, workers=workers, xmlrpc_interval=0)
            settle()
            sync = run_child([py, "-m", "mirror", "--log-level", "warning", "sync", "--config", str(cfg)])
            if sync["rc"] != 0:
                raise RuntimeError(f"mirror sync exited {sync['rc']}")
            m = _rates(sync, n_urls, stats.bytes)
            t = up.traffic()
            m["upstream_requests"] = t.requests
            m["upstream_by_kind"] = t.by_kind
            _check_tree(mdir, n_urls, stats.bytes)
            runs["mirror"].append(m)
            if not keep:
                shutil.rmtree(mdir, ignore_errors=True)

            if bucket_server is not None:
                runs["mirror_s3"].append(_s3_round(bucket_server, work, up.url, n, workers, n_urls, stats.bytes))
                up.traffic()

            if floors:
                disk_dir = work / "raw-disk"
                settle()
                rawd = run_child([*raw_cmd, "--disk", str(disk_dir)])
                shutil.rmtree(disk_dir, ignore_errors=True)
                runs["raw_disk"].append(_rates(rawd, n_urls, stats.bytes))
                up.traffic()
                settle()
                rawd2 = run_children([[py, "-m", "bench.raw", "--url", up.url, "--manifest", str(manifest),
                                       "--concurrency", str(max(1, workers // 2)), "--disk", str(disk_dir / str(k)),
                                       "--shard", f"{k}/2"] for k in range(2)])
                shutil.rmtree(disk_dir, ignore_errors=True)
                if rawd2["rc"] != 0:
                    raise RuntimeError(f"raw+disk x2 failed: {rawd2['stdout'][-2000:]}")
                runs["raw_disk_2"].append(_rates(rawd2, n_urls, stats.bytes))
                up.traffic()
                # The Python floor: the mirror's own file client on both
                # cores, files written and made durable by one syncfs each.
                settle()
                lean2 = run_children([[py, "-m", "bench.raw", "--url", up.url, "--manifest", str(manifest),
                                       "--client", "lean", "--concurrency", str(max(1, workers // 2)),
                                       "--disk", str(disk_dir / str(k)), "--shard", f"{k}/2"] for k in range(2)])
                shutil.rmtree(disk_dir, ignore_errors=True)
                if lean2["rc"] != 0:
                    raise RuntimeError(f"lean+disk x2 failed: {lean2['stdout'][-2000:]}")
                runs["lean_disk_2"].append(_rates(lean2, n_urls, stats.bytes))
                up.traffic()
    for key, rs in runs.items():
        out[key] = _median_run(rs)
        out[key]["cpu_ms_per_file"] = 1000 * out[key]["cpu"] / n_urls
    out["mirror"]["upstream_by_kind"] = runs["mirror"][-1]["upstream_by_kind"]
    ratios = []
    for i in range(rounds):
        m, r, c = runs["mirror"][i], runs["raw"][i], runs["curl"][i]
        x = {"mirror/curl": m["wall"] / c["wall"], "mirror/raw": m["wall"] / r["wall"]}
        if bandersnatch:
            x["bandersnatch/mirror"] = runs["bandersnatch"][i]["wall"] / m["wall"]
            x["mirror/bandersnatch"] = m["wall"] / runs["bandersnatch"][i]["wall"]
        ratios.append(x)
    out["ratios"] = ratios
    for k in ratios[0]:
        out[k] = statistics.median(x[k] for x in ratios)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _start_s3(stack: contextlib.ExitStack, kind: str, work: Path) -> Any:
    from tests.harness import s3 as harness

    if kind == "moto":
        return stack.enter_context(harness.moto_server(work))
    if kind == "radosgw":
        why = harness.ceph_missing()
        if why:
            raise RuntimeError(f"--s3 radosgw: {why}")
        return stack.enter_context(harness.radosgw(work))
    raise ValueError(f"--s3: moto or radosgw, not {kind!r}")


def _s3_round(server: Any, work: Path, url: str, n: int, workers: int, n_urls: int, nbytes: int) -> dict[str, Any]:
    """``mirror sync`` of the corpus into a fresh bucket; the bucket is
    emptied afterwards (moto keeps every object in memory)."""
    from tests.harness.e2e import _toml

    bucket = server.make_bucket(f"bench-sync-{os.getpid()}-{n}")
    mdir = work / "mirror-s3"
    shutil.rmtree(mdir, ignore_errors=True)
    cfg = write_config(work / "s3.toml", url, mdir, workers=workers, xmlrpc_interval=0)
    storage = server.storage(work, bucket)
    with open(cfg, "a") as f:
        f.write('[storage]\nbackend = "s3"\n[storage.s3]\n')
        for k, v in storage["s3"].items():
            f.write(f"{k} = {_toml(v)}\n")
    settle()
    r = run_child([sys.executable, "-m", "mirror", "--log-level", "warning", "sync", "--config", str(cfg)])
    if r["rc"] != 0:
        raise RuntimeError(f"mirror sync into {server.kind} exited {r['rc']}: {r['stdout'][-2000:]}")
    m = _rates(r, n_urls, nbytes)
    _check_tree(mdir, n_urls, nbytes)
    client = server.client()
    from tests.harness.s3 import objects

    objs = objects(client, bucket)
    m["objects"] = len(objs)
    m["object_bytes"] = sum(o["Size"] for o in objs.values())
    keys = [{"Key": o["Key"]} for o in objs.values()]
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": keys[i:i + 1000], "Quiet": True})
    shutil.rmtree(mdir, ignore_errors=True)
    return m


def _check_tree(mdir: Path, n_urls: int, nbytes: int) -> None:
    from mirror.publish.state import State

    st = State.open(Layout(mdir).db)
    try:
        tree_files, tree_bytes = st.tree_totals()
    finally:
        st.close()
    if (tree_files, tree_bytes) != (n_urls, nbytes):
        raise RuntimeError(f"mirror holds {tree_files} files / {tree_bytes} B, corpus has {n_urls} / {nbytes}")


class _Driver:
    def __init__(self, config: Path) -> None:
        self.p = subprocess.Popen([sys.executable, "-m", "bench.driver", "--config", str(config)], cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.ready = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError("bench.driver exited")
        return dict(json.loads(line))

    def ask(self, command: str) -> dict[str, Any]:
        assert self.p.stdin is not None
        self.p.stdin.write(command.encode() + b"\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> dict[str, Any]:
        assert self.p.stdin is not None
        self.p.stdin.write(b"quit\n")
        self.p.stdin.close()
        _, _, ru = os.wait4(self.p.pid, 0)
        self.p.returncode = 0
        return {"cpu": ru.ru_utime + ru.ru_stime}


def _one_change(up: Upstream, root: Path, index: int, serial: int, rng: random.Random) -> int:
    """Upload one ~40 KB wheel (+ .metadata) to seeded project ``index``."""
    p = seeded_project(index)
    old = corpus.file_entry(p.file_url_path, p.filename, p.sha256, p.size, None)
    new, _ = corpus.add_file(root, p.name, "1.0.1", wheel=True, content=rng.randbytes(40_000))
    serial += 1
    page = corpus.page(p.name, serial, [old, new], ["1.0.0", "1.0.1"])
    dest = root / "simple" / p.name / "index.v1_json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(page)
    os.replace(tmp, dest)
    up.add_events([[p.name, "1.0.1", int(time.time()), f"add py3 file {new['filename']}", serial]])
    return serial


def scale(work: Path, *, projects: int, cycles: int, workers: int, keep: bool, xmlrpc_interval: float = 0) -> dict[str, Any]:
    root = work / "scale-upstream"
    (root / "simple").mkdir(parents=True, exist_ok=True)
    mdir = work / "mirror-scale"
    t0 = time.perf_counter()
    serial = seed_state(mdir, projects)
    seeded = time.perf_counter() - t0
    (root / "feed.json").write_text(json.dumps({"serial": serial, "listing": {}}))
    rng = random.Random(1)
    out: dict[str, Any] = {"projects": projects, "seed_s": seeded, "xmlrpc_interval": xmlrpc_interval}
    no_change: list[dict[str, Any]] = []
    one_change: list[dict[str, Any]] = []
    with Upstream(root, work / "run-scale") as up:
        cfg = write_config(work / "scale.toml", up.url, mdir, workers=workers, xmlrpc_interval=xmlrpc_interval)
        driver = _Driver(cfg)
        try:
            out["rss_start"] = driver.ready["rss"]
            up.traffic()
            # The first cycle of a process pays one-time costs (imports, the
            # TLS context, a cold SQLite cache); a daemon pays them once.
            first = driver.ask("cycle")
            t = up.traffic()
            out["first_cycle"] = {**first, "requests": t.requests, "upstream_bytes": t.total_bytes}
            for c in range(cycles):
                change = c % 2 == 1
                if change:
                    serial = _one_change(up, root, (c * 7919) % projects, serial, rng)
                    up.traffic()  # not the mirror's
                r = driver.ask("cycle")
                t = up.traffic()
                r.update(requests=t.requests, request_bytes=t.request_bytes, response_bytes=t.response_bytes,
                         upstream_bytes=t.total_bytes, by_kind=t.by_kind)
                if r["failed"] or (change and r["files"] != 2):
                    raise RuntimeError(f"cycle {c} did not sync as expected: {r}")
                (one_change if change else no_change).append(r)
            last = driver.ask("cycle")
            out["rss_end"], out["peak_rss"] = last["rss"], last["peak_rss"]
        finally:
            driver.close()
    out["no_change"] = _summary(no_change)
    out["one_change"] = _summary(one_change)
    if not keep:
        shutil.rmtree(mdir, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    return out


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("wall", "cpu", "requests", "request_bytes", "response_bytes", "upstream_bytes", "bytes")
    return {
        "cycles": len(rows),
        "median": {k: statistics.median(r[k] for r in rows) for k in keys},
        "max": {k: max(r[k] for r in rows) for k in keys},
        "by_kind": rows[-1]["by_kind"] if rows else {},
        "all": rows,
    }


def root_publish(work: Path, *, projects: int, repeat: int, keep: bool) -> dict[str, Any]:
    mdir = work / "mirror-root"
    t0 = time.perf_counter()
    seed_state(mdir, projects, files=False, root=False)
    seeded = time.perf_counter() - t0
    cfg = write_config(work / "root.toml", "http://127.0.0.1:9", mdir, workers=1, xmlrpc_interval=0)
    driver = _Driver(cfg)
    try:
        runs = [driver.ask("root") for _ in range(repeat)]
    finally:
        driver.close()
    sizes = {p.name: p.stat().st_size for p in (mdir / "web" / "simple").glob("index.*")}
    if not keep:
        shutil.rmtree(mdir, ignore_errors=True)
    return {
        "projects": projects, "seed_s": seeded, "runs": runs, "sizes": sizes,
        "wall": statistics.median(r["wall"] for r in runs), "wall_max": max(r["wall"] for r in runs),
        "cpu": statistics.median(r["cpu"] for r in runs), "peak_rss": runs[-1]["peak_rss"],
    }


def compression(work: Path, *, projects: int) -> dict[str, Any]:
    """Bytes on the wire for what grows with the index, with and without gzip:
    the PEP 691 root (rendered by the mirror's own renderer for ``projects``
    synthetic projects) and the XML-RPC ``list_packages_with_serial`` a first
    sync reads, both fetched through nginx with the mirror's own client, once
    as it asks by default and once with ``Accept-Encoding: identity``."""
    import xmlrpc.client

    from mirror.publish import render
    from mirror.upstream.parse import JSON_TYPE
    from mirror.upstream.transport import open_client

    root = work / "compression-upstream"
    (root / "simple").mkdir(parents=True, exist_ok=True)
    names = [f"project-{i:06d}-{random.Random(i).choice(['lib', 'py', 'tools', 'client'])}" for i in range(projects)]
    rows = ((n, n, i + 1) for i, n in enumerate(names))
    with open(root / "simple" / "index.v1_json", "wb") as f:
        for _html, js in render.iter_root(rows, serial=projects, html=False):
            f.write(js)
    (root / "feed.json").write_text(json.dumps({"serial": projects, "listing": {n: i + 1 for i, n in enumerate(names)}}))
    out: dict[str, Any] = {"projects": projects, "root_raw_bytes": (root / "simple" / "index.v1_json").stat().st_size}
    cfg = write_config(work / "compression.toml", "http://127.0.0.1:9", work / "unused", workers=1, xmlrpc_interval=0)
    from mirror.config import load_config

    upcfg = load_config(cfg).upstream
    body = xmlrpc.client.dumps((), "list_packages_with_serial").encode()
    with Upstream(root, work / "run-compression", gzip=True) as up:

        async def fetch(identity: bool) -> tuple[int, int]:
            client = open_client(upcfg, workers=1, version="bench")
            extra = {"Accept-Encoding": "identity"} if identity else {}
            try:
                r1 = await client.get(f"{up.url}/simple/", headers={"Accept": JSON_TYPE, **extra})
                r2 = await client.post(f"{up.url}/pypi", content=body, headers={"Content-Type": "text/xml", **extra})
                assert r1.status_code == r2.status_code == 200, (r1.status_code, r2.status_code)
                return len(r1.content), len(r2.content)
            finally:
                await client.aclose()

        import trio

        for identity in (True, False):
            up.traffic()
            decoded = trio.run(fetch, identity)
            t = up.traffic()
            key = "identity" if identity else "gzip"
            out[key] = {"wire_bytes": t.response_bytes, "decoded_root": decoded[0], "decoded_xmlrpc": decoded[1]}
    out["saved_bytes"] = out["identity"]["wire_bytes"] - out["gzip"]["wire_bytes"]
    out["ratio"] = out["gzip"]["wire_bytes"] / out["identity"]["wire_bytes"]
    shutil.rmtree(root, ignore_errors=True)
    return out
