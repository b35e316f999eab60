"""``python -m bench``: run the scenarios, print a table, write JSON results."""

from __future__ import annotations

import argparse
import json
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.upstream import NGINX, have_nginx

RESULTS = Path(__file__).resolve().parent / "results"
KB = 1000
MB = 1e6


def _mb(n: float) -> str:
    return f"{n / MB:.1f} MB"


def _ms(s: float) -> str:
    return f"{s * 1000:.0f} ms"


def targets(res: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(what, measured, target, met) for every target the run can judge."""
    rows: list[tuple[str, str, str, bool]] = []
    s = res.get("sync")
    if s:
        big = s["corpus"]["files"] >= 8000 and s["corpus"]["sidecars"] > 0
        small = "" if big else " (corpus too small)"
        rows.append((f"first sync wall / curl (median of {s['rounds']})", f"{s['mirror/curl']:.2f}x",
                     "<= 2.00x" + small, s["mirror/curl"] <= 2.0 and big))
        if "mirror/bandersnatch" in s:
            rows.append((f"first sync wall / bandersnatch (median of {s['rounds']})",
                         f"{s['mirror/bandersnatch']:.2f}x", "<= 0.50x" + small,
                         s["mirror/bandersnatch"] <= 0.5 and big))
        per_file = s["mirror"]["cpu_ms_per_file"]
        rows.append(("first sync CPU per downloaded file, all processes", f"{per_file:.2f} ms", "<= 2.00 ms",
                     per_file <= 2.0))
        rows.append(("first sync peak RSS, all processes", _mb(s["mirror"]["peak_rss"]), "<= 120 MB",
                     s["mirror"]["peak_rss"] <= 120 * MB))
    sc = res.get("scale")
    if sc:
        nc, oc = sc["no_change"]["max"], sc["one_change"]["max"]
        at = f", {sc['projects'] // 1000}k projects"
        rows.append((f"no-change cycle CPU{at} (max)", _ms(nc["cpu"]), "<= 50 ms", nc["cpu"] <= 0.05))
        rows.append((f"no-change upstream traffic{at} (max)", f"{nc['upstream_bytes'] / KB:.1f} KB", "<= 10 KB",
                     nc["upstream_bytes"] <= 10 * KB))
        rows.append((f"one-change cycle wall{at} (max)", _ms(oc["wall"]), "<= 200 ms + transfer", oc["wall"] <= 0.2))
        rows.append((f"one-change cycle CPU{at} (max)", _ms(oc["cpu"]), "<= 200 ms", oc["cpu"] <= 0.2))
        rows.append((f"long-running RSS{at} (peak)", _mb(sc["peak_rss"]), "<= 80 MB", sc["peak_rss"] <= 80 * MB))
    r = res.get("root")
    if r:
        rows.append((f"root publish, {r['projects'] // 1000}k projects (max)", _ms(r["wall_max"]), "<= 2000 ms", r["wall_max"] <= 2))
    return rows


def print_table(res: dict[str, Any]) -> None:
    s = res.get("sync")
    if s:
        c = s["corpus"]
        print(f"\ninitial sync: {c['projects']} projects, {c['files']} files + {c['sidecars']} .metadata, "
              f"{_mb(c['bytes'])} (median file {c['median'] / 1000:.0f} KB, largest {_mb(c['largest'])}); "
              f"served by {s['server']}")
        print(f"medians of {s['rounds']} interleaved round(s); mirror sync with the default "
              f"download_processes = {s.get('download_processes', 0)}")
        print(f"{'':14} {'wall s':>8} {'files/s':>9} {'MB/s':>8} {'CPU s':>8} {'CPU/file':>9} {'peak RSS':>10} "
              f"{'host CPU':>9}")
        for key, label in (("raw", "raw (httpx)"), ("curl", "curl+sha256sum"), ("bandersnatch", "bandersnatch"),
                           ("mirror", "mirror sync"), ("mirror_s3", "mirror -> S3"), ("raw_disk", "raw+disk"), ("raw_disk_2", "raw+disk x2"),
                           ("lean_disk_2", "lean+syncfs x2")):
            if key not in s:
                continue
            m = s[key]
            print(f"{label:14} {m['wall']:8.2f} {m['files_per_s']:9.0f} {m['mb_per_s']:8.1f} {m['cpu']:8.2f} "
                  f"{m['cpu_ms_per_file']:6.2f} ms {_mb(m['peak_rss']):>10} {m.get('host_busy', 0) * 100:8.0f}%")
        for n, x in enumerate(s["ratios"], 1):
            print(f"round {n}: " + ", ".join(f"{k} {v:.2f}x" for k, v in x.items()))
        print("median: " + ", ".join(f"{k} {s[k]:.2f}x" for k in s["ratios"][0]))
    cz = res.get("compression")
    if cz:
        print(f"\ncompression: {cz['projects']} projects; root {_mb(cz['root_raw_bytes'])} raw")
        for key in ("identity", "gzip"):
            c = cz[key]
            print(f"  {key:9} root + XML-RPC listing: {_mb(c['wire_bytes'])} on the wire "
                  f"(decoded: root {_mb(c['decoded_root'])}, listing {_mb(c['decoded_xmlrpc'])})")
        print(f"  gzip saves {_mb(cz['saved_bytes'])} ({(1 - cz['ratio']) * 100:.0f}%)")
    sc = res.get("scale")
    if sc:
        print(f"\nscale: {sc['projects']} projects pre-seeded, seeded in {sc['seed_s']:.1f}s, "
              f"xmlrpc_interval={sc['xmlrpc_interval']}, one process")
        print(f"{'':22} {'cycles':>6} {'wall ms':>8} {'CPU ms':>8} {'requests':>8} {'up KB':>7} {'down KB':>8}")
        for key in ("no_change", "one_change"):
            for stat in ("median", "max"):
                m = sc[key][stat]
                print(f"{key + ' ' + stat:22} {sc[key]['cycles']:6} {m['wall'] * 1000:8.1f} {m['cpu'] * 1000:8.1f} "
                      f"{m['requests']:8.0f} {m['request_bytes'] / KB:7.1f} {m['response_bytes'] / KB:8.1f}")
        f = sc["first_cycle"]
        print(f"first cycle of the process (no change, one-time warm-up): wall {_ms(f['wall'])}, CPU {_ms(f['cpu'])}")
        print(f"RSS: start {_mb(sc['rss_start'])}, after all cycles {_mb(sc['rss_end'])}, peak {_mb(sc['peak_rss'])}")
    r = res.get("root")
    if r:
        print(f"\nroot publish: {r['projects']} projects: median {_ms(r['wall'])}, max {_ms(r['wall_max'])}, "
              f"CPU {_ms(r['cpu'])}, peak RSS {_mb(r['peak_rss'])}; "
              + ", ".join(f"{k} {_mb(v)}" for k, v in sorted(r["sizes"].items())))
    rows = targets(res)
    if rows:
        print(f"\n{'target':46} {'measured':>12}  {'goal':24} met")
        for what, got, goal, ok in rows:
            print(f"{what:46} {got:>12}  {goal:24} {'yes' if ok else 'NO'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("scenarios", nargs="*", metavar="{sync,scale,root,compression}",
                   help="which scenarios to run (default: all)")
    p.add_argument("--files", type=int, default=8570, help="distribution files in the sync corpus")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--workers", type=int, default=16, help="mirror workers = raw baseline concurrency")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the sync scenario")
    p.add_argument("--bandersnatch", metavar="PATH",
                   help="the bandersnatch binary of its own venv (Python >= 3.12), run on the same corpus")
    p.add_argument("--s3", choices=("moto", "radosgw"),
                   help="also sync the corpus into a bucket on this S3 server (started here), next to the disk run")
    p.add_argument("--floors", action="store_true",
                   help="also run raw+disk in one and two processes (write, fsync, rename; no mirror logic)")
    p.add_argument("--scale-projects", type=int, default=200_000)
    p.add_argument("--cycles", type=int, default=12, help="scale cycles, alternating no-change and one-change")
    p.add_argument("--root-projects", type=int, default=600_000)
    p.add_argument("--repeat", type=int, default=3, help="root publish repetitions")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run in about a minute")
    p.add_argument("--workdir", help="where corpora and mirrors go (default: a temp dir, removed after)")
    p.add_argument("--keep", action="store_true", help="keep corpora and mirror trees")
    p.add_argument("--output", help="JSON result file (default: bench/results/<time>.json)")
    args = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so nginx and the temp dir are cleaned up.
    signal.signal(signal.SIGTERM, _interrupt)
    if args.quick:
        args.files, args.scale_projects, args.root_projects, args.cycles, args.rounds = 600, 20_000, 60_000, 6, 1
    wanted = args.scenarios or ["sync", "scale", "root", "compression"]
    if set(wanted) - {"sync", "scale", "root", "compression"}:
        p.error(f"unknown scenario(s): {', '.join(sorted(set(wanted) - {'sync', 'scale', 'root', 'compression'}))}")
    res: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": {k: v for k, v in vars(args).items() if k not in ("output",)},
        "host": {"python": platform.python_version(), "cpus": __import__("os").cpu_count(),
                 "platform": platform.platform(), "nginx": _nginx_version()},
    }
    with tempfile.TemporaryDirectory(prefix="mirror-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        if "sync" in wanted:
            print(f"sync: generating {args.files} files ...", file=sys.stderr, flush=True)
            res["sync"] = scenarios.initial_sync(work, files=args.files, seed=args.seed, workers=args.workers, keep=args.keep,
                                                  rounds=max(1, args.rounds), bandersnatch=args.bandersnatch,
                                                  floors=args.floors, s3=args.s3)
        if "scale" in wanted:
            print(f"scale: seeding {args.scale_projects} projects ...", file=sys.stderr, flush=True)
            res["scale"] = scenarios.scale(work, projects=args.scale_projects, cycles=args.cycles,
                                           workers=args.workers, keep=args.keep)
        if "root" in wanted:
            print(f"root: seeding {args.root_projects} projects ...", file=sys.stderr, flush=True)
            res["root"] = scenarios.root_publish(work, projects=args.root_projects, repeat=args.repeat, keep=args.keep)
        if "compression" in wanted:
            print(f"compression: the root and the XML-RPC listing of {args.scale_projects} projects ...",
                  file=sys.stderr, flush=True)
            res["compression"] = scenarios.compression(work, projects=args.scale_projects)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
            work.rename(work.with_name(work.name + "-kept"))
            work.mkdir()
    res["targets"] = [{"what": w, "measured": m, "target": t, "met": ok} for w, m, t, ok in targets(res)]
    print_table(res)
    out = Path(args.output) if args.output else RESULTS / f"{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"\nresults: {out}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _nginx_version() -> str | None:
    if not have_nginx():
        return None
    r = subprocess.run([NGINX, "-v"], capture_output=True, text=True)
    return r.stderr.strip() or None


if __name__ == "__main__":
    sys.exit(main())
