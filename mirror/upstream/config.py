"""``[upstream]``: what to follow and how to treat it, parsed and checked."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mirror.tables import Section
from mirror.upstream import proxy

FEEDS = ("changelog", "simple", "auto")
_CONTACT = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+|https?://\S+")


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = "https://pypi.org"
    feed: str = "auto"
    timeout: float = 30.0
    user_agent: str = ""
    allow_http: bool = False
    retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    stale_retries: int = 4
    xmlrpc_interval: float = 1.0
    max_page_bytes: int = 64 * 1024 * 1024
    # A file listed without a size (PEP 503 HTML, PEP 691 1.0) is cut here,
    # so an endless body cannot fill the disk.
    max_unknown_file_bytes: int = 10 * 1024**3
    # "env" (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY), "none", or a URL
    proxy: str = proxy.ENV
    # CA certificates (a PEM file, or a directory of them) trusted instead of
    # the default bundle; "" trusts SSL_CERT_FILE / SSL_CERT_DIR, else certifi's.
    ca_bundle: str = ""
    # A nearby mirror with the same /packages/ layout, tried first for each
    # file (verified against upstream's sha256); upstream on 404, a bad
    # hash or a transport error, unless download_mirror_only.
    download_mirror: str = ""
    download_mirror_only: bool = False


def _http_url(s: Section, key: str, url: str, *, allow_http: bool) -> str:
    """``url`` without its trailing slash, if it is https (or http with
    ``allow_http``)."""
    url = url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise s.error(key, f"expected an http(s) URL, got {url!r}")
    if parts.scheme == "http" and not allow_http:
        raise s.error(key, f"plain http {url!r} refused; set upstream.allow_http = true to allow it")
    return url


def parse_upstream(s: Section) -> UpstreamConfig:
    d = UpstreamConfig()
    allow_http = s.boolean("allow_http", d.allow_http)
    url = _http_url(s, "url", s.string("url", d.url), allow_http=allow_http)
    feed = s.string("feed", d.feed)
    if feed not in FEEDS:
        raise s.error("feed", f"expected one of {', '.join(FEEDS)}, got {feed!r}")
    ua = s.string("user_agent", d.user_agent).strip()
    if not _CONTACT.search(ua):
        raise s.error("user_agent", "must include a contact (an e-mail address or a URL) "
                                    f"so the upstream can reach you, got {ua!r}")
    proxy_setting = s.string("proxy", d.proxy).strip()
    try:
        proxy.rules(proxy_setting, {})
    except proxy.ProxyError as e:
        raise s.error("proxy", f'{e} (or "env", or "none")') from None
    ca_bundle = s.string("ca_bundle", d.ca_bundle).strip()
    if ca_bundle and not Path(ca_bundle).exists():
        raise s.error("ca_bundle", f"{ca_bundle}: no such file or directory")
    mirror_url = s.string("download_mirror", d.download_mirror).strip()
    if mirror_url:
        mirror_url = _http_url(s, "download_mirror", mirror_url, allow_http=allow_http)
    mirror_only = s.boolean("download_mirror_only", d.download_mirror_only)
    if mirror_only and not mirror_url:
        raise s.error("download_mirror_only", "needs upstream.download_mirror")
    cfg = UpstreamConfig(
        url=url,
        feed=feed,
        timeout=s.number("timeout", d.timeout, minimum=0.001),
        user_agent=ua,
        allow_http=allow_http,
        retries=s.integer("retries", d.retries),
        backoff=s.number("backoff", d.backoff),
        max_backoff=s.number("max_backoff", d.max_backoff),
        stale_retries=s.integer("stale_retries", d.stale_retries),
        xmlrpc_interval=s.number("xmlrpc_interval", d.xmlrpc_interval),
        max_page_bytes=s.integer("max_page_bytes", d.max_page_bytes, minimum=1024),
        max_unknown_file_bytes=s.integer("max_unknown_file_bytes", d.max_unknown_file_bytes, minimum=1024),
        proxy=proxy_setting,
        ca_bundle=ca_bundle,
        download_mirror=mirror_url,
        download_mirror_only=mirror_only,
    )
    s.done()
    return cfg
