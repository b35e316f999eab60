"""The two HTTP clients of a process, built from ``[upstream]``: one trust,
one identity, one set of proxy rules.

* ``open_files``: the lean file client (``FilePool``) for distribution files
  and their ``.metadata``.
* ``open_client``: the one pooled ``httpx.AsyncClient`` for the feed, the
  pages and the root index.  httpx builds the requests, follows redirects and
  decodes bodies; under it, ``LeanTransport`` carries them over a
  ``FilePool`` of its own.  httpcore's pool cost about 1.5 ms of CPU per page
  request on a first sync (it polls every idle connection per request); the
  lean pool, whose keep-alive and retry rules are documented in
  ``mirror.upstream.files``, costs a fifth of that.  Proxies, CONNECT
  included, are the pool's, so httpx gets no proxy mounts.
"""

from __future__ import annotations

import functools
import os
import ssl

import httpx

from mirror.errors import ConfigError
from mirror.upstream import proxy
from mirror.upstream.config import UpstreamConfig
from mirror.upstream.files import FilePool, LeanTransport
from mirror.upstream.proxy import ProxyRules


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


def open_client(cfg: UpstreamConfig, *, workers: int, version: str) -> httpx.AsyncClient:
    """The one pooled client for the feed, the pages and the root index."""
    return httpx.AsyncClient(
        transport=LeanTransport(open_files(cfg, workers=workers, version=version)),
        timeout=httpx.Timeout(cfg.timeout),
        headers={"User-Agent": user_agent(cfg, version)},
        follow_redirects=True,
    )
