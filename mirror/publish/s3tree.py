"""The tree in an S3-compatible bucket (AWS S3, Ceph RGW, MinIO).

Theory of operation
-------------------
The same contract as ``FileTree`` (see ``Tree``), kept with the means a
bucket has.  Only ``web/`` moves: the state, the lock and the temp files
stay under ``state/``.  An object's key is ``prefix/`` plus its web-relative
path, so the bucket holds bandersnatch's layout and nginx or a CDN serves
it with ``conf/nginx-s3.conf``.

* **Whole objects only.**  A PUT is atomic per object: a reader sees the old
  object or the new one, never part of one.  A file above
  ``multipart_threshold`` goes up in parts, and the object appears under
  its key only when ``CompleteMultipartUpload`` succeeds; a run killed
  before that leaves an unfinished upload, which no reader sees and which
  ``prepare`` aborts at the next start (the directory lock says no other
  instance is uploading).
* **Verified twice.**  ``place`` is handed temps whose size and sha256 the
  downloader has checked.  Each PUT (and each part) carries the bytes'
  checksum, ``x-amz-checksum-sha256`` or, with ``checksum = "md5"``,
  ``Content-MD5``, so the server refuses bytes corrupted on the way; such a
  refusal is tried again, twice, from the verified temp.  Every object also
  carries its sha256 as ``x-amz-meta-sha256``, which ``adopt`` and
  ``mirror verify`` compare without downloading the bytes.
* **Order.**  ``place`` starts an upload on a bounded pool of threads
  (``concurrency``) and returns; ``barrier`` waits for every upload started
  so far and raises the first failure.  The publisher calls it between
  files and pages and between pages and the root, exactly as on disk, so a
  page is uploaded only after every file it links is in the bucket.
  ``commit_files`` (root, trace, change lists) uploads one object at a
  time, in order, before it returns.
* **Deletions** are ``DeleteObjects`` calls, a thousand keys each; the sync
  engine only asks for them after ``retire_after``.
* **Every object** gets the ``Content-Type`` and ``Cache-Control`` that
  ``conf/nginx.conf`` sends for its path (``mirror.layout`` owns both).

boto3 is thread-safe and blocking; every method here runs in a worker
thread (``trio.to_thread``), like ``FileTree``'s.  Credentials come from
the config's key and secret file, or boto3's standard chain.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from mirror import layout
from mirror.errors import ConfigError, DiskError, StorageError
from mirror.metrics import Metrics
from mirror.model import safe_relpath
from mirror.publish.storecfg import S3Config, part_size_for
from mirror.publish.tree import Tree

log = logging.getLogger(__name__)

# Attempts for an upload the server refused as corrupted in transit.
CHECKSUM_ATTEMPTS = 3
_CHECKSUM_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch", "InvalidChecksum"})
_DENIED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
                           "InvalidToken", "ExpiredToken", "AllAccessDisabled"})
_MISSING_BUCKET = frozenset({"NoSuchBucket", "404"})
_DELETE_BATCH = 1000


def b64(hexdigest: str) -> str:
    return base64.b64encode(binascii.unhexlify(hexdigest)).decode("ascii")


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode("ascii")


def reason_of(e: BaseException) -> str:
    """The metric label for a failed request (``UPLOAD_ERROR_REASONS``)."""
    from botocore import exceptions as bx

    if isinstance(e, bx.ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in _CHECKSUM_CODES:
            return "checksum"
        if code in _DENIED_CODES:
            return "denied"
        return "http_status"
    if isinstance(e, (bx.ReadTimeoutError, bx.ConnectTimeoutError)):
        return "timeout"
    return "connection"


def _describe(e: BaseException) -> str:
    from botocore import exceptions as bx

    if isinstance(e, bx.ClientError):
        err = e.response.get("Error", {})
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        msg = err.get("Message") or ""
        return f"HTTP {status} {err.get('Code', '')}{': ' + msg if msg and msg != err.get('Code') else ''}"
    return f"{type(e).__name__}: {e}"


def make_client(cfg: S3Config, *, version: str = "") -> Any:
    """A boto3 S3 client for ``cfg`` (credentials from the config, else the
    standard chain).  Unsigned payloads are not asked for: over plain http
    botocore signs the body's sha256, over https it does not need to."""
    try:
        import boto3
        from botocore.config import Config as BotoConfig
    except ImportError:
        raise ConfigError("storage.backend = \"s3\" needs boto3: pip install 'mirror[s3]'") from None
    session = boto3.session.Session(
        aws_access_key_id=cfg.access_key_id or None,
        aws_secret_access_key=cfg.secret_access_key or None,
        region_name=cfg.region,
    )
    return session.client(
        "s3",
        endpoint_url=cfg.endpoint_url or None,
        config=BotoConfig(
            s3={"addressing_style": cfg.addressing},
            max_pool_connections=cfg.concurrency + 4,
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=cfg.timeout,
            read_timeout=cfg.timeout,
            # Our own checksums (sha256 or MD5) on every PUT and part; none
            # added behind our back (aws-chunked trailers many servers lack).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra=f"mirror/{version}" if version else None,
        ),
    )


