"""`mirror.upstream.client.Upstream` against an in-process ``httpx.MockTransport``."""

from __future__ import annotations

import gc
import json
import xmlrpc.client
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest

from mirror.config import UpstreamConfig
from mirror.errors import (
    MalformedResponse,
    ProjectNotFound,
    StalePage,
    UpstreamError,
    UpstreamUnavailable,
)
from mirror.metrics import Metrics
from mirror.model import NormalizedName
from mirror.upstream.parse import JSON_TYPE
from mirror.upstream.client import Upstream

SHA = "0123456789abcdef" * 4
CFG = UpstreamConfig(url="https://up.test", user_agent="t (a@b.c)", backoff=0.0, xmlrpc_interval=0)
DEMO = NormalizedName("demo")

Handler = Callable[[httpx.Request], httpx.Response]

# Aborting a streamed body midway leaves httpx's internal async generators
# (aiter_bytes -> aiter_raw) unexhausted; trio warns when they are collected.
# Harmless (the response is closed by ``client.stream``), and not fixable by
# the caller, so tests that abort a stream collect garbage inside the test and
# ignore exactly this warning.
AGEN_GC = pytest.mark.filterwarnings("ignore:Async generator .* was garbage collected:ResourceWarning")


async def no_sleep(_: float) -> None:
    return None


