"""The one pooled ``httpx.AsyncClient`` runs over ``LeanTransport``: httpx
builds requests, follows redirects and decodes bodies; the lean pool carries
them (keep-alive, request bodies, the retry of a dropped idle connection,
faults raised as the httpx errors the retry policy classifies)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import httpx
import pytest
import trio

from mirror.metrics import Metrics
from mirror.model import NormalizedName
from mirror.upstream.client import Upstream
from mirror.upstream.files import LeanTransport
from mirror.upstream.retry import classify
from mirror.upstream.transport import open_client
from tests.harness.e2e import make_config
from tests.harness.fakepypi import FakePyPI
from tests.harness.rawhttp import read_request, serve


def lean(client: httpx.AsyncClient) -> LeanTransport:
    t = client._transport
    assert isinstance(t, LeanTransport)
    return t


async def test_pages_and_the_feed_share_few_keepalive_connections(upstream: FakePyPI, tmp_path: Path) -> None:
    for n in range(6):
        upstream.add_release(f"p{n}", "1.0")
    cfg = make_config(upstream.url, tmp_path / "m")
    async with open_client(cfg.upstream, workers=4, version="test") as client:
        up = Upstream(client, cfg.upstream, metrics=Metrics())
        assert await up.changelog_last_serial() == upstream.serial  # a POST with a body
        for n in range(6):
            snap = await up.project_page(NormalizedName(f"p{n}"), min_serial=0)
            assert [f.filename for f in snap.files] == upstream.filenames(f"p{n}")
        assert lean(client).pool.connections_opened == 1

        async def page(n: int) -> None:
            await up.project_page(NormalizedName(f"p{n % 6}"), min_serial=0)

        async with trio.open_nursery() as nursery:
            for n in range(12):
                nursery.start_soon(page, n)
        opened = lean(client).pool.connections_opened
        assert 1 < opened <= 13
        for n in range(6):
            await page(n)
        assert lean(client).pool.connections_opened == opened, "idle connections are reused"


async def test_request_heads_bodies_and_content_decoding(tmp_path: Path) -> None:
    seen: list[tuple[bytes, bytes]] = []
    page = json.dumps({"hello": "world" * 200}).encode()

    async def handler(stream: trio.SocketStream, n: int) -> None:
        while head := await read_request(stream):
            head, _, body = head.partition(b"\r\n\r\n")
            if m := re.search(rb"(?i)\r\ncontent-length: (\d+)", head):
                while len(body) < int(m[1]):
                    body += await stream.receive_some(65536)
            seen.append((head, body))
            if head.startswith(b"POST"):
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")
            else:
                z = gzip.compress(page)
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nX-PyPI-Last-Serial: 7\r\n"
                                      b"Content-Length: %d\r\n\r\n" % len(z) + z)

    cfg = make_config("http://127.0.0.1:1", tmp_path / "m")
    async with trio.open_nursery() as nursery, open_client(cfg.upstream, workers=2, version="9.9") as client:
        port = await serve(nursery, handler)
        r = await client.post(f"http://127.0.0.1:{port}/pypi", content=b"<xml/>" * 1000,
                              headers={"Content-Type": "text/xml"})
        assert (r.status_code, r.content) == (200, b"done")
        r = await client.get(f"http://127.0.0.1:{port}/simple/a/?x=1", headers={"Accept": "application/json"})
        assert r.content == page and r.headers["x-pypi-last-serial"] == "7"
        assert r.http_version == "HTTP/1.1"
        nursery.cancel_scope.cancel()
    assert lean(client).pool.connections_opened == 1
    (post, body), (get, _) = seen
    assert post.startswith(b"POST /pypi HTTP/1.1\r\n") and body == b"<xml/>" * 1000
    assert b"\r\nContent-Length: 6000" in post and b"\r\nUser-Agent: mirror/9.9 " in post
    assert get.startswith(b"GET /simple/a/?x=1 HTTP/1.1\r\n")
    assert b"\r\nAccept: application/json" in get and b"gzip" in get.lower()


async def test_redirects_are_httpx_s_and_a_dropped_idle_connection_is_retried(tmp_path: Path) -> None:
    heads: list[bytes] = []

    async def handler(stream: trio.SocketStream, n: int) -> None:
        head = await read_request(stream)
        heads.append(head)
        if head.startswith(b"GET /old"):
            await stream.send_all(b"HTTP/1.1 301 Moved\r\nLocation: /new\r\nContent-Length: 0\r\n\r\n")
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await stream.aclose()  # after every response, without saying Connection: close

    cfg = make_config("http://127.0.0.1:1", tmp_path / "m")
    async with trio.open_nursery() as nursery, open_client(cfg.upstream, workers=2, version="t") as client:
        port = await serve(nursery, handler)
        r = await client.get(f"http://127.0.0.1:{port}/old")
        assert (r.status_code, r.text, r.url.path) == (200, "ok", "/new")
        assert [h.split(b" ")[1] for h in heads] == [b"/old", b"/new"]
        for _ in range(3):
            assert (await client.get(f"http://127.0.0.1:{port}/x")).text == "ok"
        assert lean(client).pool.connections_opened == 5
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("kind", "params", "reason"),
                         [("reset", {}, "connection"), ("truncate", {}, "truncated"), ("slow", {"delay": 2.0}, "timeout")])
async def test_page_faults_raise_what_the_retry_policy_classifies(
    upstream: FakePyPI, tmp_path: Path, kind: str, params: dict[str, float], reason: str,
) -> None:
    upstream.add_release("alpha", "1.0")
    cfg = make_config(upstream.url, tmp_path / "m", upstream={"timeout": 0.5})
    upstream.add_fault(kind, match="/simple/alpha/", **params)
    async with open_client(cfg.upstream, workers=2, version="t") as client:
        with pytest.raises(httpx.TransportError) as e:
            r = await client.get(f"{upstream.url}/simple/alpha/")
            await r.aread()
        assert classify(e.value)[0] == reason