class UploadJournal:
    """Which keys a killed run may have left in the bucket without the state
    knowing: a local list (``state/s3-uploads``) of the keys whose upload
    started since the last-but-one barrier.

    The publisher records a batch's files right after the barrier that made
    them durable, so by any barrier every file placed before the previous
    one is in the state; the list keeps two generations and is rewritten at
    each barrier.  ``existing`` asks the bucket (one HEAD each) about these
    keys only, instead of about every new file: a first sync sends no
    request per file beyond its upload.  Losing a line (a power cut before
    the page cache reached the disk) costs one download and upload of the
    same bytes again, never a wrong page: the journal decides what is
    looked up, not what is published."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self.doubt = set(path.read_text(encoding="utf-8").split())
        except FileNotFoundError:
            self.doubt = set()
        except (OSError, UnicodeDecodeError) as e:
            log.warning("%s unreadable (%s): a killed run's uploads will be uploaded again", path, e)
            self.doubt = set()
        self._gens: list[list[str]] = [[], []]
        self._f: IO[str] | None = None
        self._rewrite()

    def _rewrite(self) -> None:
        tmp = self.path.with_name(self.path.name + ".new")
        with open(tmp, "w", encoding="utf-8") as f:
            for rel in (*self.doubt, *self._gens[0], *self._gens[1]):
                f.write(rel + "\n")
        if self._f is not None:
            self._f.close()
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def started(self, rel: str) -> None:
        with self._lock:
            self._gens[1].append(rel)
            assert self._f is not None
            self._f.write(rel + "\n")
            self._f.flush()

    def rotate(self) -> None:
        """A barrier returned: what was placed before the previous one is recorded."""
        with self._lock:
            self._gens = [self._gens[1], []]
            self._rewrite()

    def candidates(self, rels: Iterable[str]) -> list[str]:
        """Those of ``rels`` that may be in the bucket unrecorded; each is
        looked at once (after that the caller adopts or uploads it)."""
        with self._lock:
            recent = set(self._gens[0]) | set(self._gens[1])
            out = [rel for rel in rels if rel in self.doubt or rel in recent]
            self.doubt.difference_update(out)
            return out

    def close(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None


class S3Tree(Tree):
    def __init__(self, cfg: S3Config, tmp: Path, *, journal: Path, metrics: Metrics | None = None,
                 client: Any = None, version: str = "") -> None:
        super().__init__(tmp)
        self.journal_path = journal
        self.journal: UploadJournal | None = None
        self.cfg = cfg
        self.metrics = metrics if metrics is not None else Metrics()
        self.client = client if client is not None else make_client(cfg, version=version)
        self._pool = concurrent.futures.ThreadPoolExecutor(cfg.concurrency, thread_name_prefix="s3-upload")
        self._lock = threading.Lock()
        self._pending: list[concurrent.futures.Future[None]] = []
        # HEAD answers of ``existing``, reused once by ``adopt``.
        self._heads: dict[str, dict[str, Any]] = {}

    @property
    def description(self) -> str:
        return self.cfg.where

    def forget_dirs(self) -> None:
        """A cycle's start: HEAD answers ``adopt`` did not use go."""
        self._heads.clear()

    def close(self) -> None:
        """Stop the upload threads.  Nothing waits for uploads still queued
        (a stop or an error got here first: nothing links them, and their
        temps are swept at the next start)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.journal is not None:
            self.journal.close()

    # -- start --------------------------------------------------------------------
    def prepare(self) -> int:
        """Check the bucket answers with these credentials, sweep local temps,
        and abort the multipart uploads a killed run left unfinished."""
        try:
            removed = self.sweep_temps()
        except OSError as e:
            raise DiskError.of(e, f"preparing {self.tmp}") from None
        self.check()
        try:
            self.journal = UploadJournal(self.journal_path)
        except OSError as e:
            raise DiskError.of(e, f"writing {self.journal_path}") from None
        aborted = self.abort_stale_uploads()
        if aborted:
            log.info("%s: aborted %d unfinished multipart upload(s) of an interrupted run", self.cfg.where, aborted)
        return removed

    def check(self) -> None:
        """One line (a ``ConfigError``) if the bucket is missing, refuses
        these credentials, or cannot be reached."""
        from botocore import exceptions as bx

        try:
            self.client.head_bucket(Bucket=self.cfg.bucket)
        except bx.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_BUCKET:
                why = "the bucket does not exist"
            elif code in _DENIED_CODES:
                why = "access denied: check the credentials and the bucket policy"
            else:
                why = _describe(e)
            raise ConfigError(f"{self.cfg.where}: {why}") from None
        except bx.NoCredentialsError:
            raise ConfigError(f"{self.cfg.where}: no credentials: set storage.s3.access_key_id and "
                              "secret_access_key_file, or the AWS environment / credentials file") from None
        except (bx.BotoCoreError, OSError) as e:
            raise ConfigError(f"{self.cfg.where}: cannot reach the endpoint: {_describe(e)}") from None

    def abort_stale_uploads(self) -> int:
        """Abort every unfinished multipart upload under the prefix (the
        directory lock says none of them is ours any more)."""
        prefix = self.cfg.key("")
        aborted = 0
        try:
            for page in self.client.get_paginator("list_multipart_uploads").paginate(
                    Bucket=self.cfg.bucket, Prefix=prefix):
                for up in page.get("Uploads", []) or []:
                    self.client.abort_multipart_upload(Bucket=self.cfg.bucket, Key=up["Key"], UploadId=up["UploadId"])
                    aborted += 1
        except Exception as e:  # noqa: BLE001 - botocore's error tree is wide
            raise self._error(e, "aborting unfinished uploads") from None
        return aborted

    def _error(self, e: BaseException, what: str) -> StorageError:
        return StorageError(f"{self.cfg.where}: {what}: {_describe(e)}", reason_of(e))

    # -- uploads ------------------------------------------------------------------
    def place(self, tmp: Path, rel: str, sha256: str | None = None) -> None:
        try:
            safe_relpath(rel)
        except BaseException:
            self.discard(tmp)
            raise
        if self.journal is not None:
            self.journal.started(rel)
        fut = self._pool.submit(self._upload_and_discard, tmp, rel, sha256)
        with self._lock:
            self._pending.append(fut)

    def barrier(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        first: BaseException | None = None
        for fut in pending:
            try:
                fut.result()
            except BaseException as e:  # noqa: BLE001 - every upload is waited for, the first error raised
                if first is None:
                    first = e
        if first is not None:
            raise first
        if self.journal is not None:
            try:
                self.journal.rotate()
            except OSError as e:
                raise DiskError.of(e, f"writing {self.journal_path}") from None
        self.barriers += 1

    def commit_files(self, temps: Sequence[tuple[Path, str]]) -> None:
        try:
            for tmp, rel in temps:
                safe_relpath(rel)
                self._upload_and_discard(tmp, rel, None)
        except BaseException:
            self.discard_all(temps)
            raise

    def _upload_and_discard(self, tmp: Path, rel: str, sha256: str | None) -> None:
        try:
            self.upload(tmp, rel, sha256)
        finally:
            self.discard(tmp)

    def upload(self, path: Path, rel: str, sha256: str | None = None) -> None:
        """Upload the verified file at ``path`` as ``rel`` (blocking); a
        checksum refusal is tried again from the same bytes."""
        m = self.metrics
        try:
            size = os.path.getsize(path)
            if sha256 is None:
                with open(path, "rb") as f:
                    sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            raise DiskError.of(e, f"reading {path.name} for {rel}") from None
        m.uploads_in_flight.inc()
        try:
            for attempt in range(1, CHECKSUM_ATTEMPTS + 1):
                try:
                    if size > self.cfg.multipart_threshold:
                        self._multipart(path, rel, size, sha256)
                    else:
                        self._put(path, rel, size, sha256)
                    break
                except OSError as e:
                    raise DiskError.of(e, f"reading {path.name} for {rel}") from None
                except Exception as e:  # noqa: BLE001 - botocore's error tree is wide
                    reason = reason_of(e)
                    m.upload_errors.labels(reason).inc()
                    if reason == "checksum" and attempt < CHECKSUM_ATTEMPTS:
                        log.warning("%s: the server refused the bytes (%s: corrupted on the way?); "
                                    "sending them again", rel, _describe(e))
                        continue
                    raise self._error(e, f"uploading {rel}") from None
        finally:
            m.uploads_in_flight.dec()
        m.uploads.inc()
        m.upload_bytes.inc(size)

    def _headers(self, rel: str, sha256: str) -> dict[str, Any]:
        return {
            "ContentType": layout.content_type(rel),
            "CacheControl": layout.cache_control(rel),
            "Metadata": {"sha256": sha256},
        }

    def _put(self, path: Path, rel: str, size: int, sha256: str) -> None:
        with open(path, "rb") as f:
            kw = self._headers(rel, sha256)
            if self.cfg.checksum == "md5":
                kw["ContentMD5"] = base64.b64encode(hashlib.file_digest(f, "md5").digest()).decode("ascii")
                f.seek(0)
            else:
                kw["ChecksumSHA256"] = b64(sha256)
            self.client.put_object(Bucket=self.cfg.bucket, Key=self.cfg.key(rel), Body=f, ContentLength=size, **kw)

    def _multipart(self, path: Path, rel: str, size: int, sha256: str) -> None:
        bucket, key = self.cfg.bucket, self.cfg.key(rel)
        part_size = part_size_for(size, self.cfg.part_size)
        kw = self._headers(rel, sha256)
        if self.cfg.checksum == "sha256":
            kw["ChecksumAlgorithm"] = "SHA256"
        upload_id = self.client.create_multipart_upload(Bucket=bucket, Key=key, **kw)["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            with open(path, "rb") as f:
                number = 0
                while data := f.read(part_size):
                    number += 1
                    part: dict[str, Any] = {}
                    if self.cfg.checksum == "md5":
                        extra = {"ContentMD5": _md5_b64(data)}
                    else:
                        part["ChecksumSHA256"] = base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")
                        extra = dict(part)
                    r = self.client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                                Body=data, **extra)
                    parts.append({"PartNumber": number, "ETag": r["ETag"], **part})
            self.client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
            except Exception:  # noqa: BLE001 - the next start aborts it anyway
                log.debug("could not abort the multipart upload of %s", rel)
            raise

    # -- looking ------------------------------------------------------------------
    def head(self, rel: str) -> dict[str, Any] | None:
        """The object's HEAD answer (with its stored checksum), or None."""
        head = self._unless_missing(
            lambda: self.client.head_object(Bucket=self.cfg.bucket, Key=self.cfg.key(rel), ChecksumMode="ENABLED"),
            f"looking up {rel}")
        return None if head is None else dict(head)

    def _unless_missing(self, request: Callable[[], Any], what: str) -> Any:
        """``request()``, or None if the key does not exist; any other
        failure is a ``StorageError`` saying ``what`` failed."""
        from botocore import exceptions as bx

        try:
            return request()
        except bx.ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(e, what) from None
        except bx.BotoCoreError as e:
            raise self._error(e, what) from None

    def heads(self, rels: Iterable[str]) -> Iterator[tuple[str, dict[str, Any] | None]]:
        """``head`` of many objects, ``concurrency`` at a time, in order."""
        yield from zip(rels := list(rels), self._pool.map(self.head, rels))

    @staticmethod
    def stored_sha256(head: dict[str, Any]) -> str | None:
        """The sha256 an object was stored with: our metadata, else a
        whole-object ``ChecksumSHA256`` (a multipart one is a checksum of
        checksums, which says nothing about the bytes as a whole)."""
        meta = (head.get("Metadata") or {}).get("sha256")
        if meta:
            return str(meta).lower()
        checksum = head.get("ChecksumSHA256")
        if checksum and "-" not in checksum:
            try:
                return base64.b64decode(checksum).hex()
            except (binascii.Error, ValueError):
                return None
        return None

    def existing(self, rels: Iterable[str]) -> set[str]:
        """Of ``rels``, those in the bucket, looking only at the keys the
        upload journal says may be there unrecorded (see ``UploadJournal``)."""
        rels = list(rels) if self.journal is None else self.journal.candidates(rels)
        found = set()
        for rel, head in self.heads(rels):
            if head is not None:
                found.add(rel)
                self._heads[rel] = head
        return found

    def adopt(self, rel: str, size: int | None, sha256: str) -> int | None:
        head = self._heads.pop(rel, None) or self.head(rel)
        if head is None:
            return None
        length = int(head.get("ContentLength", -1))
        if (size is not None and length != size) or self.stored_sha256(head) != sha256:
            return None
        return length

    def open(self, rel: str) -> IO[bytes] | None:
        """A stream of the object's bytes, or None if there is none."""
        got = self._unless_missing(lambda: self.client.get_object(Bucket=self.cfg.bucket, Key=self.cfg.key(rel)),
                                   f"reading {rel}")
        return None if got is None else got["Body"]

    def read(self, rel: str) -> bytes | None:
        body = self.open(rel)
        if body is None:
            return None
        try:
            return body.read()
        finally:
            body.close()

    def listing(self, top: str) -> Iterator[tuple[str, int, float]]:
        """Every object under ``top/`` as (web-relative path, size, mtime),
        in key order, streamed a page (1,000 keys) at a time."""
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.cfg.bucket, Prefix=self.cfg.key(top.rstrip("/") + "/")):
                for obj in page.get("Contents", []) or []:
                    yield self.cfg.rel(obj["Key"]), int(obj["Size"]), obj["LastModified"].timestamp()
        except Exception as e:  # noqa: BLE001
            raise self._error(e, f"listing {top}/") from None

    # -- deleting -----------------------------------------------------------------
    def remove(self, rels: Iterable[str], *, prune: bool = True) -> list[str]:
        removed: list[str] = []
        batch: list[str] = []
        for rel in rels:
            try:
                safe_relpath(rel)
            except Exception as e:  # noqa: BLE001 - never a key outside the tree
                log.error("not removing %s: %s", rel, e)
                continue
            batch.append(rel)
            if len(batch) == _DELETE_BATCH:
                removed += self._delete(batch)
                batch = []
        if batch:
            removed += self._delete(batch)
        return removed

    def _delete(self, rels: list[str]) -> list[str]:
        try:
            r = self.client.delete_objects(Bucket=self.cfg.bucket, Delete={
                "Objects": [{"Key": self.cfg.key(rel)} for rel in rels], "Quiet": True})
        except Exception as e:  # noqa: BLE001
            raise self._error(e, f"deleting {len(rels)} object(s)") from None
        failed = {self.cfg.rel(err["Key"]) for err in r.get("Errors", []) or [] if err.get("Code") != "NoSuchKey"}
        if failed:
            raise StorageError(f"{self.cfg.where}: deleting {len(failed)} object(s) failed, e.g. {sorted(failed)[0]}",
                               "http_status")
        return rels
