"""`mirror.fetch.downloader.Downloader` with a MockTransport and a real `Tree`."""

from __future__ import annotations

import gc
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio

from mirror.config import UpstreamConfig
from mirror.fetch.downloader import Downloader
from mirror.errors import DownloadError, HashMismatch, SizeMismatch
from mirror.metrics import Metrics
from mirror.publish.tree import FileTree
from mirror.upstream.files import HttpxFiles
from mirror.layout import Layout

URL = "https://files.test/packages/ab/cd/demo-1.0.tar.gz"
BODY = b"hello, mirror\n" * 100
SHA = hashlib.sha256(BODY).hexdigest()
CFG = UpstreamConfig(url="https://up.test", user_agent="t (a@b.c)", backoff=0.0, retries=2)

# The downloader closes its body iterator, but a MockTransport fed by a
# test's own endless async generator leaves that generator (and httpx's
# wrappers around it) unexhausted; trio warns when they are collected.  Real
# connections (see test_sync / the fault tests) do not warn.
AGEN_GC = pytest.mark.filterwarnings("ignore:Async generator .* was garbage collected:ResourceWarning")


async def no_sleep(_: float) -> None:
    return None


class Env:
    def __init__(self, tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response],
                 cfg: UpstreamConfig = CFG) -> None:
        self.tree = FileTree.at(Layout(tmp_path / "mirror"))
        self.tree.prepare()
        self.metrics = Metrics()
        self.requests: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return handler(request)

        self.client = httpx.AsyncClient(transport=httpx.MockTransport(record))
        self.dl = Downloader(HttpxFiles(self.client), self.tree.tmp, cfg=cfg, metrics=self.metrics,
                             limiter=trio.CapacityLimiter(4), sleep=no_sleep)

    def errors(self, reason: str) -> float:
        v = self.metrics.registry.get_sample_value("mirror_download_errors_total", {"reason": reason})
        assert v is not None
        return v

    def counter(self, name: str) -> float:
        v = self.metrics.registry.get_sample_value(name, {})
        assert v is not None
        return v

    def temps(self) -> list[str]:
        return sorted(os.listdir(self.tree.tmp))


def ok(body: bytes = BODY) -> Callable[[httpx.Request], httpx.Response]:
    return lambda r: httpx.Response(200, content=body)


async def test_success_writes_verified_temp(tmp_path: Path) -> None:
    env = Env(tmp_path, ok())
    v = await env.dl.fetch(URL, sha256=SHA, size=len(BODY))
    assert v.size == len(BODY)
    assert v.sha256 == SHA
    assert v.tmp.parent == env.tree.tmp
    assert v.tmp.read_bytes() == BODY
    assert env.temps() == [v.tmp.name]
    assert not any(env.tree.web.iterdir())  # the downloader never touches web/
    assert env.counter("mirror_files_downloaded_total") == 1
    assert env.counter("mirror_bytes_downloaded_total") == len(BODY)
    assert [str(r.url) for r in env.requests] == [URL]


async def test_success_without_expected_hash_or_size(tmp_path: Path) -> None:
    env = Env(tmp_path, ok())
    v = await env.dl.fetch(URL, sha256=None, size=None)
    assert (v.size, v.sha256) == (len(BODY), SHA)
    assert v.tmp.read_bytes() == BODY


async def test_large_body_spanning_several_flushes(tmp_path: Path) -> None:
    body = os.urandom(3 * (1 << 20) + 123)

    async def stream() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 100_000):
            yield body[i:i + 100_000]

    env = Env(tmp_path, lambda r: httpx.Response(200, content=stream()))
    v = await env.dl.fetch(URL, sha256=hashlib.sha256(body).hexdigest(), size=len(body))
    assert v.tmp.read_bytes() == body


async def test_empty_file(tmp_path: Path) -> None:
    env = Env(tmp_path, ok(b""))
    v = await env.dl.fetch(URL, sha256=hashlib.sha256(b"").hexdigest(), size=0)
    assert v.size == 0
    assert v.tmp.read_bytes() == b""


async def test_hash_mismatch_retried_then_raised(tmp_path: Path) -> None:
    env = Env(tmp_path, ok(b"x" * len(BODY)))
    with pytest.raises(HashMismatch) as ei:
        await env.dl.fetch(URL, sha256=SHA, size=len(BODY))
    assert ei.value.expected == SHA
    assert ei.value.actual == hashlib.sha256(b"x" * len(BODY)).hexdigest()
    assert ei.value.reason == "hash_mismatch"
    assert len(env.requests) == CFG.retries + 1
    assert env.errors("hash_mismatch") == CFG.retries + 1
    assert env.errors("size_mismatch") == 0
    assert env.counter("mirror_files_downloaded_total") == 0
    assert env.temps() == []


async def test_hash_mismatch_then_good(tmp_path: Path) -> None:
    bodies = iter([b"y" * len(BODY), BODY])
    env = Env(tmp_path, lambda r: httpx.Response(200, content=next(bodies)))
    v = await env.dl.fetch(URL, sha256=SHA, size=len(BODY))
    assert v.tmp.read_bytes() == BODY
    assert env.errors("hash_mismatch") == 1
    assert env.temps() == [v.tmp.name]


