"""The file path: a lean HTTP/1.1 client for distribution files and sidecars.

Theory of operation
-------------------
A first sync is tens of thousands of small GETs.  Measured on one core,
``httpx.AsyncClient.stream`` spends about three times the CPU of a plain h11
loop on every request (request building, URL merging, cookies, the auth and
redirect wrappers, and a pool that scans every connection per request), and
that CPU, not the network, bounded a first sync.  Pages, the feed and the
root index keep the one pooled ``httpx.AsyncClient``; files go through
``FilePool``: h11 (httpx's own protocol library) over trio streams, with
keep-alive connections kept per origin.

* **Connections.**  Idle connections are kept per origin, newest first, and
  dropped after ``KEEPALIVE`` seconds.  A server may close an idle connection
  at any time: when a *reused* connection fails before the response head
  arrives, the request is sent once more on a fresh connection (GET is
  idempotent).  ``Connection: close`` and bodies cut short close it.
* **TLS** with the same ``ssl.SSLContext`` as the httpx client (one trust
  setting for every request).
* **Bodies**: length-delimited, chunked or read to EOF, as h11 frames them;
  ``Accept-Encoding: identity``, so the bytes hashed are the file's bytes.
* **Redirects** are followed explicitly, at most ``max_redirects`` times,
  only to http(s) URLs (plain http only with ``allow_http``).  The tree path
  never comes from a redirect: it is fixed by the page's validated URL.
* **Proxies**: with ``proxy``, https origins are reached through HTTP CONNECT
  and http origins through the proxy in absolute form, as curl and pip do.
* **Errors** are httpx's exception types (``ConnectError``, ``ReadTimeout``,
  ``RemoteProtocolError``, ...), so ``mirror.upstream.retry.classify`` names
  them exactly as it names the httpx client's.

``HttpxFiles`` offers the same interface over an ``httpx.AsyncClient``, for
unit tests with ``httpx.MockTransport``.
"""

from __future__ import annotations

import base64
import ssl
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import SplitResult, unquote, urljoin, urlsplit

import h11
import httpx
import trio

from mirror.upstream.proxy import ProxyRules, check_proxy_url

RECEIVE = 256 * 1024
# Idle keep-alive connections older than this are not reused: a server's
# own idle timeout is longer (nginx 75 s), so the retry below is rare.
KEEPALIVE = 15.0
REDIRECTS = frozenset({301, 302, 303, 307, 308})
_HTTP_VERSION = b"1.1"


class FileResponse(Protocol):
    status: int
    url: str

    def chunks(self) -> AsyncIterator[bytes]: ...

    def header(self, name: str) -> str | None: ...


