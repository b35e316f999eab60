"""Configuration: one TOML file loaded into frozen dataclasses.

Every key is checked at load: an unknown key, a wrong type or a bad value
raises ``ConfigError`` naming ``section.key`` and the file, so a typo never
silently falls back to a default.  Relative paths are taken relative to the
config file, which is what an operator expects from a systemd unit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mirror.errors import ConfigError
from mirror.filters import Filters, parse_filters

FEEDS = ("changelog", "simple", "auto")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
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


def default_download_processes() -> int:
    """One less than the CPUs this process may use, at most 4: the main
    process keeps a core for pages and state."""
    return max(0, min(4, len(os.sched_getaffinity(0)) - 1))


@dataclass(frozen=True)
class MirrorConfig:
    directory: Path = Path("mirror-data")
    workers: int = 16
    # Helper processes that download files in cycles with many projects to
    # sync (a first sync); 0 downloads everything in the main process.
    download_processes: int = field(default_factory=lambda: default_download_processes())
    json_api: bool = False
    name: str = field(default_factory=socket.gethostname)
    retire_after: float = 86400.0
    max_retire: int = 50_000


@dataclass(frozen=True)
class DaemonConfig:
    poll_interval: float = 60.0
    max_backoff: float = 900.0
    stop_timeout: float = 30.0


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9237"


@dataclass(frozen=True)
class Config:
    upstream: UpstreamConfig = UpstreamConfig()
    mirror: MirrorConfig = MirrorConfig()
    daemon: DaemonConfig = DaemonConfig()
    metrics: MetricsConfig = MetricsConfig()
    mirror_filters: Filters = field(default_factory=Filters)
    # Identifies the filter settings (including an allow_from file's text) so
    # a sync can tell that they changed and replay the state against them.
    filters_fingerprint: str = ""
    source: str = "<defaults>"


def parse_duration(value: object, *, key: str, source: str) -> float:
    """Seconds from ``30``, ``"90s"``, ``"15m"``, ``"24h"`` or ``"7d"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{source}: {key}: expected a duration, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ConfigError(f"{source}: {key}: expected a duration like 30, '90s', '15m', '24h' or '7d', got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{source}: {key}: must not be negative, got {value!r}")
    return seconds


class _Section:
    """Pops typed values out of one TOML table and complains about leftovers."""

    def __init__(self, raw: object, name: str, source: str) -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
        self.raw = dict(raw)
        self.name = name
        self.source = source

    def key(self, k: str) -> str:
        return f"{self.name}.{k}"

    def _get(self, k: str, types: tuple[type, ...], what: str) -> Any:
        v = self.raw.pop(k)
        if isinstance(v, bool) and bool not in types:
            raise ConfigError(f"{self.source}: {self.key(k)}: expected {what}, got {v!r}")
        if not isinstance(v, types):
            raise ConfigError(f"{self.source}: {self.key(k)}: expected {what}, got {v!r}")
        return v

    def string(self, k: str, default: str) -> str:
        return default if k not in self.raw else str(self._get(k, (str,), "a string"))

    def boolean(self, k: str, default: bool) -> bool:
        return default if k not in self.raw else bool(self._get(k, (bool,), "true or false"))

    def integer(self, k: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        if k not in self.raw:
            return default
        v = int(self._get(k, (int,), "an integer"))
        if v < minimum:
            raise ConfigError(f"{self.source}: {self.key(k)}: must be >= {minimum}, got {v}")
        if maximum is not None and v > maximum:
            raise ConfigError(f"{self.source}: {self.key(k)}: must be <= {maximum}, got {v}")
        return v

    def number(self, k: str, default: float, *, minimum: float = 0.0) -> float:
        if k not in self.raw:
            return default
        v = float(self._get(k, (int, float), "a number"))
        if v < minimum:
            raise ConfigError(f"{self.source}: {self.key(k)}: must be >= {minimum}, got {v}")
        return v

    def duration(self, k: str, default: float) -> float:
        if k not in self.raw:
            return default
        return parse_duration(self.raw.pop(k), key=self.key(k), source=self.source)

    def done(self) -> None:
        if self.raw:
            bad = ", ".join(self.key(k) for k in sorted(self.raw))
            raise ConfigError(f"{self.source}: unknown key(s): {bad}")


def _upstream(s: _Section) -> UpstreamConfig:
    d = UpstreamConfig()
    url = s.string("url", d.url).rstrip("/")
    allow_http = s.boolean("allow_http", d.allow_http)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{s.source}: upstream.url: expected an http(s) URL, got {url!r}")
    if parts.scheme == "http" and not allow_http:
        raise ConfigError(f"{s.source}: upstream.url: plain http upstream {url!r} refused; set upstream.allow_http = true to allow it")
    feed = s.string("feed", d.feed)
    if feed not in FEEDS:
        raise ConfigError(f"{s.source}: upstream.feed: expected one of {', '.join(FEEDS)}, got {feed!r}")
    ua = s.string("user_agent", d.user_agent).strip()
    if not _CONTACT.search(ua):
        raise ConfigError(
            f"{s.source}: upstream.user_agent: must include a contact (an e-mail address or a URL) "
            f"so the upstream can reach you, got {ua!r}"
        )
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
    )
    s.done()
    return cfg