@AGEN_GC
async def test_body_longer_than_declared_size(tmp_path: Path) -> None:
    env = Env(tmp_path, ok(BODY + b"extra"))
    with pytest.raises(SizeMismatch) as ei:
        await env.dl.fetch(URL, sha256=None, size=len(BODY))
    assert ei.value.expected == len(BODY)
    assert ei.value.actual > len(BODY)
    assert env.errors("size_mismatch") == CFG.retries + 1
    assert env.temps() == []
    del ei
    gc.collect()


@AGEN_GC
async def test_oversized_stream_is_cut_off(tmp_path: Path) -> None:
    sent = {"chunks": 0}

    async def endless() -> AsyncIterator[bytes]:
        for _ in range(1000):
            sent["chunks"] += 1
            yield b"z" * 65536

    env = Env(tmp_path, lambda r: httpx.Response(200, content=endless()), replace(CFG, retries=0))
    with pytest.raises(SizeMismatch):
        await env.dl.fetch(URL, sha256=None, size=100_000)
    assert sent["chunks"] < 10  # stopped right after size + 1, not at the end of the body
    assert env.temps() == []
    gc.collect()


async def test_body_shorter_than_declared_size(tmp_path: Path) -> None:
    env = Env(tmp_path, ok(BODY[:-10]))
    with pytest.raises(DownloadError) as ei:
        await env.dl.fetch(URL, sha256=SHA, size=len(BODY))
    # A complete HTTP body of the wrong size failed verification; only a
    # connection cut mid-body is "truncated" (tests/test_faults.py).
    assert type(ei.value) is SizeMismatch
    assert ei.value.reason == "size_mismatch"
    assert env.errors("size_mismatch") == CFG.retries + 1
    assert env.errors("truncated") == 0 and env.errors("hash_mismatch") == 0
    assert env.temps() == []


async def test_500_then_200(tmp_path: Path) -> None:
    statuses = iter([500])

    def handler(request: httpx.Request) -> httpx.Response:
        s = next(statuses, None)
        return httpx.Response(s) if s is not None else httpx.Response(200, content=BODY)

    env = Env(tmp_path, handler)
    v = await env.dl.fetch(URL, sha256=SHA, size=len(BODY))
    assert v.tmp.read_bytes() == BODY
    assert len(env.requests) == 2
    assert env.errors("http_status") == 1
    assert env.temps() == [v.tmp.name]


async def test_500_forever(tmp_path: Path) -> None:
    env = Env(tmp_path, lambda r: httpx.Response(500))
    with pytest.raises(DownloadError) as ei:
        await env.dl.fetch(URL, sha256=SHA, size=len(BODY))
    assert (ei.value.reason, ei.value.detail) == ("http_status", "HTTP 500")
    assert len(env.requests) == CFG.retries + 1
    assert env.temps() == []


async def test_404_gives_up_early(tmp_path: Path) -> None:
    env = Env(tmp_path, lambda r: httpx.Response(404), replace(CFG, retries=5))
    with pytest.raises(DownloadError, match="HTTP 404"):
        await env.dl.fetch(URL, sha256=SHA, size=len(BODY))
    assert len(env.requests) == 2
    assert env.temps() == []


async def test_connection_error(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    env = Env(tmp_path, handler)
    with pytest.raises(DownloadError) as ei:
        await env.dl.fetch(URL, sha256=SHA, size=len(BODY))
    assert ei.value.reason == "connection"
    assert env.errors("connection") == CFG.retries + 1
    assert env.temps() == []


async def test_read_timeout(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    env = Env(tmp_path, handler, replace(CFG, retries=0))
    with pytest.raises(DownloadError) as ei:
        await env.dl.fetch(URL, sha256=SHA, size=len(BODY))
    assert ei.value.reason == "timeout"
    assert env.errors("timeout") == 1
    assert env.temps() == []


async def test_no_temps_left_after_mixed_failures(tmp_path: Path) -> None:
    seq = iter([
        httpx.Response(503),
        httpx.Response(200, content=b"short"),
        httpx.Response(200, content=b"q" * len(BODY)),
    ])
    env = Env(tmp_path, lambda r: next(seq))
    with pytest.raises(HashMismatch):
        await env.dl.fetch(URL, sha256=SHA, size=len(BODY))
    assert env.errors("http_status") == 1
    assert env.errors("size_mismatch") == 1
    assert env.errors("hash_mismatch") == 1
    assert env.temps() == []


async def test_no_temp_left_after_large_body_fails(tmp_path: Path) -> None:
    # Over FLUSH_BYTES, so bytes reach the temp file before the hash check fails.
    during: list[list[str]] = []

    async def stream() -> AsyncIterator[bytes]:
        for _ in range(48):
            yield b"w" * 65536
        during.append(os.listdir(env.tree.tmp))  # after ~3 MB: a temp exists

    env = Env(tmp_path, lambda r: httpx.Response(200, content=stream()), replace(CFG, retries=1))
    with pytest.raises(HashMismatch):
        await env.dl.fetch(URL, sha256=SHA, size=48 * 65536)
    assert [len(d) for d in during] == [1, 1]
    assert during[0] != during[1]  # a fresh temp per attempt
    assert env.temps() == []
