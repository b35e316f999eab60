"""`mirror.upstream.files.FilePool`, the lean file client: keep-alive reuse,
the fake upstream's faults, chunked and close-delimited bodies, a server
that drops idle connections, redirects, TLS and CONNECT proxies."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import trio

from mirror.upstream.files import FilePool
from mirror.upstream.proxy import rules as proxy_rules
from mirror.upstream.retry import classify
from tests.harness.fakepypi import FakePyPI
from tests.harness.rawhttp import read_request, serve
from tests.harness.reliability import upstream_files
from tests.harness.tls import make_ca


def pool(*, timeout: float = 5.0, allow_http: bool = True, ctx: ssl.SSLContext | None = None,
         proxy: str | None = None, max_redirects: int = 5) -> FilePool:
    return FilePool(ssl_context=ctx or ssl.create_default_context(), user_agent="mirror-tests (t@example.org)",
                    timeout=timeout, allow_http=allow_http, max_redirects=max_redirects,
                    rules=proxy_rules(proxy, {}) if proxy else None)


async def get(p: FilePool, url: str) -> tuple[int, bytes]:
    async with p.stream(url) as r:
        return r.status, b"".join([c async for c in r.chunks()])


def one_file(up: FakePyPI) -> tuple[str, bytes]:
    up.add_release("alpha", "1.0")
    rel, data = next((r, b) for r, b in upstream_files(up).items() if r.endswith(".whl"))
    return f"{up.files_url}/{rel}", data


async def test_many_files_over_few_keepalive_connections(upstream: FakePyPI) -> None:
    url, data = one_file(upstream)
    p = pool()
    for _ in range(30):
        assert await get(p, url) == (200, data)
    assert p.connections_opened == 1

    async def fetch() -> None:
        assert await get(p, url) == (200, data)

    async with trio.open_nursery() as nursery:
        for _ in range(40):
            nursery.start_soon(fetch)
    assert p.connections_opened <= 41
    before = p.connections_opened
    for _ in range(10):
        await get(p, url)
    assert p.connections_opened == before, "idle connections are reused"
    await p.aclose()


@pytest.mark.parametrize(
    ("kind", "params", "reason"),
    [
        ("reset", {}, "connection"),
        ("truncate", {}, "truncated"),
        ("slow", {"delay": 2.0}, "timeout"),
    ],
)
async def test_faults_raise_what_the_retry_policy_classifies(
    upstream: FakePyPI, kind: str, params: dict[str, float], reason: str
) -> None:
    url, _ = one_file(upstream)
    upstream.add_fault(kind, match="/packages/", **params)
    p = pool(timeout=0.5)
    with pytest.raises(httpx.TransportError) as e:
        await get(p, url)
    assert classify(e.value)[0] == reason
    await p.aclose()


async def test_status_and_corrupt_bytes_are_answers_not_errors(upstream: FakePyPI) -> None:
    url, data = one_file(upstream)
    p = pool()
    upstream.add_fault("status", match="/packages/", count=1, code=503)
    status, _ = await get(p, url)
    assert status == 503
    upstream.add_fault("corrupt", match="/packages/", count=1)
    status, body = await get(p, url)
    assert status == 200 and body != data and len(body) == len(data)
    assert await get(p, url) == (200, data)
    await p.aclose()


async def test_a_body_left_unread_closes_its_connection(upstream: FakePyPI) -> None:
    url, data = one_file(upstream)
    p = pool()
    async with p.stream(url) as r:
        assert r.status == 200  # and nothing read
    assert await get(p, url) == (200, data)
    assert p.connections_opened == 2
    await p.aclose()


# -- a raw server for what the fake upstream does not do --------------------------------


async def test_chunked_and_close_delimited_bodies() -> None:
    body = b"x" * 100_000

    async def handler(stream: trio.SocketStream, n: int) -> None:
        req = await read_request(stream)
        if b"GET /chunked" in req:
            out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            for i in range(0, len(body), 7000):
                part = body[i:i + 7000]
                out += f"{len(part):x}\r\n".encode() + part + b"\r\n"
            await stream.send_all(out + b"0\r\n\r\n")
            await read_request(stream)  # keep-alive: the next request comes here
        else:
            await stream.send_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        port = await serve(nursery, handler)
        p = pool()
        assert await get(p, f"http://127.0.0.1:{port}/chunked") == (200, body)
        assert await get(p, f"http://127.0.0.1:{port}/close") == (200, body)
        assert await get(p, f"http://127.0.0.1:{port}/close") == (200, body)
        assert p.connections_opened == 3, "a Connection: close response is never reused"
        await p.aclose()
        nursery.cancel_scope.cancel()


async def test_a_server_that_drops_idle_connections_costs_one_retry_not_an_error() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await stream.aclose()  # without saying Connection: close

    async with trio.open_nursery() as nursery:
        port = await serve(nursery, handler)
        p = pool()
        for _ in range(5):
            assert await get(p, f"http://127.0.0.1:{port}/f") == (200, b"ok")
        assert p.connections_opened == 5
        await p.aclose()
        nursery.cancel_scope.cancel()


async def test_a_fresh_connection_that_fails_is_not_retried() -> None:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        await read_request(stream)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        port = await serve(nursery, handler)
        p = pool()
        with pytest.raises(httpx.RemoteProtocolError):
            await get(p, f"http://127.0.0.1:{port}/f")
        assert p.connections_opened == 1
        nursery.cancel_scope.cancel()


async def test_redirects_are_followed_to_a_limit(upstream: FakePyPI) -> None:
    url, data = one_file(upstream)
    path = url[len(upstream.files_url):]
    upstream.add_raw_route("/packages/source/a/alpha/one", 302, headers={"Location": "/packages/source/a/alpha/two"})
    upstream.add_raw_route("/packages/source/a/alpha/two", 301, headers={"Location": f"{upstream.files_url}{path}"})
    upstream.add_raw_route("/loop", 302, headers={"Location": "/loop"})
    upstream.add_raw_route("/elsewhere", 302, headers={"Location": "ftp://127.0.0.1/x"})
    p = pool(max_redirects=3)
    assert await get(p, f"{upstream.url}/packages/source/a/alpha/one") == (200, data)
    with pytest.raises(httpx.TooManyRedirects):
        await get(p, f"{upstream.url}/loop")
    with pytest.raises(httpx.UnsupportedProtocol):
        await get(p, f"{upstream.url}/elsewhere")
    assert len(upstream.requests_matching("/loop")) == 4
    await p.aclose()


async def test_plain_http_is_refused_unless_allowed(upstream: FakePyPI) -> None:
    url, _ = one_file(upstream)
    with pytest.raises(httpx.UnsupportedProtocol):
        await get(pool(allow_http=False), url)


# -- TLS and proxies ------------------------------------------------------------------


async def tls_server(nursery: trio.Nursery, cert: Path, key: Path, body: bytes) -> int:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)

    async def handler(raw: trio.SocketStream, n: int) -> None:
        stream = trio.SSLStream(raw, ctx, server_side=True)
        try:
            while await read_request(stream):
                await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        except trio.BrokenResourceError:
            pass

    return await serve(nursery, handler)


async def test_tls_uses_the_trust_it_is_given(tmp_path: Path) -> None:
    ca, cert, key = make_ca(tmp_path)
    body = b"wheel bytes" * 1000
    async with trio.open_nursery() as nursery:
        port = await tls_server(nursery, cert, key, body)
        url = f"https://127.0.0.1:{port}/packages/f.whl"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await get(pool(allow_http=False), url)
        trusted = pool(allow_http=False, ctx=ssl.create_default_context(cafile=str(ca)))
        for _ in range(3):
            assert await get(trusted, url) == (200, body)
        assert trusted.connections_opened == 1
        await trusted.aclose()
        nursery.cancel_scope.cancel()


async def connect_proxy(nursery: trio.Nursery, seen: list[bytes], *, auth: bytes | None = None) -> int:
    """A forward proxy that only speaks CONNECT, and logs each request head."""

    async def handler(client: trio.SocketStream, n: int) -> None:
        head = await read_request(client)
        seen.append(head)
        if auth is not None and b"Proxy-Authorization: Basic " + auth not in head:
            await client.send_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            return
        host, _, port = head.split(b" ")[1].decode().rpartition(":")
        upstream = await trio.open_tcp_stream(host, int(port))
        await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pump(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
            try:
                while data := await a.receive_some(65536):
                    await b.send_all(data)
            except trio.BrokenResourceError:
                pass
            await b.aclose()

        async with trio.open_nursery() as inner:
            inner.start_soon(pump, client, upstream)
            inner.start_soon(pump, upstream, client)

    return await serve(nursery, handler)


async def test_https_through_a_connect_proxy_with_credentials(tmp_path: Path) -> None:
    ca, cert, key = make_ca(tmp_path)
    body = b"through the proxy"
    seen: list[bytes] = []
    async with trio.open_nursery() as nursery:
        port = await tls_server(nursery, cert, key, body)
        proxy_port = await connect_proxy(nursery, seen, auth=b"dXNlcjpwQHNz")  # user:p@ss
        ctx = ssl.create_default_context(cafile=str(ca))
        good = pool(allow_http=False, ctx=ctx, proxy=f"http://user:p%40ss@127.0.0.1:{proxy_port}")
        assert await get(good, f"https://127.0.0.1:{port}/f") == (200, body)
        assert await get(good, f"https://127.0.0.1:{port}/f") == (200, body)
        assert len(seen) == 1 and seen[0].startswith(f"CONNECT 127.0.0.1:{port} HTTP/1.1".encode())
        bad = pool(allow_http=False, ctx=ctx, proxy=f"http://127.0.0.1:{proxy_port}")
        with pytest.raises(httpx.ProxyError, match="407"):
            await get(bad, f"https://127.0.0.1:{port}/f")
        await good.aclose()
        await bad.aclose()
        nursery.cancel_scope.cancel()


async def test_files_are_asked_for_without_content_coding() -> None:
    """The bytes hashed must be the file's, never a gzip of it."""
    heads: list[bytes] = []

    async def handler(stream: trio.SocketStream, n: int) -> None:
        heads.append(await read_request(stream))
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")

    async with trio.open_nursery() as nursery:
        port = await serve(nursery, handler)
        p = pool()
        assert await get(p, f"http://127.0.0.1:{port}/f?q=1") == (200, b"x")
        await p.aclose()
        nursery.cancel_scope.cancel()
    head = heads[0].lower()
    assert head.startswith(b"get /f?q=1 http/1.1\r\n")
    assert b"\r\naccept-encoding: identity\r\n" in head and b"\r\nuser-agent: mirror-tests" in head
