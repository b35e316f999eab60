"""Rate limits: a 429/503 with Retry-After (or a RateLimit header) sets the
wait, capped at max_backoff, counted in mirror_upstream_throttled_total, and
costs no retry on the normal schedule."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from mirror.config import UpstreamConfig
from mirror.errors import DownloadError, UpstreamUnavailable
from mirror.fetch.downloader import Downloader
from mirror.layout import Layout
from mirror.metrics import Metrics
from mirror.publish.tree import FileTree
from mirror.upstream.client import Upstream
from mirror.upstream.files import HttpxFiles
from mirror.upstream.retry import RetryPolicy, throttle_wait
from tests.harness.consistency import check_tree
from tests.harness.e2e import make_config
from tests.harness.fakepypi import FakePyPI

BODY = b"rate limited bytes" * 50
SHA = hashlib.sha256(BODY).hexdigest()
URL = "https://files.test/packages/aa/bb/x-1.0.tar.gz"
# retries=0: any answer that burns a retry fails the request.
CFG = UpstreamConfig(url="https://up.test", user_agent="t (a@b.c)", backoff=0.0, retries=0, max_backoff=30)


def headers(retry_after: str | None, ratelimit: str | None):  # type: ignore[no-untyped-def]
    return {"retry-after": retry_after, "ratelimit": ratelimit}.get


def test_throttle_wait_reads_both_header_forms() -> None:
    now = 1_000_000.0
    assert throttle_wait(429, headers("7", None), now=now) == 7
    date = format_datetime(datetime.fromtimestamp(now, UTC) + timedelta(seconds=42), usegmt=True)
    assert throttle_wait(503, headers(date, None), now=now) == pytest.approx(42, abs=1)
    assert throttle_wait(429, headers("Wed, 21 Oct 2015 07:28:00 GMT", None), now=2e9) == 0  # in the past
    assert throttle_wait(500, headers("7", None), now=now) is None, "only 429 and 503"
    assert throttle_wait(429, headers("soon", None), now=now) is None
    assert throttle_wait(429, headers(None, "limit=100, remaining=0, reset=12"), now=now) == 12
    assert throttle_wait(429, headers(None, '"default";r=0;t=9'), now=now) == 9
    # A 200-like answer with quota left is no throttle; with none left it is.
    assert throttle_wait(404, headers(None, "limit=100, remaining=5, reset=12"), now=now) is None
    assert throttle_wait(404, headers(None, "limit=100, remaining=0, reset=12"), now=now) == 12
    p = RetryPolicy(retries=2, backoff=1, max_backoff=30)
    assert p.throttle_delay(3600) == 30 and p.throttle_delay(-5) == 0


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def throttled(n: int, headers: dict[str, str], status: int = 429):  # type: ignore[no-untyped-def]
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) <= n:
            return httpx.Response(status, headers=headers)
        return httpx.Response(200, content=BODY)
    return handler, seen


async def test_a_download_waits_as_asked_and_keeps_its_retries(tmp_path: Path) -> None:
    tree = FileTree.at(Layout(tmp_path / "m"))
    tree.prepare()
    metrics, sleeps = Metrics(), Sleeps()
    handler, seen = throttled(3, {"Retry-After": "120"})
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    dl = Downloader(HttpxFiles(client), tree.tmp, cfg=CFG, metrics=metrics, limiter=trio.CapacityLimiter(2),
                    sleep=sleeps)
    v = await dl.fetch(URL, sha256=SHA, size=len(BODY))
    assert v.tmp.read_bytes() == BODY and len(seen) == 4
    assert sleeps.waits == [30, 30, 30], "Retry-After 120 capped at max_backoff"
    assert metrics.registry.get_sample_value("mirror_upstream_throttled_total", {"kind": "file"}) == 3
    assert metrics.registry.get_sample_value("mirror_download_errors_total", {"reason": "http_status"}) == 0
    # Without a hint, the same 429 is an ordinary failure: retries=0 gives up.
    handler, seen = throttled(1, {})
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    dl = Downloader(HttpxFiles(client), tree.tmp, cfg=CFG, metrics=metrics, limiter=trio.CapacityLimiter(2),
                    sleep=sleeps)
    with pytest.raises(DownloadError, match="HTTP 429"):
        await dl.fetch(URL, sha256=SHA, size=len(BODY))


async def test_a_server_that_always_says_later_is_bounded(tmp_path: Path) -> None:
    tree = FileTree.at(Layout(tmp_path / "m"))
    tree.prepare()
    metrics, sleeps = Metrics(), Sleeps()
    handler, seen = throttled(10_000, {"Retry-After": "1"}, status=503)
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    dl = Downloader(HttpxFiles(client), tree.tmp, cfg=CFG, metrics=metrics, limiter=trio.CapacityLimiter(2),
                    sleep=sleeps)
    with pytest.raises(DownloadError, match="HTTP 503"):
        await dl.fetch(URL, sha256=SHA, size=len(BODY))
    assert len(seen) == RetryPolicy.of(CFG).max_throttled + CFG.retries + 1


async def test_pages_and_the_feed_honour_ratelimit_headers() -> None:
    metrics, sleeps = Metrics(), Sleeps()
    handler, calls = throttled(1, {"RateLimit": "limit=10, remaining=0, reset=4"})
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    up = Upstream(client, CFG, metrics=metrics, sleep=sleeps)
    r = await up.request("GET", "https://up.test/simple/", kind="page")
    assert r.status == 200 and r.body == BODY and sleeps.waits == [4]
    assert metrics.registry.get_sample_value("mirror_upstream_throttled_total", {"kind": "page"}) == 1
    calls = []

    def always(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(503)  # no hint: the normal schedule, retries=0

    up = Upstream(httpx.AsyncClient(transport=httpx.MockTransport(always)), CFG, metrics=metrics, sleep=sleeps)
    with pytest.raises(UpstreamUnavailable):
        await up.request("GET", "https://up.test/simple/", kind="page")
    assert len(calls) == 1


@pytest.mark.slow
async def test_a_sync_through_429s_with_retry_after(upstream: FakePyPI, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The fake answers the first files and a page with 429 + Retry-After;
    with retries = 0 the sync still completes, in helpers and in-process."""
    from mirror.ops.compose import open_mirror
    from mirror.sync.cycle import Syncer

    monkeypatch.setattr(Syncer, "pool_min_projects", 0)
    for n in range(3):
        upstream.add_release(f"slow-{n}", "1.0")
    upstream.add_fault("status", match="/packages/", count=4, status=429, headers={"Retry-After": "1"})
    upstream.add_fault("status", match="/simple/slow-1/", count=1, status=503, headers={"Retry-After": "1"})
    for processes in (1, 0):
        m = tmp_path / f"m{processes}"
        cfg = make_config(upstream.url, m, upstream={"retries": 0, "max_backoff": 0.2},
                          mirror={"download_processes": processes})
        metrics = Metrics()
        async with open_mirror(cfg, metrics=metrics) as mirror:
            report = await mirror.syncer().sync_once()
        assert not report.failed, report.failed
        assert check_tree(m / "web") == []
        if processes:
            assert metrics.registry.get_sample_value("mirror_upstream_throttled_total", {"kind": "file"}) == 4
            assert metrics.registry.get_sample_value("mirror_upstream_throttled_total", {"kind": "page"}) == 1
        upstream.add_fault("status", match="/packages/", count=2, status=429, headers={"Retry-After": "1"})


