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

from mirror.errors import ConfigError
from mirror.layout import Layout
from mirror.plan.filterconf import Filters, parse_filters
from mirror.publish.storecfg import StorageConfig, parse_storage
from mirror.tables import Section, parse_duration
from mirror.upstream.config import UpstreamConfig, parse_upstream

__all__ = [
    "Config", "DaemonConfig", "MetricsConfig", "MirrorConfig", "StorageConfig", "UpstreamConfig",
    "default_download_processes", "load_config", "parse_config", "parse_duration",
]


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
    # During a long cycle (a first sync), the root index is republished at
    # least this often, listing the projects published so far; 0: only at
    # the end of each cycle.
    root_interval: float = 600.0


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
    storage: StorageConfig = StorageConfig()
    mirror_filters: Filters = field(default_factory=Filters)
    # Identifies the filter settings (including an allow_from file's text) so
    # a sync can tell that they changed and replay the state against them.
    filters_fingerprint: str = ""
    source: str = "<defaults>"

    @property
    def layout(self) -> Layout:
        return Layout(self.mirror.directory)


def _mirror(s: Section, base: Path) -> MirrorConfig:
    d = MirrorConfig()
    if "directory" not in s.raw:
        raise ConfigError(f"{s.source}: mirror.directory is required")
    raw_directory = s.string("directory", "")
    directory = Path(raw_directory).expanduser()
    if not raw_directory.strip():
        raise ConfigError(f"{s.source}: mirror.directory must not be empty")
    name = s.string("name", d.name)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}", name):
        raise s.error("name", f"letters, digits, '.', '_' and '-' only, got {name!r}")
    cfg = MirrorConfig(
        directory=(base / directory).resolve(),
        workers=s.integer("workers", d.workers, minimum=1),
        download_processes=s.integer("download_processes", d.download_processes, minimum=0, maximum=64),
        json_api=s.boolean("json_api", d.json_api),
        name=name,
        retire_after=s.duration("retire_after", d.retire_after),
        max_retire=s.integer("max_retire", d.max_retire),
        root_interval=s.duration("root_interval", d.root_interval),
    )
    s.done()
    return cfg


def _daemon(s: Section) -> DaemonConfig:
    d = DaemonConfig()
    cfg = DaemonConfig(
        poll_interval=s.duration("poll_interval", d.poll_interval),
        max_backoff=s.duration("max_backoff", d.max_backoff),
        stop_timeout=s.duration("stop_timeout", d.stop_timeout),
    )
    s.done()
    return cfg


def _metrics(s: Section) -> MetricsConfig:
    listen = s.string("listen", MetricsConfig.listen)
    if listen:
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise s.error("listen", f"expected 'host:port' (or '' to disable), got {listen!r}")
    s.done()
    return MetricsConfig(listen=listen)


def parse_config(data: dict[str, Any], *, source: str, base: Path) -> Config:
    known = {"upstream", "mirror", "daemon", "metrics", "filters", "storage"}
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
        upstream=parse_upstream(Section(data.get("upstream", {}), "upstream", source)),
        mirror=_mirror(Section(data.get("mirror", {}), "mirror", source), base),
        daemon=_daemon(Section(data.get("daemon", {}), "daemon", source)),
        metrics=_metrics(Section(data.get("metrics", {}), "metrics", source)),
        storage=parse_storage(data.get("storage", {}), source=source, base=base),
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