class FileSource(Protocol):
    """What an attempt needs: ``async with source.stream(url) as r``."""

    def stream(self, url: str) -> AbstractAsyncContextManager[FileResponse]: ...


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def authority(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


def _origin(url: str, *, allow_http: bool) -> tuple[Origin, str]:
    parts = urlsplit(url)
    if parts.scheme not in (("https", "http") if allow_http else ("https",)) or not parts.hostname:
        raise httpx.UnsupportedProtocol(f"refused URL {url[:200]!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.scheme, parts.hostname, port), target


class _Connection:
    def __init__(self, stream: trio.abc.Stream, origin: Origin) -> None:
        self.stream = stream
        self.origin = origin
        self.h11 = h11.Connection(h11.CLIENT)
        self.requests = 0
        self.idle_since = 0.0

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            try:
                await trio.aclose_forcefully(self.stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass

    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE


@dataclass
class _Response:
    pool: FilePool
    conn: _Connection
    status: int
    url: str
    headers: dict[bytes, bytes]
    timeout: float
    done: bool = False

    def header(self, name: str) -> str | None:
        value = self.headers.get(name.lower().encode())
        return value.decode("latin-1") if value is not None else None

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            event = await self.pool._next_event(self.conn)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.done = True
                return
            elif isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("server closed the connection mid-body")


class FilePool:
    def __init__(
        self, *, ssl_context: ssl.SSLContext, user_agent: str, timeout: float, allow_http: bool,
        max_idle: int = 64, max_redirects: int = 5, rules: ProxyRules | None = None,
    ) -> None:
        self.ssl_context = ssl_context
        self.user_agent = user_agent.encode()
        self.timeout = timeout
        self.allow_http = allow_http
        self.max_idle = max_idle
        self.max_redirects = max_redirects
        # Which proxy each host goes through (``mirror.upstream.proxy``).
        self.rules = rules if rules is not None else ProxyRules()
        self._proxies: dict[Origin, SplitResult | None] = {}
        self._idle: dict[Origin, deque[_Connection]] = {}
        self.connections_opened = 0

    # -- connections ---------------------------------------------------------------
    async def _next_event(self, conn: _Connection) -> h11.Event | type[h11.PAUSED]:
        """The next h11 event, reading from the connection as it needs."""
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as e:
                raise httpx.RemoteProtocolError(str(e)) from None
            if event is h11.NEED_DATA:
                conn.h11.receive_data(await self._receive(conn, self.timeout))
            else:
                return cast("h11.Event | type[h11.PAUSED]", event)

    async def _receive(self, conn: _Connection, timeout: float) -> bytes:
        try:
            with trio.fail_after(timeout):
                data = await conn.stream.receive_some(RECEIVE)
                return data if isinstance(data, bytes) else bytes(data)
        except trio.TooSlowError:
            raise httpx.ReadTimeout(f"no data from {conn.origin.authority} for {timeout:g}s") from None
        except (trio.BrokenResourceError, OSError) as e:
            raise httpx.ReadError(f"{type(e).__name__}: {e}") from None

    async def _open_tcp(self, host: str, port: int) -> trio.SocketStream:
        try:
            with trio.fail_after(self.timeout):
                return await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise httpx.ConnectTimeout(f"connecting to {host}:{port} took over {self.timeout:g}s") from None
        except OSError as e:
            raise httpx.ConnectError(f"{host}:{port}: {e.strerror or e}") from None

    def _proxy(self, origin: Origin) -> SplitResult | None:
        if origin not in self._proxies:
            url = self.rules.for_url(origin.scheme, origin.host)
            self._proxies[origin] = check_proxy_url(url) if url else None
        return self._proxies[origin]

    async def _connect(self, origin: Origin) -> _Connection:
        proxy = self._proxy(origin)
        if proxy is None:
            stream: trio.abc.Stream = await self._open_tcp(origin.host, origin.port)
        else:
            stream = await self._open_tcp(proxy.hostname or "", proxy.port or 3128)
            if origin.scheme == "https":
                stream = await self._tunnel(stream, origin, proxy)
        if origin.scheme == "https":
            tls = trio.SSLStream(stream, self.ssl_context, server_hostname=origin.host, https_compatible=True)
            try:
                with trio.fail_after(self.timeout):
                    await tls.do_handshake()
            except trio.TooSlowError:
                await trio.aclose_forcefully(stream)
                raise httpx.ConnectTimeout(f"TLS handshake with {origin.host} took over {self.timeout:g}s") from None
            except (trio.BrokenResourceError, ssl.SSLError, OSError) as e:
                await trio.aclose_forcefully(stream)
                cause = e.__cause__ if isinstance(e, trio.BrokenResourceError) and e.__cause__ else e
                raise httpx.ConnectError(f"TLS with {origin.host}: {cause}") from None
            stream = tls
        self.connections_opened += 1
        return _Connection(stream, origin)

    @staticmethod
    def _proxy_auth(p: SplitResult | None) -> list[tuple[bytes, bytes]]:
        if p is None or p.username is None:
            return []
        token = base64.b64encode(f"{unquote(p.username)}:{unquote(p.password or '')}".encode())
        return [(b"Proxy-Authorization", b"Basic " + token)]

    async def _tunnel(self, stream: trio.SocketStream, origin: Origin, proxy: SplitResult) -> trio.abc.Stream:
        """HTTP CONNECT through the proxy; the stream then carries TLS to the origin."""
        authority = f"{origin.host}:{origin.port}".encode()
        conn = h11.Connection(h11.CLIENT)
        head = [(b"Host", authority), (b"User-Agent", self.user_agent), *self._proxy_auth(proxy)]
        try:
            with trio.fail_after(self.timeout):
                await stream.send_all(conn.send(h11.Request(method=b"CONNECT", target=authority, headers=head)))
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(RECEIVE))
                        continue
                    if isinstance(event, h11.Response):
                        break
                    if isinstance(event, h11.ConnectionClosed):
                        raise httpx.ProxyError("the proxy closed the connection")
        except trio.TooSlowError:
            await trio.aclose_forcefully(stream)
            raise httpx.ConnectTimeout("the proxy did not answer CONNECT in time") from None
        except (h11.RemoteProtocolError, trio.BrokenResourceError, OSError) as e:
            await trio.aclose_forcefully(stream)
            raise httpx.ProxyError(f"CONNECT {authority.decode()}: {e}") from None
        if not 200 <= event.status_code < 300:
            await trio.aclose_forcefully(stream)
            raise httpx.ProxyError(f"CONNECT {authority.decode()}: proxy answered {event.status_code}")
        return stream

    def _checkout(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < KEEPALIVE:
                return conn
            self._drop(conn)
        return None

    def _drop(self, conn: _Connection) -> None:
        # Closing a socket stream synchronously: no await needed for a plain
        # socket; a TLS stream is dropped without its close_notify (as httpx
        # does for a dead connection).
        transport = conn.stream
        while isinstance(transport, trio.SSLStream):
            transport = transport.transport_stream
        if isinstance(transport, trio.SocketStream):
            transport.socket.close()

    def _release(self, conn: _Connection) -> None:
        conn.h11.start_next_cycle()
        conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(conn.origin, deque())
        idle.append(conn)
        while len(idle) > self.max_idle:
            self._drop(idle.popleft())

    # -- requests ------------------------------------------------------------------
    def _request(self, origin: Origin, target: str, *, method: bytes = b"GET",
                 headers: list[tuple[bytes, bytes]] | None = None) -> h11.Request:
        """A file GET by default; ``headers`` (with ``Host``) come from httpx's
        request when the pool carries the client's requests (``LeanTransport``)."""
        forward = self._proxy(origin) if origin.scheme == "http" else None
        if forward is not None:
            target = f"http://{origin.authority}{target}"  # absolute form for a forward proxy
        if headers is None:
            headers = [
                (b"Host", origin.authority.encode()),
                (b"User-Agent", self.user_agent),
                (b"Accept", b"*/*"),
                (b"Accept-Encoding", b"identity"),
            ]
        return h11.Request(method=method, target=target.encode(), headers=[*headers, *self._proxy_auth(forward)])

    async def _send(self, conn: _Connection, request: h11.Request, body: bytes = b"") -> h11.Response:
        """Send ``request`` (and its ``body``) and read the response head."""
        out = conn.h11.send(request) + (conn.h11.send(h11.Data(data=body)) if body else b"")
        try:
            with trio.fail_after(self.timeout):
                await conn.stream.send_all(out + conn.h11.send(h11.EndOfMessage()))
        except trio.TooSlowError:
            raise httpx.WriteTimeout(f"sending to {conn.origin.authority} took over {self.timeout:g}s") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise httpx.WriteError(f"{type(e).__name__}: {e}") from None
        conn.requests += 1
        while True:
            event = await self._next_event(conn)
            if isinstance(event, h11.Response):
                return event
            elif isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("server closed the connection without a response")
            # h11.InformationalResponse (100 Continue and the like): keep reading

    async def _exchange(self, origin: Origin, request: h11.Request, body: bytes = b"") -> tuple[_Connection, h11.Response]:
        conn = self._checkout(origin)
        if conn is not None:
            try:
                return conn, await self._send(conn, request, body)
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                # The server closed this idle connection: once more, fresh.
                await conn.aclose()
            except BaseException:
                await conn.aclose()
                raise
        conn = await self._connect(origin)
        try:
            return conn, await self._send(conn, request, body)
        except BaseException:
            await conn.aclose()
            raise

    @asynccontextmanager
    async def stream(self, url: str) -> AsyncIterator[_Response]:
        for _ in range(self.max_redirects + 1):
            origin, target = _origin(url, allow_http=self.allow_http)
            conn, head = await self._exchange(origin, self._request(origin, target))
            headers = {k.lower(): v for k, v in head.headers}
            location = headers.get(b"location")
            if head.status_code in REDIRECTS and location:
                await conn.aclose()
                url = urljoin(url, location.decode("latin-1"))
                continue
            response = _Response(self, conn, head.status_code, url, headers, self.timeout)
            try:
                yield response
            except BaseException:
                await conn.aclose()
                raise
            await self._finish(conn, done=response.done)
            return
        raise httpx.TooManyRedirects(f"more than {self.max_redirects} redirects from {url[:200]}")

    async def _finish(self, conn: _Connection, *, done: bool) -> None:
        if done and conn.reusable():
            self._release(conn)
        else:
            await conn.aclose()  # a body left unread, or Connection: close

    async def aclose(self) -> None:
        for idle in self._idle.values():
            while idle:
                await idle.pop().aclose()


class _LeanBody(httpx.AsyncByteStream):
    """A response body read from a pooled connection; closing it hands the
    connection back (all read, keep-alive) or closes it."""

    def __init__(self, pool: FilePool, conn: _Connection) -> None:
        self.pool = pool
        self.conn = conn
        self.done = False
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while not self.done:
            event = await self.pool._next_event(self.conn)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self.done = True
            elif isinstance(event, h11.ConnectionClosed):
                raise httpx.RemoteProtocolError("server closed the connection mid-body")

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            await self.pool._finish(self.conn, done=self.done)


class LeanTransport(httpx.AsyncBaseTransport):
    """The pool under the one ``httpx.AsyncClient`` (feed, pages, root index).

    httpx keeps what it does above the wire: headers, redirects, content
    decoding, timeouts' configuration; requests go over this pool's
    connections (and its proxy rules) instead of httpcore's, which spent
    about 1.5 ms of CPU per page request against 0.3 ms here."""

    def __init__(self, pool: FilePool) -> None:
        self.pool = pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        origin, target = _origin(str(url), allow_http=self.pool.allow_http)
        body = await request.aread()
        head_request = self.pool._request(origin, target, method=request.method.encode("ascii"),
                                          headers=list(request.headers.raw))
        conn, head = await self.pool._exchange(origin, head_request, body)
        return httpx.Response(
            head.status_code, headers=list(head.headers), stream=_LeanBody(self.pool, conn),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": bytes(head.reason)},
        )

    async def aclose(self) -> None:
        await self.pool.aclose()


class _HttpxResponse:
    def __init__(self, r: httpx.Response) -> None:
        self.r = r
        self.status = r.status_code
        self.url = str(r.url)

    def header(self, name: str) -> str | None:
        value: str | None = self.r.headers.get(name)
        return value

    async def chunks(self) -> AsyncIterator[bytes]:
        body = cast(AsyncGenerator[bytes, None], self.r.aiter_bytes())
        try:
            async for chunk in body:
                yield chunk
        finally:
            await body.aclose()  # now, not at garbage collection


class HttpxFiles:
    """``FilePool``'s interface over an ``httpx.AsyncClient`` (for unit tests
    with ``httpx.MockTransport``)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    @asynccontextmanager
    async def stream(self, url: str) -> AsyncIterator[_HttpxResponse]:
        async with self.client.stream("GET", url) as r:
            yield _HttpxResponse(r)

    async def aclose(self) -> None:
        pass