class Recorder:
    """Wraps a handler and keeps every request it saw."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)


def make(handler: Handler, cfg: UpstreamConfig = CFG) -> tuple[Upstream, Recorder, Metrics]:
    rec = Recorder(handler)
    metrics = Metrics()
    client = httpx.AsyncClient(transport=httpx.MockTransport(rec))
    return Upstream(client, cfg, metrics=metrics, sleep=no_sleep), rec, metrics


def page(serial: int | None, *, name: str = "demo") -> httpx.Response:
    body = {
        "meta": {"api-version": "1.1"},
        "name": name,
        "files": [{
            "filename": "demo-1.0.tar.gz",
            "url": "https://files.test/packages/ab/cd/demo-1.0.tar.gz",
            "hashes": {"sha256": SHA},
        }],
    }
    headers = {"content-type": JSON_TYPE}
    if serial is not None:
        headers["x-pypi-last-serial"] = str(serial)
    return httpx.Response(200, headers=headers, content=json.dumps(body).encode())


def metric(m: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    v = m.registry.get_sample_value(name, labels or {})
    assert v is not None
    return v


# -- retries ---------------------------------------------------------------------


async def test_retry_on_503_then_success() -> None:
    statuses = iter([503, 503])

    def handler(request: httpx.Request) -> httpx.Response:
        s = next(statuses, None)
        return httpx.Response(s) if s is not None else page(10)

    up, rec, m = make(handler)
    snap = await up.project_page(DEMO, min_serial=10)
    assert snap.serial == 10
    assert len(rec.requests) == 3
    assert metric(m, "mirror_upstream_requests_total", {"kind": "page"}) == 3


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
async def test_retries_exhausted(status: int) -> None:
    up, rec, _ = make(lambda r: httpx.Response(status), replace(CFG, retries=3))
    with pytest.raises(UpstreamUnavailable, match=f"HTTP {status}"):
        await up.project_page(DEMO, min_serial=0)
    assert len(rec.requests) == 4


async def test_transport_error_retried() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            raise httpx.ConnectError("refused", request=request)
        if calls["n"] == 2:
            raise httpx.ReadTimeout("slow", request=request)
        return page(3)

    up, _, _ = make(handler)
    assert (await up.project_page(DEMO, min_serial=3)).serial == 3
    assert calls["n"] == 3


async def test_transport_error_exhausted() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    up, rec, _ = make(handler, replace(CFG, retries=2))
    with pytest.raises(UpstreamUnavailable, match="ConnectError"):
        await up.project_page(DEMO, min_serial=0)
    assert len(rec.requests) == 3


async def test_backoff_sleeps_between_attempts() -> None:
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)

    statuses = iter([500, 500])
    rec = Recorder(lambda r: httpx.Response(s) if (s := next(statuses, None)) else page(1))
    cfg = replace(CFG, backoff=1.0, max_backoff=60.0)
    up = Upstream(httpx.AsyncClient(transport=httpx.MockTransport(rec)), cfg, metrics=Metrics(), sleep=sleep)
    await up.project_page(DEMO, min_serial=1)
    assert len(slept) == 2
    # Full jitter in [0.5, 1.5) of 1, then of 2.
    assert 0.5 <= slept[0] < 1.5
    assert 1.0 <= slept[1] < 3.0


# -- stale pages -------------------------------------------------------------------


async def test_stale_then_fresh() -> None:
    serials = iter([5, 9])
    up, rec, m = make(lambda r: page(next(serials)))
    snap = await up.project_page(DEMO, min_serial=9)
    assert snap.serial == 9
    first, second = rec.requests
    assert first.url.query == b""
    assert str(first.url) == "https://up.test/simple/demo/"
    assert second.url.path == "/simple/demo/"
    assert second.url.query != b""
    assert b"cachebust" in second.url.query
    assert metric(m, "mirror_stale_pages_total") == 1


async def test_always_stale() -> None:
    cfg = replace(CFG, stale_retries=3)
    up, rec, m = make(lambda r: page(4), cfg)
    with pytest.raises(StalePage) as ei:
        await up.project_page(DEMO, min_serial=9)
    assert (ei.value.expected, ei.value.got) == (9, 4)
    assert len(rec.requests) == cfg.stale_retries + 1
    assert metric(m, "mirror_stale_pages_total") == cfg.stale_retries + 1
    # Every retry misses the cache with a distinct URL.
    assert len({str(r.url) for r in rec.requests}) == len(rec.requests)


async def test_page_without_serial_is_not_stale() -> None:
    up, rec, m = make(lambda r: page(None))
    snap = await up.project_page(DEMO, min_serial=9)
    assert snap.serial is None
    assert len(rec.requests) == 1
    assert metric(m, "mirror_stale_pages_total") == 0


# -- statuses and content types ---------------------------------------------------


@pytest.mark.parametrize("status", [404, 410])
async def test_not_found(status: int) -> None:
    up, rec, _ = make(lambda r: httpx.Response(status))
    with pytest.raises(ProjectNotFound):
        await up.project_page(DEMO, min_serial=1)
    assert len(rec.requests) == 1


async def test_other_4xx_not_retried() -> None:
    up, rec, _ = make(lambda r: httpx.Response(403))
    with pytest.raises(UpstreamUnavailable, match="403"):
        await up.project_page(DEMO, min_serial=1)
    assert len(rec.requests) == 1


async def test_request_headers() -> None:
    up, rec, _ = make(lambda r: page(1))
    await up.project_page(DEMO, min_serial=1)
    accept = rec.requests[0].headers["accept"]
    assert accept.startswith(JSON_TYPE)
    assert "text/html" in accept


async def test_html_content_type_parsed_as_pep503() -> None:
    html = (
        f'<html><body><a href="/packages/ab/demo-1.0.tar.gz#sha256={SHA}" data-requires-python="&gt;=3.9">'
        "demo-1.0.tar.gz</a></body></html>"
    ).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/html; charset=utf-8", "x-pypi-last-serial": "8"},
                              content=html)

    up, _, _ = make(handler)
    snap = await up.project_page(DEMO, min_serial=8)
    assert snap.serial == 8
    (f,) = snap.files
    assert f.url == "https://up.test/packages/ab/demo-1.0.tar.gz"
    assert f.requires_python == ">=3.9"


async def test_plain_json_content_type_parsed_as_json() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        r = page(2)
        return httpx.Response(200, headers={"content-type": "application/json", "x-pypi-last-serial": "2"},
                              content=r.content)

    up, _, _ = make(handler)
    assert [f.filename for f in (await up.project_page(DEMO, min_serial=2)).files] == ["demo-1.0.tar.gz"]


async def test_wrong_project_page_is_malformed() -> None:
    up, _, _ = make(lambda r: page(2, name="other"))
    with pytest.raises(MalformedResponse):
        await up.project_page(DEMO, min_serial=2)


async def test_oversize_body_declared() -> None:
    cfg = replace(CFG, max_page_bytes=1024)
    up, rec, m = make(lambda r: httpx.Response(200, headers={"content-type": JSON_TYPE}, content=b" " * 2048), cfg)
    with pytest.raises(MalformedResponse, match="max_page_bytes"):
        await up.project_page(DEMO, min_serial=0)
    assert len(rec.requests) == 1
    assert metric(m, "mirror_upstream_rejected_total", {"kind": "oversize"}) == 1


@AGEN_GC
async def test_oversize_body_streamed_without_length() -> None:
    async def body() -> Any:
        for _ in range(8):
            yield b" " * 512

    cfg = replace(CFG, max_page_bytes=1024)
    up, rec, m = make(lambda r: httpx.Response(200, headers={"content-type": JSON_TYPE}, content=body()), cfg)
    with pytest.raises(MalformedResponse, match="max_page_bytes"):
        await up.project_page(DEMO, min_serial=0)
    assert len(rec.requests) == 1
    assert metric(m, "mirror_upstream_rejected_total", {"kind": "oversize"}) == 1
    gc.collect()


async def test_body_at_cap_is_accepted() -> None:
    r = page(1)
    cfg = replace(CFG, max_page_bytes=len(r.content))
    up, _, _ = make(lambda req: page(1), cfg)
    assert (await up.project_page(DEMO, min_serial=1)).serial == 1


# -- XML-RPC ------------------------------------------------------------------------


def xmlrpc_response(value: Any) -> httpx.Response:
    body = xmlrpc.client.dumps((value,), methodresponse=True, allow_none=True).encode()
    return httpx.Response(200, headers={"content-type": "text/xml"}, content=body)


def xmlrpc_call(request: httpx.Request) -> tuple[tuple[Any, ...], str]:
    params, method = xmlrpc.client.loads(request.content)
    assert method is not None
    return params, method


async def test_changelog_since_pages_until() -> None:
    # 10 events with serials 1..10; the "server" returns at most 3 per call.
    journal = [[f"p{i % 4}", "1.0", 1000 + i, "new release", i] for i in range(1, 11)]
    asked: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "POST"
        assert request.url.path == "/pypi"
        params, method = xmlrpc_call(request)
        assert method == "changelog_since_serial"
        (since,) = params
        asked.append(since)
        return xmlrpc_response([row for row in journal if row[4] > since][:3])

    up, _, m = make(handler)
    events, pos = await up.changelog_since(0, until=7)
    assert asked == [0, 3, 6]
    assert [e.serial for e in events] == [1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert pos == 9
    assert metric(m, "mirror_upstream_requests_total", {"kind": "feed"}) == 3


async def test_changelog_since_stops_on_empty_page() -> None:
    asked: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        (since,), _ = xmlrpc_call(request)
        asked.append(since)
        return xmlrpc_response([["a", "1", 1, "create", 5]] if since < 5 else [])

    up, _, _ = make(handler)
    events, pos = await up.changelog_since(0, until=100)
    assert asked == [0, 5]
    assert pos == 5
    assert len(events) == 1


async def test_changelog_since_stops_when_upstream_makes_no_progress() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        assert calls["n"] < 10, "changelog_since keeps asking an upstream that makes no progress"
        return xmlrpc_response([["a", "1", 1, "create", 3]])

    up, _, _ = make(handler)
    events, pos = await up.changelog_since(3, until=100)
    assert pos == 3
    assert calls["n"] == 1
    assert events == []


async def test_changelog_since_nothing_to_do() -> None:
    up, rec, _ = make(lambda r: xmlrpc_response([]))
    assert await up.changelog_since(7, until=7) == ([], 7)
    assert rec.requests == []


async def test_changelog_last_serial_and_listing() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        _, method = xmlrpc_call(request)
        if method == "changelog_last_serial":
            return xmlrpc_response(1234)
        assert method == "list_packages_with_serial"
        return xmlrpc_response({"Demo": 5, "other": 9, "bad": "x"})

    up, _, _ = make(handler)
    assert await up.changelog_last_serial() == 1234
    assert await up.list_packages_with_serial() == {"Demo": 5, "other": 9}


@pytest.mark.parametrize("value", [-1, "12", True, None, [1]])
async def test_changelog_last_serial_malformed(value: Any) -> None:
    up, _, _ = make(lambda r: xmlrpc_response(value))
    with pytest.raises(MalformedResponse):
        await up.changelog_last_serial()


async def test_xmlrpc_fault() -> None:
    fault = xmlrpc.client.dumps(xmlrpc.client.Fault(-32500, "RuntimeError: too many requests"),
                                methodresponse=True).encode()
    up, rec, _ = make(lambda r: httpx.Response(200, headers={"content-type": "text/xml"}, content=fault))
    with pytest.raises(UpstreamError, match="too many requests") as ei:
        await up.changelog_last_serial()
    assert type(ei.value) is UpstreamError
    assert len(rec.requests) == 1


@pytest.mark.parametrize(
    "body",
    [
        b"not xml at all",
        b"<methodResponse><params><param><value><int>1",
        b"<?xml version='1.0'?><foo/>",
        b"<html><body>Service Unavailable</body></html>",
        b"",
        b"<methodResponse><params></params></methodResponse>",
        b"<methodResponse><params><param><value><int>x</int></value></param></params></methodResponse>",
    ],
)
async def test_xmlrpc_malformed(body: bytes) -> None:
    up, _, m = make(lambda r: httpx.Response(200, headers={"content-type": "text/xml"}, content=body))
    with pytest.raises(MalformedResponse):
        await up.changelog_last_serial()
    assert metric(m, "mirror_upstream_rejected_total", {"kind": "malformed"}) == 1


async def test_xmlrpc_non_200_is_unavailable() -> None:
    up, _, _ = make(lambda r: httpx.Response(400))
    with pytest.raises(UpstreamUnavailable):
        await up.changelog_last_serial()


# -- root index ---------------------------------------------------------------------


async def test_root_index_etag() -> None:
    body = json.dumps({"meta": {"api-version": "1.0", "_last-serial": 50},
                       "projects": [{"name": "Demo", "_last-serial": 50}, {"name": "../x"}]}).encode()

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/simple/"
        assert request.headers["accept"] == JSON_TYPE
        if request.headers.get("if-none-match") == '"v1"':
            return httpx.Response(304)
        return httpx.Response(200, headers={"content-type": JSON_TYPE, "etag": '"v1"'}, content=body)

    up, rec, _ = make(handler)
    res = await up.root_index(None)
    assert res is not None
    entries, serial, etag, rejected = res
    assert [(e.name, e.serial) for e in entries] == [("demo", 50)]
    assert serial == 50
    assert etag == '"v1"'
    assert len(rejected) == 1
    assert "if-none-match" not in rec.requests[0].headers

    assert await up.root_index('"v1"') is None
    assert rec.requests[1].headers["if-none-match"] == '"v1"'


async def test_root_index_not_json() -> None:
    up, _, _ = make(lambda r: httpx.Response(200, headers={"content-type": "text/html"}, content=b"<html></html>"))
    with pytest.raises(MalformedResponse):
        await up.root_index(None)


async def test_root_index_404_is_unavailable() -> None:
    up, _, _ = make(lambda r: httpx.Response(404))
    with pytest.raises(UpstreamUnavailable):
        await up.root_index(None)


async def test_pages_the_root_and_xmlrpc_ask_for_gzip_and_cap_the_decoded_size() -> None:
    """The root of 600k projects is tens of MB raw, a few MB gzipped: the
    one client asks for gzip (every request through it: feed, pages, root),
    and ``max_page_bytes`` caps what it decodes, not what it was sent."""
    import gzip as gz

    from mirror.errors import MalformedResponse
    from mirror.upstream.transport import open_client

    cfg = UpstreamConfig(url="https://up.test", user_agent="t (a@b.c)", max_page_bytes=1024 * 1024)
    real = open_client(cfg, workers=1, version="t")
    assert "gzip" in real.headers["accept-encoding"]
    await real.aclose()
    seen: list[str] = []
    big = b"x" * (2 * 1024 * 1024)  # 2 MB decoded, a few KB on the wire

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("accept-encoding", ""))
        body = b"small page" if request.url.path == "/ok" else big
        return httpx.Response(200, content=gz.compress(body), headers={"Content-Encoding": "gzip"})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler), headers={"Accept-Encoding": "gzip"})
    up = Upstream(client, cfg, metrics=Metrics())
    r = await up.request("GET", "https://up.test/ok", kind="page")
    assert r.body == b"small page"
    with pytest.raises(MalformedResponse, match="max_page_bytes"):
        await up.request("GET", "https://up.test/bomb", kind="page")
    assert seen == ["gzip", "gzip"]
