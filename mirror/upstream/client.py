"""The PyPI client: changelog feed, root index, project pages.

I/O lives in ``Upstream`` (one injected ``httpx.AsyncClient``); everything
that interprets bytes is a pure function in ``mirror.parse``.
"""

from __future__ import annotations

import logging
import random
import time
import xmlrpc.client
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast
from xml.parsers.expat import ExpatError

import httpx
import trio

from mirror.errors import (
    MalformedResponse,
    ProjectNotFound,
    StalePage,
    UnsupportedAPIVersion,
    UpstreamError,
    UpstreamUnavailable,
    UpstreamUntrusted,
)
from mirror.layout import api_json
from mirror.metrics import Metrics
from mirror.model import ChangeEvent, NormalizedName, ProjectSnapshot, RootEntry, Serial
from mirror.upstream.config import UpstreamConfig
from mirror.upstream.parse import (
    ACCEPT,
    JSON_TYPE,
    header_serial,
    is_serial,
    load_json,
    parse_changelog,
    parse_project_html,
    parse_project_json,
    parse_root_json,
)
from mirror.upstream.retry import (
    RetryPolicy,
    classify,
    should_retry_status,
    throttle_wait,
    tls_message,
)

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Response:
    status: int
    headers: httpx.Headers
    body: bytes
    url: str


