"""The HTTP transport under the one pooled client: httpx's, minus a probe.

Before it hands out a request, httpcore's pool asks every idle keep-alive
connection "has the server closed you?" with a zero-timeout ``poll(2)``, and
it asks again whenever any response is closed.  With 16 downloads in flight
that is about 20 system calls per request, all on the event loop's thread,
each one releasing and retaking the GIL that the download threads want: on a
first sync it was the largest single cost of the loop after the transfers
themselves.

A server closes an idle connection after its keep-alive timeout (nginx 75 s,
PyPI's CDN longer), not within half a second of its last response.  So a
connection that moved bytes less than ``PROBE_AFTER`` (half a second) ago is
reported as not readable without asking the kernel, and so is one the
kernel was asked about less than that long ago (a connection that stays idle
is asked at most twice a second, not at every request).  If a server does
close one in that window, the request fails like any dropped connection and
is retried by the caller.

httpx does not take a network backend, so the pool it built is swapped for
an identical one built with ours.  ``probe_skipping`` tells whether that
worked; if a future httpx moves the pool, the client simply keeps httpx's own
and the tests say so.
"""

from __future__ import annotations

import functools
import os
import ssl
import time
import typing

import httpcore
import httpx

from mirror.errors import ConfigError
from mirror.upstream import proxy
from mirror.upstream.config import UpstreamConfig
from mirror.upstream.files import FilePool
from mirror.upstream.proxy import ProxyRules

PROBE_AFTER = 0.5


class _Stream(httpcore.AsyncNetworkStream):
    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        # Last time bytes moved, or the kernel said "not closed".
        self._checked = time.monotonic()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return await self._inner.read(max_bytes, timeout)
        finally:
            self._checked = time.monotonic()

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            await self._inner.write(buffer, timeout)
        finally:
            self._checked = time.monotonic()

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> typing.Any:
        if info != "is_readable":
            return self._inner.get_extra_info(info)
        now = time.monotonic()
        if now - self._checked < PROBE_AFTER:
            return False
        readable = self._inner.get_extra_info(info)
        if not readable:
            self._checked = now
        return readable


class _Backend(httpcore.AsyncNetworkBackend):
    def __init__(self) -> None:
        # The mirror runs on trio only.
        self._inner = httpcore.TrioBackend()

    async def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def transport(*, verify: ssl.SSLContext, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    t = httpx.AsyncHTTPTransport(verify=verify, limits=limits)
    pool = getattr(t, "_pool", None)
    if type(pool) is httpcore.AsyncConnectionPool:
        t._pool = httpcore.AsyncConnectionPool(
            ssl_context=verify,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_Backend(),
        )
    return t


def probe_skipping(client: httpx.AsyncClient) -> bool:
    """True when ``client``'s default transport uses the probe-skipping pool."""
    pool = getattr(client._transport, "_pool", None)
    return isinstance(getattr(pool, "_network_backend", None), _Backend)


@functools.cache
def tls_context(ca_bundle: str = "") -> ssl.SSLContext:
    """The trust for every https request: ``ca_bundle`` (a PEM file or a
    directory), else what httpx builds (``SSL_CERT_FILE`` / ``SSL_CERT_DIR``
    when set, else certifi's bundle).  Built once per process: loading a
    bundle costs ~20 ms of CPU, more than the rest of a no-change cycle."""
    try:
        if not ca_bundle:
            return httpx.create_ssl_context()
        if os.path.isdir(ca_bundle):
            return ssl.create_default_context(capath=ca_bundle)
        return ssl.create_default_context(cafile=ca_bundle)
    except (OSError, ssl.SSLError) as e:
        where = f"upstream.ca_bundle = {ca_bundle!r}" if ca_bundle else (
            f"SSL_CERT_FILE={os.environ.get('SSL_CERT_FILE', '')!r}" if os.environ.get("SSL_CERT_FILE")
            else f"SSL_CERT_DIR={os.environ.get('SSL_CERT_DIR', '')!r}")
        raise ConfigError(f"{where}: cannot load CA certificates: {e}") from None


def user_agent(cfg: UpstreamConfig, version: str) -> str:
    return f"mirror/{version} {cfg.user_agent}"


def proxy_rules(cfg: UpstreamConfig) -> ProxyRules:
    """``[upstream] proxy`` in this process' environment (ConfigError if unusable)."""
    try:
        return proxy.rules(cfg.proxy, os.environ)
    except proxy.ProxyError as e:
        raise ConfigError(f"upstream.proxy = {cfg.proxy!r}: {e}") from None


def open_files(cfg: UpstreamConfig, *, workers: int, version: str) -> FilePool:
    """The lean client for file bodies, with the same trust, identity and proxy."""
    return FilePool(ssl_context=tls_context(cfg.ca_bundle), user_agent=user_agent(cfg, version), timeout=cfg.timeout,
                    allow_http=cfg.allow_http, max_idle=workers + 8, rules=proxy_rules(cfg))


def _mounts(rules: ProxyRules, limits: httpx.Limits, ctx: ssl.SSLContext) -> dict[str, httpx.AsyncBaseTransport | None]:
    """httpx's form of the rules: a proxied transport per scheme, and None
    (the client's own transport: direct) for the NO_PROXY hosts."""
    if not rules.active:
        return {}
    mounts: dict[str, httpx.AsyncBaseTransport | None] = {
        f"{scheme}://": httpx.AsyncHTTPTransport(proxy=url, verify=ctx, limits=limits)
        for scheme, url in rules.by_scheme.items()
    }
    for host in rules.no_proxy:
        mounts[f"all://{host}"] = None
        mounts[f"all://*.{host}"] = None
    return mounts


def open_client(cfg: UpstreamConfig, *, workers: int, version: str) -> httpx.AsyncClient:
    """The one pooled client for the feed, the pages and the root index."""
    limits = httpx.Limits(max_connections=workers + 8, max_keepalive_connections=workers + 8)
    return httpx.AsyncClient(
        transport=transport(verify=tls_context(cfg.ca_bundle), limits=limits),
        mounts=_mounts(proxy_rules(cfg), limits, tls_context(cfg.ca_bundle)),
        timeout=httpx.Timeout(cfg.timeout),
        headers={"User-Agent": user_agent(cfg, version)},
        follow_redirects=True,
        limits=limits,
    )