def _mirror(s: _Section, base: Path) -> MirrorConfig:
    d = MirrorConfig()
    if "directory" not in s.raw:
        raise ConfigError(f"{s.source}: mirror.directory is required")
    raw_directory = s.string("directory", "")
    directory = Path(raw_directory).expanduser()
    if not raw_directory.strip():
        raise ConfigError(f"{s.source}: mirror.directory must not be empty")
    name = s.string("name", d.name)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}", name):
        raise ConfigError(f"{s.source}: mirror.name: letters, digits, '.', '_' and '-' only, got {name!r}")
    cfg = MirrorConfig(
        directory=(base / directory).resolve(),
        workers=s.integer("workers", d.workers, minimum=1),
        download_processes=s.integer("download_processes", d.download_processes, minimum=0, maximum=64),
        json_api=s.boolean("json_api", d.json_api),
        name=name,
        retire_after=s.duration("retire_after", d.retire_after),
        max_retire=s.integer("max_retire", d.max_retire),
    )
    s.done()
    return cfg


def _daemon(s: _Section) -> DaemonConfig:
    d = DaemonConfig()
    cfg = DaemonConfig(
        poll_interval=s.duration("poll_interval", d.poll_interval),
        max_backoff=s.duration("max_backoff", d.max_backoff),
        stop_timeout=s.duration("stop_timeout", d.stop_timeout),
    )
    s.done()
    return cfg


def _metrics(s: _Section) -> MetricsConfig:
    listen = s.string("listen", MetricsConfig.listen)
    if listen:
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ConfigError(f"{s.source}: metrics.listen: expected 'host:port' (or '' to disable), got {listen!r}")
    s.done()
    return MetricsConfig(listen=listen)


def parse_config(data: dict[str, Any], *, source: str, base: Path) -> Config:
    known = {"upstream", "mirror", "daemon", "metrics", "filters"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) or key(s): {', '.join(unknown)}")
    filters = data.get("filters", {})
    if not isinstance(filters, dict):
        raise ConfigError(f"{source}: [filters] must be a table")
    allow_from_text = None
    if isinstance(filters.get("allow_from"), str):
        req_path = (base / Path(filters["allow_from"]).expanduser())
        try:
            allow_from_text = req_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{source}: filters.allow_from: cannot read {req_path}: {e}") from None
    parsed_filters = parse_filters(filters, source=source, allow_from_text=allow_from_text)
    fingerprint = hashlib.sha256(
        json.dumps([filters, allow_from_text], sort_keys=True, default=str).encode()
    ).hexdigest() if parsed_filters.active else ""
    return Config(
        upstream=_upstream(_Section(data.get("upstream", {}), "upstream", source)),
        mirror=_mirror(_Section(data.get("mirror", {}), "mirror", source), base),
        daemon=_daemon(_Section(data.get("daemon", {}), "daemon", source)),
        metrics=_metrics(_Section(data.get("metrics", {}), "metrics", source)),
        mirror_filters=parsed_filters,
        filters_fingerprint=fingerprint,
        source=source,
    )


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror or e}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return parse_config(data, source=str(p), base=p.resolve().parent)