class Upstream:
    # Rows per changelog_since_serial answer on PyPI (Warehouse's limit).
    changelog_page_size = 50_000

    def __init__(
        self,
        client: httpx.AsyncClient,
        cfg: UpstreamConfig,
        *,
        metrics: Metrics,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = trio.sleep,
    ) -> None:
        self.client = client
        self.cfg = cfg
        self.base = cfg.url.rstrip("/")
        self.metrics = metrics
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.retry = RetryPolicy.of(cfg)
        self._last_xmlrpc = -1e9
        self._xmlrpc_lock = trio.Lock()

    async def request(
        self, method: str, url: str, *, kind: str, headers: Mapping[str, str] | None = None,
        content: bytes | None = None, ok: tuple[int, ...] = (200,),
    ) -> Response:
        """One request with retries on transport errors, 429 and 5xx.

        Statuses in ``ok`` and 4xx are returned to the caller; the body is
        capped at ``max_page_bytes``."""
        last = ""
        label = "feed" if kind == "feed" else "page"
        tries = self.retry.tries(self.rng)
        wait: float | None = 0.0
        while True:
            if wait:
                await self.sleep(wait)
            self.metrics.upstream_requests.labels(kind).inc()
            asked: float | None = None
            try:
                async with self.client.stream(method, url, headers=headers, content=content) as r:
                    if r.status_code in ok or (r.status_code >= 400 and not should_retry_status(r.status_code)):
                        body = await self._read_capped(r, url)
                        return Response(r.status_code, r.headers, body, str(r.url))
                    last, reason = f"HTTP {r.status_code}", "http_status"
                    asked = throttle_wait(r.status_code, r.headers.get, now=time.time())
            except httpx.TransportError as e:
                reason, last = classify(e)
            wait, throttled = tries.after_failure(asked=asked, final=reason == "tls")
            if throttled:
                self.metrics.throttled.labels(label).inc()
                log.info("%s %s: %s, asked to wait %.0fs; waiting %.1fs", method, url, last, asked, wait)
                continue
            self.metrics.upstream_errors.labels(label, reason).inc()
            log.debug("%s %s failed (%s), attempt %d", method, url, last, tries.failures)
            if reason == "tls":
                raise UpstreamUntrusted(tls_message(url, last))
            if wait is None:
                raise UpstreamUnavailable(f"{method} {url}: {last} after {tries.failures} attempts")

    async def _read_capped(self, r: httpx.Response, url: str) -> bytes:
        cap = self.cfg.max_page_bytes
        declared = r.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            self.metrics.rejected.labels("oversize").inc()
            raise MalformedResponse(f"{url}: body of {declared} bytes exceeds max_page_bytes={cap}")
        chunks, n = [], 0
        body = cast(AsyncGenerator[bytes, None], r.aiter_bytes())
        try:
            async for chunk in body:
                n += len(chunk)
                if n > cap:
                    self.metrics.rejected.labels("oversize").inc()
                    raise MalformedResponse(f"{url}: body exceeds max_page_bytes={cap}")
                chunks.append(chunk)
        finally:
            await body.aclose()  # now, not at garbage collection
        return b"".join(chunks)

    # -- XML-RPC feed -----------------------------------------------------------
    async def xmlrpc(self, method: str, *params: Any) -> Any:
        async with self._xmlrpc_lock:
            # PyPI rate-limits XML-RPC per IP; keep calls spaced.
            wait = self._last_xmlrpc + self.cfg.xmlrpc_interval - trio.current_time()
            if wait > 0:
                await self.sleep(wait)
            try:
                r = await self.request(
                    "POST", f"{self.base}/pypi", kind="feed",
                    headers={"Content-Type": "text/xml"},
                    content=xmlrpc.client.dumps(params, method, allow_none=True).encode(),
                )
            finally:
                self._last_xmlrpc = trio.current_time()
        if r.status != 200:
            raise UpstreamUnavailable(f"XML-RPC {method}: HTTP {r.status}")
        try:
            (result,), _ = xmlrpc.client.loads(r.body)
        except xmlrpc.client.Fault as f:
            raise UpstreamError(f"XML-RPC {method}: fault {f.faultCode}: {f.faultString}"[:300]) from None
        except (ExpatError, ValueError, TypeError, xmlrpc.client.ResponseError) as e:
            self.metrics.rejected.labels("malformed").inc()
            raise MalformedResponse(f"XML-RPC {method}: malformed response: {e}"[:300]) from None
        return result

    async def changelog_last_serial(self) -> Serial:
        v = await self.xmlrpc("changelog_last_serial")
        if not is_serial(v):
            raise MalformedResponse(f"changelog_last_serial returned {v!r:.100}")
        return Serial(v)

    async def changelog_since(self, serial: int, *, until: int | None = None) -> tuple[list[ChangeEvent], Serial]:
        """Every event after ``serial``, paging as PyPI requires.

        PyPI returns at most ``changelog_page_size`` rows per call, so a short
        page is the last one; with ``until``, paging goes on until that serial
        is reached instead."""
        events: list[ChangeEvent] = []
        pos = serial
        while until is None or pos < until:
            page = parse_changelog(await self.xmlrpc("changelog_since_serial", pos))
            if not page or max(e.serial for e in page) <= pos:
                break  # empty, or no progress: never loop forever on a broken upstream
            events.extend(page)
            pos = max(pos, max(e.serial for e in page))
            if until is None and len(page) < self.changelog_page_size:
                break
        return events, Serial(pos)

    async def list_packages_with_serial(self) -> dict[str, int]:
        v = await self.xmlrpc("list_packages_with_serial")
        if not isinstance(v, dict):
            raise MalformedResponse("list_packages_with_serial did not return a struct")
        return {str(k): s for k, s in v.items() if is_serial(s)}

    # -- simple API -------------------------------------------------------------
    async def root_index(self, etag: str | None) -> tuple[list[RootEntry], Serial | None, str | None, list[str]] | None:
        """The PEP 691 root, or None when ``etag`` still matches (304)."""
        headers = {"Accept": JSON_TYPE}
        if etag:
            headers["If-None-Match"] = etag
        r = await self.request("GET", f"{self.base}/simple/", kind="feed", headers=headers, ok=(200, 304))
        if r.status == 304:
            return None
        if r.status != 200:
            raise UpstreamUnavailable(f"root index: HTTP {r.status}")
        if not r.headers.get("content-type", "").startswith(JSON_TYPE):
            raise MalformedResponse("root index: upstream did not serve PEP 691 JSON")
        try:
            entries, serial, rejected = parse_root_json(r.body)
        except UnsupportedAPIVersion:
            self.metrics.rejected.labels("api_version").inc()
            raise
        except MalformedResponse:
            self.metrics.rejected.labels("malformed").inc()
            raise
        return entries, serial, r.headers.get("etag"), rejected

    async def project_page(self, name: NormalizedName, *, min_serial: int) -> ProjectSnapshot:
        """The project's page, at least as new as ``min_serial``.

        A stale page (CDN lag) is asked for again with backoff and a
        cache-busting query string; after ``stale_retries`` it raises
        ``StalePage`` so the caller can defer this project only."""
        url = f"{self.base}/simple/{name}/"
        got: int | None = None
        stale = malformed = 0
        while True:
            r = await self.request("GET", url, kind="page", headers={"Accept": ACCEPT})
            if r.status == 404 or r.status == 410:
                raise ProjectNotFound(f"{name}: HTTP {r.status}")
            if r.status != 200:
                raise UpstreamUnavailable(f"{name}: HTTP {r.status}")
            ctype = r.headers.get("content-type", "")
            parse = parse_project_json if ctype.startswith(JSON_TYPE) or ctype.startswith("application/json") else parse_project_html
            try:
                snap = parse(r.body, name=name, page_url=r.url, header_serial=header_serial(r.headers),
                             allow_http=self.cfg.allow_http)
            except MalformedResponse as e:
                # A garbled page is as transient as a 5xx (a CDN can cache
                # one): retry with cache busting, then defer the project.
                self.metrics.rejected.labels("malformed").inc()
                malformed += 1
                if malformed > self.cfg.retries:
                    raise
                log.debug("%s: malformed page (%s), attempt %d", name, e, malformed)
            else:
                got = snap.serial
                if got is None or got >= min_serial:
                    return snap
                self.metrics.stale_pages.inc()
                stale += 1
                if stale > self.cfg.stale_retries:
                    raise StalePage(name, min_serial, got)
                log.debug("%s: stale page (serial %s < %d), attempt %d", name, got, min_serial, stale)
            attempt = stale + malformed
            await self.sleep(self.retry.delay(attempt, self.rng))
            # A distinct query string misses any cached copy.
            url = f"{self.base}/simple/{name}/?cachebust={min_serial}-{attempt}-{self.rng.randrange(1 << 30)}"

    async def project_api_json(self, name: NormalizedName) -> dict[str, Any] | None:
        r = await self.request("GET", f"{self.base}/{api_json(name)}", kind="page")
        if r.status != 200:
            return None
        data = load_json(r.body, where=f"{name} JSON API")
        return data if isinstance(data, dict) else None
