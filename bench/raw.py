"""The raw baseline: fetch every URL of a manifest in parallel and sha256 it.

No mirror logic: no pages, no state, no planning.  ``concurrency`` streams
on one pooled httpx client under trio, the same stack and the same number of
workers as the mirror.  With ``--disk DIR`` each file is also written to a
temp file, fsynced and renamed (one thread hop per file), which is the floor
any durable mirror pays on this disk.

``--client lean`` swaps httpx for the mirror's own file client
(``mirror.upstream.files.FilePool``: h11 over trio sockets), and with
``--disk`` writes each file without an fsync and makes them all durable with
one ``syncfs`` at the end: the cheapest Python path this project has, with
the durability a batch barrier gives and no mirror logic at all.  Run in two
processes (``--shard``), it is the floor of a Python mirror on two cores.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import trio

CHUNK = 256 * 1024


def _store(directory: Path, n: int, chunks: list[bytes]) -> None:
    tmp = directory / f"{n}.part"
    with open(tmp, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())
    final = directory / f"{n}"
    os.replace(tmp, final)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(directory: Path, n: int, chunks: list[bytes]) -> None:
    with open(directory / f"{n}", "wb") as f:
        for c in chunks:
            f.write(c)


def _syncfs(directory: Path) -> None:
    from mirror.publish.tree import sync_filesystem

    sync_filesystem(directory)


Stream = Callable[[str], AbstractAsyncContextManager[tuple[int, AsyncIterator[bytes]]]]


async def _fetch_each(stream: Stream, manifest: list[tuple[str, int, str]], *, concurrency: int,
                      store: Callable[[int, list[bytes]], None] | None) -> dict[str, float]:
    """``concurrency`` workers over the manifest: stream, hash, and ``store``
    the chunks (in a thread) when given."""
    total = bad = 0
    todo = iter(enumerate(manifest))

    async def worker() -> None:
        nonlocal total, bad
        for n, (path, size, sha) in todo:
            h = hashlib.sha256()
            chunks: list[bytes] = []
            async with stream(path) as (status, body):
                async for chunk in body:
                    h.update(chunk)
                    if store is not None:
                        chunks.append(chunk)
            if status != 200 or h.hexdigest() != sha:
                bad += 1
            total += size
            if store is not None:
                await trio.to_thread.run_sync(store, n, chunks)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    return {"files": len(manifest), "bytes": total, "bad": bad, "wall": time.perf_counter() - t0}


async def fetch_lean(base: str, manifest: list[tuple[str, int, str]], *, concurrency: int,
                     disk: Path | None) -> dict[str, float]:
    from mirror.upstream.files import FilePool
    from mirror.upstream.transport import tls_context

    pool = FilePool(ssl_context=tls_context(), user_agent="bench", timeout=60, allow_http=True)

    @asynccontextmanager
    async def stream(path: str) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
        async with pool.stream(base + path) as r:
            yield r.status, r.chunks()

    t0 = time.perf_counter()
    out = await _fetch_each(stream, manifest, concurrency=concurrency,
                            store=functools.partial(_write, disk) if disk is not None else None)
    if disk is not None:
        await trio.to_thread.run_sync(_syncfs, disk)
    out["wall"] = time.perf_counter() - t0
    await pool.aclose()
    return out


async def fetch_all(base: str, manifest: list[tuple[str, int, str]], *, concurrency: int, disk: Path | None) -> dict[str, float]:
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

        @asynccontextmanager
        async def stream(path: str) -> AsyncIterator[tuple[int, AsyncIterator[bytes]]]:
            async with client.stream("GET", path) as r:
                yield r.status_code, r.aiter_bytes(CHUNK)

        return await _fetch_each(stream, manifest, concurrency=concurrency,
                                 store=functools.partial(_store, disk) if disk is not None else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.raw")
    p.add_argument("--url", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--disk", help="also write+fsync+rename each file into this directory")
    p.add_argument("--client", choices=("httpx", "lean"), default="httpx")
    p.add_argument("--shard", default="0/1", help="K/N: only every N-th URL, starting at the K-th")
    args = p.parse_args(argv)
    k, n = (int(x) for x in args.shard.split("/"))
    manifest = [tuple(x) for x in json.loads(Path(args.manifest).read_bytes())][k::n]
    disk = Path(args.disk) if args.disk else None
    if disk is not None:
        disk.mkdir(parents=True, exist_ok=True)
    fetch = fetch_lean if args.client == "lean" else fetch_all
    result = trio.run(lambda: fetch(args.url, manifest, concurrency=args.concurrency, disk=disk))
    print(json.dumps(result), flush=True)
    return 0 if not result["bad"] else 1


if __name__ == "__main__":
    sys.exit(main())
