"""Which HTTP proxy a request goes through: ``[upstream] proxy`` or the
environment, decided once per process (pure: the caller passes the
environment).

``proxy = "env"`` (the default) does what pip and curl do: ``HTTPS_PROXY``
for https URLs, ``HTTP_PROXY`` for http ones, ``ALL_PROXY`` for both when
the specific one is unset (lower-case names too, lower-case first), and no
proxy for the hosts ``NO_PROXY`` lists (``example.org`` covers its
subdomains, a leading dot is the same, ``*`` turns proxies off).
``proxy = "none"`` ignores the environment; a URL (``http://[user:pass@]host:port``)
is used for every request.  One ``ProxyRules`` covers the feed, the pages and
the files, in every process: helpers inherit the same environment and config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import SplitResult, urlsplit

ENV = "env"
NONE = "none"


class ProxyError(ValueError):
    """A proxy URL that cannot be used (from the config or the environment)."""


def check_proxy_url(url: str) -> SplitResult:
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProxyError(f"expected http://[user:password@]host:port, got {mask(url)!r}")
    try:
        parts.port
    except ValueError as e:
        raise ProxyError(f"bad port in {mask(url)!r}") from e
    return parts


def mask(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    parts = urlsplit(url if "://" in url else "http://" + url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


def _env(environ: Mapping[str, str], name: str) -> str:
    return (environ.get(name.lower()) or environ.get(name.upper()) or "").strip()


@dataclass(frozen=True)
class ProxyRules:
    # scheme ("http"/"https") -> proxy URL
    by_scheme: Mapping[str, str] = field(default_factory=dict)
    # hosts (and their subdomains) reached directly
    no_proxy: tuple[str, ...] = ()
    # where the setting came from, for the log and `mirror status`
    source: str = ""

    @property
    def active(self) -> bool:
        return bool(self.by_scheme) and "*" not in self.no_proxy

    def for_url(self, scheme: str, host: str) -> str | None:
        """The proxy for a request to ``scheme://host``, or None (direct)."""
        if not self.active:
            return None
        host = host.lower().strip("[]")
        for entry in self.no_proxy:
            if host == entry or host.endswith("." + entry):
                return None
        return self.by_scheme.get(scheme)

    def describe(self) -> str:
        """One line for the startup log and ``mirror status``, passwords masked."""
        if not self.active:
            return "no proxy" + (f" ({self.source})" if self.source else "")
        urls = sorted({mask(u) for u in self.by_scheme.values()})
        what = ", ".join(f"{s}: {mask(u)}" for s, u in sorted(self.by_scheme.items())) if len(urls) > 1 else urls[0]
        bypass = f"; direct to {', '.join(self.no_proxy)}" if self.no_proxy else ""
        return f"proxy {what} ({self.source}){bypass}"


def rules(setting: str, environ: Mapping[str, str]) -> ProxyRules:
    """The rules for ``[upstream] proxy = setting`` in ``environ``.  Raises
    ProxyError for an unusable URL, naming where it came from."""
    if setting == NONE:
        return ProxyRules(source="upstream.proxy = \"none\"")
    if setting != ENV:
        check_proxy_url(setting)
        return ProxyRules({"http": setting, "https": setting}, source="upstream.proxy")
    found: dict[str, str] = {}
    names: list[str] = []
    for scheme in ("http", "https"):
        for name in (f"{scheme}_proxy", "all_proxy"):
            value = _env(environ, name)
            if value:
                try:
                    check_proxy_url(value)
                except ProxyError as e:
                    raise ProxyError(f"{name.upper()}: {e}") from None
                found[scheme] = value
                names.append(name.upper())
                break
    no_proxy = tuple(sorted({e.strip().lower().lstrip(".") for e in _env(environ, "no_proxy").split(",")
                             if e.strip()}))
    if not found:
        return ProxyRules(source="none in the environment")
    return ProxyRules(found, no_proxy, source="from " + " and ".join(dict.fromkeys(names)))
