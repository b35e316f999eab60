"""Every metric `mirror` exports, on an injected ``CollectorRegistry``.

Names follow Prometheus conventions: ``mirror_`` prefix, unit suffixes,
counters end in ``_total``; labelled counters have every label value created
up front so dashboards see zeros rather than gaps.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from mirror import __version__
from mirror.errors import DOWNLOAD_REASONS

REJECT_KINDS = ("name", "path", "url", "api_version", "malformed", "oversize")
# What a helper process counts (pages and files); it ships these home with each answer.
HELPER_COUNTERS = ("mirror_upstream_requests", "mirror_upstream_errors", "mirror_stale_pages",
                   "mirror_upstream_rejected", "mirror_upstream_throttled", "mirror_files_downloaded",
                   "mirror_bytes_downloaded", "mirror_download_errors", "mirror_files_by_source",
                   "mirror_download_mirror_misses")
# Why a feed or page request failed (each failed attempt, before retries).
UPSTREAM_ERROR_REASONS = ("http_status", "connection", "truncated", "timeout", "tls")
# Why an upload to object storage failed (each failed object, after the
# client's own retries): the server refused the checksum, refused us
# (credentials, policy), answered 5xx, or could not be reached.
UPLOAD_ERROR_REASONS = ("checksum", "denied", "http_status", "connection", "timeout")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._by_name: dict[str, Counter] | None = None
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.upstream_serial = Gauge("mirror_upstream_serial", "Last serial reported by the upstream feed.", registry=r)
        self.synced_serial = Gauge("mirror_synced_serial", "Serial up to which everything is published.", registry=r)
        self.serial_lag = Gauge("mirror_serial_lag", "upstream_serial - synced_serial.", registry=r)
        self.last_success = Gauge(
            "mirror_last_success_timestamp_seconds", "Unix time of the last cycle that published without failures.", registry=r
        )
        self.cycle_duration = Histogram(
            "mirror_cycle_duration_seconds",
            "Wall time of one sync cycle.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, float("inf")),
            registry=r,
        )
        self.cycles = Counter("mirror_cycles_total", "Sync cycles by outcome.", ["outcome"], registry=r)
        for o in ("ok", "partial", "error"):
            self.cycles.labels(o)
        self.barrier_duration = Histogram(
            "mirror_barrier_duration_seconds",
            "Time to make a batch of files and pages durable (one syncfs).",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf")),
            registry=r,
        )
        self.files_downloaded = Counter("mirror_files_downloaded_total", "Files downloaded and verified.", registry=r)
        self.bytes_downloaded = Counter("mirror_bytes_downloaded_total", "Bytes of verified files downloaded.", registry=r)
        self.files_by_source = Counter(
            "mirror_files_by_source_total",
            "Verified files by where their bytes came from: upstream, or the download_mirror.",
            ["source"], registry=r,
        )
        for source in ("upstream", "download_mirror"):
            self.files_by_source.labels(source)
        self.download_mirror_misses = Counter(
            "mirror_download_mirror_misses_total",
            "Files the download_mirror could not serve (then fetched upstream unless download_mirror_only), "
            "by reason.", ["reason"], registry=r,
        )
        self.download_errors = Counter(
            "mirror_download_errors_total", "Failed download attempts by reason.", ["reason"], registry=r
        )
        for reason in DOWNLOAD_REASONS:
            self.download_errors.labels(reason)
        self.stale_pages = Counter(
            "mirror_stale_pages_total", "Project pages served with a serial below the one the feed promised.", registry=r
        )
        self.rejected = Counter(
            "mirror_upstream_rejected_total", "Upstream names, paths, URLs or pages refused as unsafe or malformed.",
            ["kind"], registry=r,
        )
        for kind in REJECT_KINDS:
            self.rejected.labels(kind)
        self.upstream_requests = Counter(
            "mirror_upstream_requests_total", "HTTP requests sent upstream, by kind.", ["kind"], registry=r
        )
        for kind in ("feed", "page", "file"):
            self.upstream_requests.labels(kind)
        self.throttled = Counter(
            "mirror_upstream_throttled_total",
            "Answers that asked us to wait (429/503 with Retry-After, or RateLimit), by kind; "
            "the wait is honoured up to max_backoff and costs no retry.", ["kind"], registry=r,
        )
        for kind in ("feed", "page", "file"):
            self.throttled.labels(kind)
        self.upstream_errors = Counter(
            "mirror_upstream_errors_total", "Failed feed and page requests (each attempt), by kind and reason.",
            ["kind", "reason"], registry=r,
        )
        for kind in ("feed", "page"):
            for reason in UPSTREAM_ERROR_REASONS:
                self.upstream_errors.labels(kind, reason)
        self.projects_pending = Gauge("mirror_projects_pending", "Projects waiting to be synced.", registry=r)
        self.projects_failed = Gauge("mirror_projects_failed", "Projects deferred after failures.", registry=r)
        self.projects = Gauge("mirror_projects", "Projects published in the root index.", registry=r)
        self.pending_retirement = Gauge(
            "mirror_files_pending_retirement", "Unreferenced files waiting for the grace period.", registry=r
        )
        self.retirement_blocked = Gauge(
            "mirror_retirement_blocked", "1 while the mass-deletion safety valve blocks a cycle.", registry=r
        )
        self.files_retired = Counter(
            "mirror_files_retired_total", "Unreferenced files deleted after the grace period.", registry=r
        )
        self.uploads = Counter(
            "mirror_uploads_total", "Objects uploaded to object storage ([storage] backend = \"s3\").", registry=r
        )
        self.upload_bytes = Counter("mirror_upload_bytes_total", "Bytes uploaded to object storage.", registry=r)
        self.upload_errors = Counter(
            "mirror_upload_errors_total", "Failed uploads to object storage, by reason.", ["reason"], registry=r
        )
        for reason in UPLOAD_ERROR_REASONS:
            self.upload_errors.labels(reason)
        self.uploads_in_flight = Gauge("mirror_uploads_in_flight", "Uploads to object storage under way.", registry=r)
        self.tree_files = Gauge("mirror_tree_files", "Verified files in the tree.", registry=r)
        self.tree_bytes = Gauge("mirror_tree_bytes", "Bytes of verified files in the tree.", registry=r)
        self.up = Gauge("mirror_up", "1 while the mirror process runs.", registry=r)
        self.failed_cycles = Gauge(
            "mirror_consecutive_failed_cycles", "Cycles in a row that ended in an error (the daemon backs off).", registry=r
        )
        self.reloads = Counter("mirror_config_reloads_total", "SIGHUP config reloads by outcome.", ["outcome"], registry=r)
        for o in ("ok", "error"):
            self.reloads.labels(o)
        self.info = Info("mirror", "Version of the mirror software.", registry=r)
        self.info.info({"version": __version__})

    # -- counts made in helper processes ---------------------------------------
    def _counters(self) -> dict[str, Counter]:
        # Built once: a helper process ships its page counts with every page.
        if self._by_name is None:
            self._by_name = {next(iter(c.describe())).name: c for c in vars(self).values() if isinstance(c, Counter)}
        return self._by_name

    def counts(self, families: Iterable[str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The current value of every sample of these counter families."""
        counters = self._counters()
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for name in families:
            for family in counters[name].collect():
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        out[(name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def add_counts(self, deltas: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]) -> None:
        """Add what a helper process counted (``counts`` differences)."""
        counters = self._counters()
        for (name, labels), value in deltas.items():
            if value:
                c = counters[name]
                (c.labels(**dict(labels)) if labels else c).inc(value)

    def write_textfile(self, path: Path) -> None:
        """Atomic write for node_exporter's textfile collector."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(generate_latest(self.registry))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