async def test_under_the_autojump_clock_the_asked_waits_pass(tmp_path: Path,
                                                              autojump_clock: trio.testing.MockClock) -> None:
    """Real trio sleeps on a virtual clock: a file answered 429 + Retry-After
    twice, then a page answered 429 + RateLimit once, take exactly the
    waits they asked for, and retries = 0 is never used up.

    The clock jumps only after a real second with every task blocked: the
    downloader's writes are thread hops, and a jump during one would skip
    virtual time to the next deadline (the request's timeout)."""
    autojump_clock.autojump_threshold = 1.0
    tree = FileTree.at(Layout(tmp_path / "m"))
    tree.prepare()
    metrics = Metrics()
    handler, seen = throttled(2, {"Retry-After": "7"})
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    dl = Downloader(HttpxFiles(client), tree.tmp, cfg=CFG, metrics=metrics, limiter=trio.CapacityLimiter(2))
    t0 = trio.current_time()
    v = await dl.fetch(URL, sha256=SHA, size=len(BODY))
    assert trio.current_time() - t0 == pytest.approx(14)
    assert v.size == len(BODY) and len(seen) == 3

    page, _ = throttled(1, {"RateLimit": '"default";r=0;t=11'})
    up = Upstream(httpx.AsyncClient(transport=httpx.MockTransport(page)), CFG, metrics=metrics)
    t0 = trio.current_time()
    assert (await up.request("GET", "https://up.test/simple/x/", kind="page")).body == BODY
    assert trio.current_time() - t0 == pytest.approx(11)
    assert metrics.registry.get_sample_value("mirror_upstream_throttled_total", {"kind": "file"}) == 2
    assert metrics.registry.get_sample_value("mirror_upstream_throttled_total", {"kind": "page"}) == 1
