"""``[storage]``: where the published tree lives, parsed and checked.

``backend = "filesystem"`` (the default) is ``<directory>/web``.
``backend = "s3"`` publishes the same tree into an S3-compatible bucket
(``[storage.s3]``); the state and the temp files stay under ``state/``.

A secret never sits in the TOML: either the standard AWS chain finds the
credentials (environment, shared credentials file, instance role), or
``access_key_id`` names the key and ``secret_access_key_file`` a file
holding its secret (read here, at load, so a missing file is a config
error at start and not a failed upload an hour later).

Pure apart from reading that one file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from mirror.errors import ConfigError
from mirror.tables import Section

BACKENDS = ("filesystem", "s3")
ADDRESSING = ("path", "virtual")
# "sha256": x-amz-checksum-sha256 on every PUT and part (AWS S3, MinIO,
# Ceph RGW since Reef); "md5": Content-MD5 instead, for servers that do not
# know the newer header and would silently ignore it.
CHECKSUMS = ("sha256", "md5")
MiB = 1024 * 1024
# S3's own limits on multipart uploads.
MIN_PART = 5 * MiB
MAX_PART = 5 * 1024 * MiB
MAX_PARTS = 10_000
# Bucket names as S3 accepts them (3-63 characters, DNS-like).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class S3Config:
    bucket: str = ""
    endpoint_url: str = ""  # "" = AWS's own endpoint for the region
    prefix: str = ""  # key prefix, without leading or trailing "/" ("" = the bucket's root)
    region: str = "us-east-1"
    addressing: str = "path"
    access_key_id: str = ""
    secret_access_key: str = field(default="", repr=False)
    checksum: str = "sha256"
    concurrency: int = 16
    multipart_threshold: int = 64 * MiB
    part_size: int = 64 * MiB
    timeout: float = 60.0

    def key(self, rel: str) -> str:
        """The object key of a web-relative path."""
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def rel(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    @property
    def where(self) -> str:
        """How an error names the bucket: ``s3://bucket/prefix at endpoint``."""
        at = self.endpoint_url or f"AWS {self.region}"
        return f"s3://{self.bucket}{'/' + self.prefix if self.prefix else ''} at {at}"


@dataclass(frozen=True)
class StorageConfig:
    backend: str = "filesystem"
    s3: S3Config | None = None


def part_size_for(size: int, part_size: int) -> int:
    """The part size for a file of ``size`` bytes: ``part_size``, raised so
    that the upload needs at most S3's 10,000 parts."""
    need = -(-size // MAX_PARTS)
    return min(MAX_PART, max(part_size, need, MIN_PART))


def parse_storage(raw: object, *, source: str, base: Path) -> StorageConfig:
    s = Section(raw, "storage", source)
    backend = s.string("backend", "filesystem")
    if backend not in BACKENDS:
        raise s.error("backend", f"expected one of {', '.join(BACKENDS)}, got {backend!r}")
    s3_raw = s.raw.pop("s3", None)
    s.done()
    if backend == "filesystem":
        return StorageConfig()
    if s3_raw is None:
        raise ConfigError(f"{source}: storage.backend = \"s3\" needs a [storage.s3] table with at least bucket")
    return StorageConfig(backend="s3", s3=_s3(Section(s3_raw, "storage.s3", source), base))


def _s3(s: Section, base: Path) -> S3Config:
    d = S3Config()
    bucket = s.string("bucket", "")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise s.error("bucket", f"expected an S3 bucket name (3-63 of a-z 0-9 . -), got {bucket!r}")
    endpoint = s.string("endpoint_url", "").rstrip("/")
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise s.error("endpoint_url", f"expected http(s)://host[:port], got {endpoint!r}")
    prefix = s.string("prefix", "").strip("/")
    if prefix and any(p in ("", ".", "..") for p in prefix.split("/")):
        raise s.error("prefix", f"expected a key prefix like 'pypi/web', got {prefix!r}")
    region = s.string("region", d.region)
    addressing = s.string("addressing", d.addressing)
    if addressing not in ADDRESSING:
        raise s.error("addressing", f"expected one of {', '.join(ADDRESSING)}, got {addressing!r}")
    checksum = s.string("checksum", d.checksum)
    if checksum not in CHECKSUMS:
        raise s.error("checksum", f"expected one of {', '.join(CHECKSUMS)}, got {checksum!r}")
    if s.has("secret_access_key"):
        raise s.error("secret_access_key", "a secret never goes in the config: use secret_access_key_file, "
                                           "or the AWS environment / credentials file / instance role")
    key_id = s.string("access_key_id", "")
    secret_file = s.string("secret_access_key_file", "")
    if bool(key_id) != bool(secret_file):
        raise s.error("access_key_id" if secret_file else "secret_access_key_file",
                      "access_key_id and secret_access_key_file go together (or leave both out for the AWS chain)")
    secret = ""
    if secret_file:
        path = base / Path(secret_file).expanduser()
        try:
            secret = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise s.error("secret_access_key_file", f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        if not secret:
            raise s.error("secret_access_key_file", f"{path} is empty")
    threshold = s.size("multipart_threshold") or d.multipart_threshold
    part = s.size("part_size") or d.part_size
    if not MIN_PART <= part <= MAX_PART:
        raise s.error("part_size", f"S3 takes parts of 5MiB to 5GiB, got {part} bytes")
    if threshold < MIN_PART:
        raise s.error("multipart_threshold", f"must be at least 5MiB (S3's smallest part), got {threshold} bytes")
    cfg = S3Config(
        bucket=bucket, endpoint_url=endpoint, prefix=prefix, region=region, addressing=addressing,
        access_key_id=key_id, secret_access_key=secret, checksum=checksum,
        concurrency=s.integer("concurrency", d.concurrency, minimum=1, maximum=256),
        multipart_threshold=threshold, part_size=part,
        timeout=s.duration("timeout", d.timeout),
    )
    s.done()
    return cfg
