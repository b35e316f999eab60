"""A fake PyPI upstream: a real HTTP server on 127.0.0.1 speaking PyPI's protocol.

The mirror under test talks to this exactly as it would to pypi.org: the
XML-RPC changelog at ``POST /pypi``, the simple index (PEP 503 HTML and
PEP 691 JSON, with the PEP 592/658/700/714/740/792 fields), the legacy JSON
API and the ``/packages/...`` file store.  It is a real socket server (not an
httpx mock) so the client's connection handling, keep-alive, timeouts and
error paths are exercised for real.

Tests mutate the state while a sync runs; every mutation writes the same
journal events PyPI does, so the changelog and the pages always agree, unless
a fault is injected on purpose (see ``add_fault``).

Run as ``python -m tests.harness.fakepypi --port 0 --projects N --seed S`` to get a
standalone server for benchmarks and subprocess tests.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import random
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import xmlrpc.client
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, urlsplit

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from tests.harness.wheels import BuiltDist, make_blob_file, make_sdist, make_wheel

__all__ = [
    "BuiltDist",
    "FakePyPI",
    "Fault",
    "RequestRecord",
    "make_blob_file",
    "make_sdist",
    "make_wheel",
    "populate",
]

API_VERSION = "1.4"
JSON_TYPE = "application/vnd.pypi.simple.v1+json"
HTML_TYPE = "text/html"
FAULT_KINDS = frozenset(
    {"status", "reset", "truncate", "corrupt", "stale", "slow", "malformed"}
)
PROJECT_STATUSES = frozenset({"active", "archived", "quarantined", "deprecated"})
PROVENANCE_DOC = json.dumps({"version": 1, "attestation_bundles": []}).encode()
# How many earlier states of each project are kept for the "stale" fault.
_HISTORY_DEPTH = 8

# (method, path with query, status, body bytes sent).  Status 0 = the
# connection was reset without any response.
RequestRecord = tuple[str, str, int, int]


def _version_key(v: str) -> tuple[int, Version | str]:
    # Invalid versions (possible via add_file on hostile-upstream tests) sort
    # first instead of crashing the page render.
    try:
        return (1, Version(v))
    except InvalidVersion:
        return (0, v)


def _iso_micro(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------
# State.  Files and releases are immutable so that a snapshot of a project
# (for the "stale" fault) is a cheap shallow copy of its release dict.


@dataclass(frozen=True)
class _File:
    filename: str
    content: bytes
    metadata: bytes | None
    requires_python: str | None
    upload_time: datetime
    packagetype: str
    python_version: str
    provenance: bool
    project: str  # normalized name, for the provenance URL
    version: str
    sha256: str
    md5: str
    blake2b: str

    @classmethod
    def build(
        cls,
        dist: BuiltDist,
        *,
        project: str,
        version: str,
        requires_python: str | None,
        upload_time: datetime,
        provenance: bool,
    ) -> _File:
        content = dist.content
        return cls(
            filename=dist.filename,
            content=content,
            metadata=dist.metadata,
            requires_python=requires_python,
            upload_time=upload_time,
            packagetype=dist.packagetype,
            python_version=dist.python_version,
            provenance=provenance,
            project=project,
            version=version,
            sha256=hashlib.sha256(content).hexdigest(),
            md5=hashlib.md5(content).hexdigest(),
            blake2b=hashlib.blake2b(content, digest_size=32).hexdigest(),
        )

    @property
    def path(self) -> str:
        # PyPI's content-addressed layout: the blake2b-256 of the content, split.
        b2 = self.blake2b
        return f"/packages/{b2[:2]}/{b2[2:4]}/{b2[4:]}/{self.filename}"

    @property
    def provenance_path(self) -> str:
        return f"/integrity/{self.project}/{quote(self.version)}/{self.filename}/provenance"

    @property
    def metadata_sha256(self) -> str | None:
        return (
            None if self.metadata is None else hashlib.sha256(self.metadata).hexdigest()
        )


@dataclass(frozen=True)
class _Release:
    version: str
    files: tuple[_File, ...] = ()
    yanked: bool = False
    yanked_reason: str = ""
    deps: tuple[str, ...] = ()
    requires_python: str | None = None


@dataclass(frozen=True)
class _Snapshot:
    """What a project's page shows at one serial."""

    serial: int
    releases: Mapping[str, _Release]
    status: str
    status_reason: str | None


@dataclass
class _Project:
    name: str
    normalized: str
    last_serial: int
    releases: dict[str, _Release] = field(default_factory=dict)
    status: str = "active"
    status_reason: str | None = None
    history: list[_Snapshot] = field(default_factory=list)

    def snapshot(self) -> _Snapshot:
        return _Snapshot(
            self.last_serial, dict(self.releases), self.status, self.status_reason
        )


@dataclass
class Fault:
    """One injected fault.  ``fired`` counts how often it actually triggered."""

    kind: str
    match: str = ""
    count: int | None = None
    rate: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    fired: int = 0

    def applies(self, path: str, *, project_page: bool) -> bool:
        if self.count is not None and self.fired >= self.count:
            return False
        if self.match not in path:
            return False
        # A stale page only makes sense for /simple/<name>/.
        return self.kind != "stale" or project_page


@dataclass
class _Response:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    # "json" | "html" | "xml" | "bytes" | "text": picks the garbage for "malformed".
    kind: str = "text"
    # Raw routes may lie in Content-Length on purpose.
    explicit_length: bool = False


# --------------------------------------------------------------------------


class FakePyPI:
    """A PyPI look-alike on ``127.0.0.1:<ephemeral port>``, served from a thread.

    ``with FakePyPI() as up:`` starts and stops it; ``up.url`` has no trailing
    slash.  All state sits behind one lock, so tests may mutate it while a
    client is syncing.
    """

    def __init__(
        self, *, seed: int = 0, clock: Callable[[], float] = time.time, port: int = 0,
        split_hosts: bool = True, tls: tuple[Path, Path] | None = None,
    ) -> None:
        self._bind_port = port
        # As on PyPI, files (and .metadata) come from a second host, the
        # pages, the APIs and provenance from the first.
        self.split_hosts = split_hosts
        # (certificate chain, key): both listeners speak https.
        self.tls = tls
        # Sdists listed at index/packages/source/<l>/<name>/<file>, a redirect
        # to the file host (PyPI's short form).
        self.sdist_redirects = False
        self._lock = threading.RLock()
        self._clock = clock
        self._rng = random.Random(seed)
        self._serial = 0
        self._journal: list[tuple[str, str | None, int, str, int]] = []
        self._projects: dict[str, _Project] = {}
        # Downloadable files by URL path, with how many releases reference
        # each: a file stays downloadable until the last reference goes.
        self._blobs: dict[str, _File] = {}
        self._refs: Counter[str] = Counter()
        self._provenance: dict[str, str] = {}  # provenance path -> blob path
        self._faults: list[Fault] = []
        self._raw_json: dict[str, bytes] = {}
        self._raw_routes: dict[str, _Response] = {}
        self.requests: list[RequestRecord] = []
        # Knobs tests flip directly.
        self.changelog_page_size = 50000
        self.xmlrpc_enabled = True
        self.html_only = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._files_server: _Server | None = None
        self._files_thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> FakePyPI:
        if self._server is not None:
            raise RuntimeError("already started")
        self._stopping.clear()
        self._server, self._thread = self._listen(self._bind_port, "index")
        if self.split_hosts:
            self._files_server, self._files_thread = self._listen(0, "files")
        return self

    def _listen(self, port: int, role: str) -> tuple[_Server, threading.Thread]:
        server = _Server(("127.0.0.1", port), _Handler)
        server.fake = self
        server.role = role
        if self.tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*self.tls)
            # The handshake happens in the handler's thread, not in accept().
            server.socket = ctx.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakePyPI-{role}:{server.server_address[1]}",
            daemon=True,
        )
        thread.start()
        return server, thread

    def stop(self) -> None:
        servers = [(self._server, self._thread), (self._files_server, self._files_thread)]
        if self._server is None:
            return
        self._server = self._thread = self._files_server = self._files_thread = None
        self._stopping.set()  # wakes handlers sleeping in a "slow" fault
        for server, thread in servers:
            if server is None:
                continue
            server.shutdown()
            server.close_all_connections()
            server.server_close()
            if thread is not None:
                thread.join(timeout=5)
            server.join_handlers(timeout=5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The index host: pages, JSON API, XML-RPC, provenance."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """Connections both listeners accepted so far."""
        return sum(srv.accepted for srv in (self._server, self._files_server) if srv is not None)

    @property
    def files_url(self) -> str:
        """The file host (the index host itself without ``split_hosts``)."""
        if self._files_server is None:
            return self.url
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self._files_server.server_address[1]}"

    def _file_url(self, f: _File) -> str:
        if self.sdist_redirects and f.filename.endswith((".tar.gz", ".zip")):
            return f"{self.url}/packages/source/{f.project[0]}/{f.project}/{f.filename}"
        return self.files_url + f.path

    # -- read-only helpers for tests ---------------------------------------

    @property
    def serial(self) -> int:
        with self._lock:
            return self._serial

    @property
    def journal(self) -> list[tuple[str, str | None, int, str, int]]:
        with self._lock:
            return list(self._journal)

    def project_serial(self, name: str) -> int:
        with self._lock:
            return self._get(name).last_serial

    def project_names(self) -> list[str]:
        """Normalized names of the live projects."""
        with self._lock:
            return sorted(self._projects)

    def has_project(self, name: str) -> bool:
        with self._lock:
            return canonicalize_name(name) in self._projects

    def versions(self, name: str) -> list[str]:
        with self._lock:
            return sorted(self._get(name).releases, key=_version_key)

    def filenames(self, name: str) -> list[str]:
        with self._lock:
            return sorted(f.filename for f in self._files_of(self._get(name)))

    def file_path(self, name: str, filename: str) -> str:
        """URL path (``/packages/..../<filename>``) of a live file."""
        return self._find_file(name, filename).path

    def file_url(self, name: str, filename: str) -> str:
        with self._lock:
            return self._file_url(self._blobs[self.file_path(name, filename)])

    def file_content(self, name: str, filename: str) -> bytes:
        return self._find_file(name, filename).content

    def file_sha256(self, name: str, filename: str) -> str:
        return self._find_file(name, filename).sha256

    def file_metadata(self, name: str, filename: str) -> bytes | None:
        return self._find_file(name, filename).metadata

    # -- mutations -----------------------------------------------------------

    def add_project(self, name: str) -> int:
        """Register an empty project ("create"); returns the new serial."""
        with self._lock:
            norm = canonicalize_name(name)
            if norm in self._projects:
                raise ValueError(f"project {name!r} exists")
            self._projects[norm] = _Project(name=name, normalized=norm, last_serial=0)
            return self._event(norm, None, "create")

    def add_release(
        self,
        name: str,
        version: str,
        *,
        deps: Sequence[str] = (),
        requires_python: str | None = None,
        sdist: bool = True,
        wheel: bool = True,
        provenance: bool = False,
        yanked: bool = False,
    ) -> list[str]:
        """Upload a release built by ``tests.harness.wheels``; returns its file names.

        ``yanked=True`` uploads then yanks (an extra "yank release" event),
        which is the only way a yanked release can come about on PyPI.
        """
        dists: list[BuiltDist] = []
        if sdist:
            dists.append(
                make_sdist(name, version, deps=deps, requires_python=requires_python)
            )
        if wheel:
            dists.append(
                make_wheel(name, version, deps=deps, requires_python=requires_python)
            )
        with self._lock:
            proj = self._ensure_project(name)
            if version in proj.releases:
                raise ValueError(f"{name} {version} exists")
            self._remember(proj)
            self._new_release(
                proj, version, deps=tuple(deps), requires_python=requires_python
            )
            for dist in dists:
                self._add_file(proj, version, dist, requires_python, None, provenance)
            if yanked:
                rel = proj.releases[version]
                proj.releases[version] = replace(rel, yanked=True, yanked_reason="")
                self._event(proj.normalized, version, "yank release")
        return [d.filename for d in dists]

    def add_file(
        self,
        name: str,
        version: str,
        dist: BuiltDist,
        *,
        requires_python: str | None = None,
        upload_time: datetime | None = None,
        provenance: bool = False,
    ) -> str:
        """Upload custom bytes; creates the project/release if needed."""
        with self._lock:
            proj = self._ensure_project(name)
            self._remember(proj)
            if version not in proj.releases:
                self._new_release(
                    proj, version, deps=(), requires_python=requires_python
                )
            self._add_file(
                proj, version, dist, requires_python, upload_time, provenance
            )
        return dist.filename

    def remove_file(self, name: str, filename: str) -> int:
        with self._lock:
            proj = self._get(name)
            for version, rel in proj.releases.items():
                kept = tuple(f for f in rel.files if f.filename != filename)
                if len(kept) != len(rel.files):
                    self._remember(proj)
                    gone = next(f for f in rel.files if f.filename == filename)
                    proj.releases[version] = replace(rel, files=kept)
                    self._unref(gone)
                    return self._event(
                        proj.normalized, version, f"remove file {filename}"
                    )
            raise KeyError(f"{name}: no file {filename!r}")

    def yank(self, name: str, version: str, reason: str = "") -> int:
        with self._lock:
            proj = self._get(name)
            rel = self._release(proj, version)
            self._remember(proj)
            proj.releases[version] = replace(rel, yanked=True, yanked_reason=reason)
            return self._event(proj.normalized, version, "yank release")

    def unyank(self, name: str, version: str) -> int:
        with self._lock:
            proj = self._get(name)
            rel = self._release(proj, version)
            self._remember(proj)
            proj.releases[version] = replace(rel, yanked=False, yanked_reason="")
            return self._event(proj.normalized, version, "unyank release")

    def remove_release(self, name: str, version: str) -> int:
        with self._lock:
            proj = self._get(name)
            rel = self._release(proj, version)
            self._remember(proj)
            del proj.releases[version]
            for f in rel.files:
                self._unref(f)
            return self._event(proj.normalized, version, "remove release")

    def remove_project(self, name: str) -> int:
        with self._lock:
            proj = self._get(name)
            for rel in proj.releases.values():
                for f in rel.files:
                    self._unref(f)
            serial = self._event(proj.normalized, None, "remove project")
            del self._projects[proj.normalized]
            return serial

    def touch(self, name: str) -> int:
        """A change that bumps the serial but not the page (a role change)."""
        with self._lock:
            proj = self._get(name)
            self._remember(proj)
            return self._event(proj.normalized, None, "add Owner alice")

    def set_status(self, name: str, status: str, reason: str | None = None) -> None:
        """PEP 792 project status.  PyPI writes no journal event for it, so neither do we."""
        if status not in PROJECT_STATUSES:
            raise ValueError(f"unknown status {status!r}")
        with self._lock:
            proj = self._get(name)
            proj.status = status
            proj.status_reason = reason

    # -- fault injection and hostile responses -------------------------------

    def add_fault(
        self,
        kind: str,
        *,
        match: str = "",
        count: int | None = None,
        rate: float = 1.0,
        **params: Any,
    ) -> Fault:
        """Make matching requests misbehave; see the module tests for each kind.

        Faults are checked in the order added.  "slow" delays and lets the
        next fault (or the normal response) follow; any other kind that fires
        decides the response.  ``rate`` draws from the seeded RNG, so a run
        is reproducible for a given request order.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        if not 0.0 <= rate <= 1.0:
            raise ValueError("rate must be within [0, 1]")
        fault = Fault(
            kind=kind, match=match, count=count, rate=rate, params=dict(params)
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def set_raw_project_json(self, name: str, obj: Any) -> None:
        """Serve ``obj`` (JSON-encoded unless bytes) as ``/simple/<name>/`` JSON.

        ``None`` removes the override.  The key is the normalized name, so the
        301 for other spellings still happens first.
        """
        norm = canonicalize_name(name)
        with self._lock:
            if obj is None:
                self._raw_json.pop(norm, None)
            else:
                body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
                self._raw_json[norm] = body

    def add_raw_route(
        self,
        path: str,
        status: int = 200,
        body: bytes = b"",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Serve exactly these bytes at ``path`` (query ignored), before any other route.

        A Content-Length in ``headers`` is sent as given, even if it is a lie;
        the connection is then closed after the response.
        """
        hdrs = list((headers or {}).items())
        explicit = any(k.lower() == "content-length" for k, _ in hdrs)
        with self._lock:
            self._raw_routes[path] = _Response(
                status=status,
                body=body,
                headers=hdrs,
                kind="bytes",
                explicit_length=explicit,
            )

    def remove_raw_route(self, path: str) -> None:
        with self._lock:
            self._raw_routes.pop(path, None)

    # -- request log --------------------------------------------------------

    def reset_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def requests_matching(self, substring: str) -> list[RequestRecord]:
        with self._lock:
            return [r for r in self.requests if substring in r[1]]

    def bytes_sent(self) -> int:
        with self._lock:
            return sum(r[3] for r in self.requests)

    def _log(self, record: RequestRecord) -> None:
        with self._lock:
            self.requests.append(record)

    # -- internals: state ----------------------------------------------------

    def _event(self, norm: str, version: str | None, action: str) -> int:
        self._serial += 1
        proj = self._projects[norm]
        proj.last_serial = self._serial
        self._journal.append(
            (proj.name, version, int(self._clock()), action, self._serial)
        )
        return self._serial

    def _get(self, name: str) -> _Project:
        try:
            return self._projects[canonicalize_name(name)]
        except KeyError:
            raise KeyError(f"no project {name!r}") from None

    @staticmethod
    def _release(proj: _Project, version: str) -> _Release:
        try:
            return proj.releases[version]
        except KeyError:
            raise KeyError(f"{proj.name}: no release {version!r}") from None

    @staticmethod
    def _files_of(proj: _Project) -> Iterator[_File]:
        for rel in proj.releases.values():
            yield from rel.files

    def _find_file(self, name: str, filename: str) -> _File:
        with self._lock:
            for f in self._files_of(self._get(name)):
                if f.filename == filename:
                    return f
        raise KeyError(f"{name}: no file {filename!r}")

    def _ensure_project(self, name: str) -> _Project:
        norm = canonicalize_name(name)
        if norm not in self._projects:
            self.add_project(name)
        return self._projects[norm]

    def _remember(self, proj: _Project) -> None:
        # Keep the page as it is now, before this mutation, for "stale".
        if proj.last_serial:
            proj.history.append(proj.snapshot())
            del proj.history[:-_HISTORY_DEPTH]

    def _new_release(
        self,
        proj: _Project,
        version: str,
        *,
        deps: tuple[str, ...],
        requires_python: str | None,
    ) -> None:
        proj.releases[version] = _Release(
            version, deps=deps, requires_python=requires_python
        )
        self._event(proj.normalized, version, "new release")

    def _add_file(
        self,
        proj: _Project,
        version: str,
        dist: BuiltDist,
        requires_python: str | None,
        upload_time: datetime | None,
        provenance: bool,
    ) -> None:
        if any(f.filename == dist.filename for f in self._files_of(proj)):
            raise ValueError(f"{proj.name}: file {dist.filename!r} already exists")
        when = upload_time or datetime.fromtimestamp(self._clock(), tz=UTC)
        f = _File.build(
            dist,
            project=proj.normalized,
            version=version,
            requires_python=requires_python,
            upload_time=when,
            provenance=provenance,
        )
        rel = proj.releases[version]
        proj.releases[version] = replace(rel, files=rel.files + (f,))
        self._blobs[f.path] = f
        self._refs[f.path] += 1
        if provenance:
            self._provenance[f.provenance_path] = f.path
        self._event(
            proj.normalized, version, f"add {f.python_version} file {f.filename}"
        )

    def _unref(self, f: _File) -> None:
        self._refs[f.path] -= 1
        if self._refs[f.path] <= 0:
            del self._refs[f.path]
            self._blobs.pop(f.path, None)
            self._provenance.pop(f.provenance_path, None)

    # -- internals: rendering ------------------------------------------------

    def _file_json(self, f: _File, rel: _Release) -> dict[str, Any]:
        meta: dict[str, str] | bool = (
            {"sha256": f.metadata_sha256} if f.metadata_sha256 is not None else False
        )
        yanked: bool | str = (rel.yanked_reason or True) if rel.yanked else False
        return {
            "filename": f.filename,
            "url": self._file_url(f),
            "hashes": {"sha256": f.sha256},
            "requires-python": f.requires_python,
            "size": len(f.content),
            "upload-time": _iso_micro(f.upload_time),
            "yanked": yanked,
            "core-metadata": meta,
            "data-dist-info-metadata": meta,
            "provenance": (self.url + f.provenance_path) if f.provenance else None,
        }

    def _snapshot_files(self, snap: _Snapshot) -> list[tuple[_File, _Release]]:
        # PEP 792: a quarantined project offers nothing to install.
        if snap.status == "quarantined":
            return []
        pairs = [(f, rel) for rel in snap.releases.values() for f in rel.files]
        return sorted(pairs, key=lambda p: p[0].filename)

    def _render_project(
        self, proj: _Project, as_json: bool, stale: bool
    ) -> tuple[bytes, int]:
        snap = proj.snapshot()
        if stale:
            if proj.history:
                snap = proj.history[-1]
            else:
                # No older page exists (a single-mutation project): the same
                # content under an older serial still makes the point.
                snap = replace(snap, serial=max(0, snap.serial - 1))
        files = self._snapshot_files(snap)
        versions = (
            []
            if snap.status == "quarantined"
            else sorted(snap.releases, key=_version_key)
        )
        status: dict[str, str] = {"status": snap.status}
        if snap.status_reason is not None:
            status["reason"] = snap.status_reason
        if as_json:
            doc = {
                "meta": {"api-version": API_VERSION, "_last-serial": snap.serial},
                "name": proj.normalized,
                "versions": versions,
                "project-status": status,
                "files": [self._file_json(f, rel) for f, rel in files],
            }
            return json.dumps(doc).encode(), snap.serial
        esc = html.escape
        out = [
            "<!DOCTYPE html>",
            "<html>",
            "  <head>",
            f'    <meta name="pypi:repository-version" content="{API_VERSION}">',
            f'    <meta name="pypi:project-status" content="{esc(snap.status)}">',
        ]
        if snap.status_reason is not None:
            out.append(
                f'    <meta name="pypi:project-status-reason" content="{esc(snap.status_reason)}">'
            )
        out += [
            f"    <title>Links for {esc(proj.normalized)}</title>",
            "  </head>",
            "  <body>",
            f"    <h1>Links for {esc(proj.normalized)}</h1>",
        ]
        for f, rel in files:
            attrs = [f'href="{esc(self._file_url(f))}#sha256={f.sha256}"']
            if f.requires_python is not None:
                attrs.append(f'data-requires-python="{esc(f.requires_python)}"')
            if rel.yanked:
                attrs.append(f'data-yanked="{esc(rel.yanked_reason)}"')
            if f.metadata_sha256 is not None:
                attrs.append(f'data-dist-info-metadata="sha256={f.metadata_sha256}"')
                attrs.append(f'data-core-metadata="sha256={f.metadata_sha256}"')
            if f.provenance:
                attrs.append(f'data-provenance="{esc(self.url + f.provenance_path)}"')
            out.append(f"    <a {' '.join(attrs)}>{esc(f.filename)}</a><br />")
        out += ["  </body>", "</html>", f"<!--SERIAL {snap.serial}-->", ""]
        return "\n".join(out).encode(), snap.serial

    def _render_root(self, as_json: bool) -> bytes:
        projects = sorted(self._projects.values(), key=lambda p: p.normalized)
        if as_json:
            doc = {
                "meta": {"api-version": API_VERSION, "_last-serial": self._serial},
                "projects": [
                    {"name": p.name, "_last-serial": p.last_serial} for p in projects
                ],
            }
            return json.dumps(doc).encode()
        out = [
            "<!DOCTYPE html>",
            "<html>",
            "  <head>",
            f'    <meta name="pypi:repository-version" content="{API_VERSION}">',
            "    <title>Simple index</title>",
            "  </head>",
            "  <body>",
        ]
        out += [
            f'    <a href="/simple/{p.normalized}/">{html.escape(p.name)}</a><br />'
            for p in projects
        ]
        out += ["  </body>", "</html>", f"<!--SERIAL {self._serial}-->", ""]
        return "\n".join(out).encode()

    def _legacy_file(self, f: _File, rel: _Release) -> dict[str, Any]:
        return {
            "filename": f.filename,
            "url": self._file_url(f),
            "digests": {"md5": f.md5, "sha256": f.sha256, "blake2b_256": f.blake2b},
            "md5_digest": f.md5,
            "size": len(f.content),
            "upload_time": f.upload_time.strftime("%Y-%m-%dT%H:%M:%S"),
            "upload_time_iso_8601": _iso_micro(f.upload_time),
            "yanked": rel.yanked,
            "yanked_reason": (rel.yanked_reason or None) if rel.yanked else None,
            "packagetype": f.packagetype,
            "python_version": f.python_version,
            "requires_python": f.requires_python,
            "has_sig": False,
            "comment_text": "",
        }

    def _render_legacy(self, proj: _Project, version: str | None) -> bytes | None:
        rels = proj.releases
        if version is not None:
            if version not in rels:
                return None
            latest = rels[version]
        elif rels:
            ordered = sorted(rels, key=_version_key)

            def is_final(v: str) -> bool:
                k = _version_key(v)[1]
                return isinstance(k, Version) and not k.is_prerelease

            # PyPI's "latest": the newest non-yanked final release, falling back
            # to the newest non-yanked, then to the newest at all.
            live = [v for v in ordered if not rels[v].yanked]
            finals = [v for v in live if is_final(v)]
            latest = rels[(finals or live or ordered)[-1]]
        else:
            latest = None
        info = {
            "name": proj.name,
            "version": latest.version if latest else None,
            "summary": f"Test distribution {proj.name}",
            "requires_python": latest.requires_python if latest else None,
            "requires_dist": list(latest.deps) if latest and latest.deps else None,
            "yanked": latest.yanked if latest else False,
            "yanked_reason": (latest.yanked_reason or None)
            if latest and latest.yanked
            else None,
            "project_url": f"{self.url}/project/{proj.normalized}/",
        }
        doc: dict[str, Any] = {"info": info, "last_serial": proj.last_serial}
        if version is None:
            doc["releases"] = {
                v: [self._legacy_file(f, rels[v]) for f in rels[v].files]
                for v in sorted(rels, key=_version_key)
            }
        doc["urls"] = (
            [self._legacy_file(f, latest) for f in latest.files] if latest else []
        )
        doc["vulnerabilities"] = []
        return json.dumps(doc).encode()

    def _xmlrpc(self, body: bytes) -> bytes:
        def fault(code: int, msg: str) -> bytes:
            f = xmlrpc.client.Fault(code, msg)
            return xmlrpc.client.dumps(f, methodresponse=True).encode()

        try:
            params, method = xmlrpc.client.loads(body)
        except Exception as exc:  # noqa: BLE001 - any parse error becomes a Fault
            return fault(-32700, f"parse error: {exc}")
        result: Any
        with self._lock:
            if method == "changelog_last_serial" and not params:
                result = self._serial
            elif method == "changelog_since_serial" and len(params) == 1:
                since = params[0]
                if not isinstance(since, int):
                    return fault(-32602, "server error; invalid parameters")
                # Serials are dense and start at 1: journal[i] has serial i+1.
                start = max(0, since)
                page = self._journal[start : start + self.changelog_page_size]
                result = [list(e) for e in page]
            elif method == "list_packages_with_serial" and not params:
                result = {p.name: p.last_serial for p in self._projects.values()}
            elif method in _XMLRPC_METHODS:
                return fault(-32602, "server error; invalid parameters")
            else:
                return fault(
                    -32601, f"server error; requested method not found: {method}"
                )
        # PyPI sends <nil/> for the version of project-level events.
        return xmlrpc.client.dumps(
            (result,), methodresponse=True, allow_none=True
        ).encode()

    # -- internals: routing --------------------------------------------------

    def _route(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        stale: bool,
        role: str = "index",
    ) -> _Response:
        with self._lock:
            raw = self._raw_routes.get(path)
        if raw is not None:
            return raw
        if role == "files":
            if method in ("GET", "HEAD") and path.startswith("/packages/"):
                return self._download(path, headers)
            return _not_found()
        if path == "/pypi" and method == "POST":
            if not self.xmlrpc_enabled:
                return _not_found()
            return _Response(200, self._xmlrpc(body), "text/xml", kind="xml")
        if method not in ("GET", "HEAD"):
            return _Response(
                405, b"method not allowed\n", "text/plain", [("Allow", "GET, HEAD")]
            )
        if path == "/simple":
            return _redirect("/simple/" + (f"?{query}" if query else ""))
        if path == "/simple/":
            as_json = self._wants_json(headers)
            with self._lock:
                page = self._render_root(as_json)
                serial = self._serial
            return self._page(page, as_json, serial, headers)
        m = re.fullmatch(r"/simple/([^/]+)(/?)", path)
        if m:
            return self._project_page(
                m.group(1), bool(m.group(2)), query, headers, stale
            )
        m = re.fullmatch(r"/pypi/([^/]+)/(?:([^/]+)/)?json", path)
        if m:
            with self._lock:
                proj = self._projects.get(canonicalize_name(m.group(1)))
                doc = self._render_legacy(proj, m.group(2)) if proj else None
                serial = proj.last_serial if proj else 0
            if doc is None:
                return _Response(
                    404, b'{"message": "Not Found"}', "application/json", kind="json"
                )
            resp = _Response(200, doc, "application/json", kind="json")
            resp.headers.append(("X-PyPI-Last-Serial", str(serial)))
            return resp
        m = re.fullmatch(r"/packages/source/[^/]/([^/]+)/([^/]+?)(\.metadata)?", path)
        if m:
            with self._lock:
                found = [f for f in self._blobs.values() if f.project == m.group(1) and f.filename == m.group(2)]
            if found:
                return _redirect(self.files_url + found[0].path + (m.group(3) or ""))
            return _not_found()
        if path.startswith("/packages/") and not self.split_hosts:
            return self._download(path, headers)
        if path.startswith("/integrity/"):
            with self._lock:
                live = path in self._provenance
            if live:
                return _Response(200, PROVENANCE_DOC, "application/json", kind="json")
        return _not_found()

    def _project_page(
        self,
        name: str,
        slash: bool,
        query: str,
        headers: Mapping[str, str],
        stale: bool,
    ) -> _Response:
        norm = canonicalize_name(name)
        with self._lock:
            proj = self._projects.get(norm)
            raw = self._raw_json.get(norm)
        if proj is None and raw is None:
            return _not_found()
        if name != norm or not slash:
            # PEP 503: clients must cope with a redirect to the normalized URL.
            return _redirect(f"/simple/{norm}/" + (f"?{query}" if query else ""))
        as_json = self._wants_json(headers)
        with self._lock:
            if as_json and raw is not None:
                serial = proj.last_serial if proj is not None else self._serial
                return self._page(raw, True, serial, headers)
            if proj is None:
                return _not_found()
            page, serial = self._render_project(proj, as_json, stale)
        return self._page(page, as_json, serial, headers)

    def _page(
        self, body: bytes, as_json: bool, serial: int, headers: Mapping[str, str]
    ) -> _Response:
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        extra = [
            ("ETag", etag),
            ("X-PyPI-Last-Serial", str(serial)),
            ("Vary", "Accept, Accept-Encoding"),
            ("Cache-Control", "max-age=600, public"),
        ]
        if _etag_matches(headers.get("if-none-match"), etag):
            return _Response(304, b"", None, extra)
        ctype = JSON_TYPE if as_json else HTML_TYPE
        return _Response(200, body, ctype, extra, kind="json" if as_json else "html")

    def _wants_json(self, headers: Mapping[str, str]) -> bool:
        if self.html_only:
            return False
        json_q, html_q = 0.0, 0.0
        for item in headers.get("accept", "").split(","):
            parts = [p.strip() for p in item.split(";")]
            mtype = parts[0].lower()
            q = 1.0
            for p in parts[1:]:
                if p.lower().startswith("q="):
                    try:
                        q = float(p[2:])
                    except ValueError:
                        q = 0.0
            if mtype in (JSON_TYPE, "application/vnd.pypi.simple.latest+json"):
                json_q = max(json_q, q)
            elif mtype in (
                "text/html",
                "application/vnd.pypi.simple.v1+html",
                "application/vnd.pypi.simple.latest+html",
                "*/*",
                "text/*",
            ):
                html_q = max(html_q, q)
        return json_q > 0 and json_q >= html_q

    def _download(self, path: str, headers: Mapping[str, str]) -> _Response:
        with self._lock:
            f = self._blobs.get(path)
            meta: bytes | None = None
            if f is None and path.endswith(".metadata"):
                owner = self._blobs.get(path[: -len(".metadata")])
                meta = owner.metadata if owner is not None else None
        if meta is not None:
            return _Response(200, meta, "application/octet-stream", kind="bytes")
        if f is None:
            return _not_found()
        body = f.content
        extra: list[tuple[str, str]] = [
            ("Accept-Ranges", "bytes"),
            ("ETag", f'"{f.md5}"'),
        ]
        rng = headers.get("range")
        if rng:
            # One "bytes=a-b" / "bytes=a-" / "bytes=-n" range, as a CDN would:
            # lets a client resume after a "truncate" fault.
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            size = len(body)
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = int(m.group(2)) if m.group(2) else size - 1
                else:
                    start, end = max(0, size - int(m.group(2))), size - 1
                end = min(end, size - 1)
                if start <= end:
                    extra.append(("Content-Range", f"bytes {start}-{end}/{size}"))
                    return _Response(
                        206,
                        body[start : end + 1],
                        "application/octet-stream",
                        extra,
                        "bytes",
                    )
                extra.append(("Content-Range", f"bytes */{size}"))
                return _Response(416, b"", "text/plain", extra)
        return _Response(200, body, "application/octet-stream", extra, kind="bytes")

    # -- internals: faults ---------------------------------------------------

    def _pick_faults(self, path: str) -> tuple[list[Fault], Fault | None]:
        project_page = re.fullmatch(r"/simple/[^/]+/", path) is not None
        slow: list[Fault] = []
        with self._lock:
            for fault in self._faults:
                if not fault.applies(path, project_page=project_page):
                    continue
                if fault.rate < 1.0 and self._rng.random() >= fault.rate:
                    continue
                fault.fired += 1
                if fault.kind == "slow":
                    slow.append(fault)
                    continue
                return slow, fault
        return slow, None

    def _corrupt(self, body: bytes) -> bytes:
        if not body:
            return body
        data = bytearray(body)
        with self._lock:
            positions = {
                self._rng.randrange(len(data)) for _ in range(min(8, len(data)))
            }
        for pos in positions:
            data[pos] ^= 0xFF
        return bytes(data)


_XMLRPC_METHODS = frozenset(
    {"changelog_last_serial", "changelog_since_serial", "list_packages_with_serial"}
)


def _not_found() -> _Response:
    return _Response(404, b"Not Found\n", "text/plain")


def _redirect(location: str) -> _Response:
    return _Response(
        301, b"Moved Permanently\n", "text/plain", [("Location", location)]
    )


def _etag_matches(header: str | None, etag: str) -> bool:
    if not header:
        return False
    # If-None-Match uses the weak comparison: W/ prefixes are ignored.
    for cand in header.split(","):
        cand = cand.strip()
        if cand == "*" or cand.removeprefix("W/") == etag:
            return True
    return False


_MALFORMED = {
    "json": b"{not json",
    "html": b"<html><body><a href=",
    "xml": b"<not xml",
    "bytes": b"\x00garbage\xff",
    "text": b"\x00garbage\xff",
}


# --------------------------------------------------------------------------
# HTTP plumbing.


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Don't let a slow client stall shutdown.
    block_on_close = False
    fake: FakePyPI
    role: str = "index"

    def __init__(
        self, addr: tuple[str, int], handler: type[BaseHTTPRequestHandler]
    ) -> None:
        self._conns: set[socket.socket] = set()
        self.accepted = 0  # connections accepted, ever
        self._handler_threads: set[threading.Thread] = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's FQDN (a DNS lookup); the
        # fake has no use for it and must never touch a resolver.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(self.server_address)
        self.server_address = self.socket.getsockname()
        self.server_name = "127.0.0.1"
        self.server_port = int(self.server_address[1])

    def track(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self.accepted += 1
            self._conns.add(conn)
            self._handler_threads.add(threading.current_thread())

    def untrack(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.discard(conn)
            self._handler_threads.discard(threading.current_thread())

    def close_all_connections(self) -> None:
        # Handler threads block reading the next keep-alive request; shutting
        # their sockets down makes them see EOF and exit now.
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def join_handlers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._conns_lock:
            threads = list(self._handler_threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response are routine in fault tests.
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakePyPI/1.0"
    sys_version = ""
    server: _Server

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            self.request.do_handshake()  # a client refusing our certificate ends here
            self.request.settimeout(None)
        super().setup()
        # Headers and body go out in separate writes; with Nagle on, the
        # second waits for the client's delayed ACK (~40 ms per request).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the structured log is FakePyPI.requests

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        fake = self.server.fake
        method = self.command
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        target = self.path
        split = urlsplit(target)
        path, query = split.path, split.query
        headers = {k.lower(): v for k, v in self.headers.items()}

        slow, fault = fake._pick_faults(path)
        for s in slow:
            if fake._stopping.wait(float(s.params.get("delay", 1.0))):
                self.close_connection = True
                return

        if fault is not None and fault.kind == "status":
            status = int(fault.params.get("status", 503))
            resp = _Response(status, f"injected {status}\n".encode(), "text/plain")
            for k, v in dict(fault.params.get("headers", {})).items():
                resp.headers.append((k, v))
            self._send(method, target, resp)
            return
        if fault is not None and fault.kind == "reset":
            fake._log((method, target, 0, 0))
            self._reset()
            return

        resp = fake._route(
            method,
            path,
            query,
            headers,
            body,
            stale=fault is not None and fault.kind == "stale",
            role=self.server.role,
        )
        if fault is not None and fault.kind == "malformed" and resp.status == 200:
            resp = replace(
                resp,
                body=_MALFORMED[resp.kind],
                headers=[(k, v) for k, v in resp.headers if k.lower() != "etag"],
            )
        elif fault is not None and fault.kind == "corrupt":
            resp = replace(resp, body=fake._corrupt(resp.body))
        truncate = fault is not None and fault.kind == "truncate"
        self._send(method, target, resp, truncate=truncate)

    def _send(
        self, method: str, target: str, resp: _Response, *, truncate: bool = False
    ) -> None:
        fake = self.server.fake
        has_body = method != "HEAD" and resp.status not in (204, 304)
        body = resp.body if has_body else b""
        if truncate:
            body = body[: len(body) // 2]
        # Logged before writing: a test that just received the response must
        # find it in the log, and the handler may still be mid-write.
        fake._log((method, target, resp.status, len(body)))
        self.send_response(resp.status)
        if resp.content_type and resp.status != 304:
            self.send_header("Content-Type", resp.content_type)
        for k, v in resp.headers:
            self.send_header(k, v)
        if not resp.explicit_length and resp.status != 304:
            self.send_header("Content-Length", str(len(resp.body)))
        if truncate or resp.explicit_length:
            # The framing is broken on purpose: this connection cannot carry
            # another request.
            self.close_connection = True
        self.end_headers()
        if body:
            self.wfile.write(body)
        self.wfile.flush()

    def _reset(self) -> None:
        # SO_LINGER {on, 0} makes close() send RST instead of FIN, so the
        # client sees "connection reset" rather than a clean EOF.
        self.close_connection = True
        conn = self.connection
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The buffered reader holds a reference to the socket; close it first
        # or close() would not release the descriptor (and send no RST).  The
        # writer holds none, and handle_one_request() still flushes it.
        self.rfile.close()
        conn.close()


# --------------------------------------------------------------------------
# Standalone process.


def populate(up: FakePyPI, projects: int, seed: int = 0, *, blob_size: int = 0) -> None:
    """Fill ``up`` with a reproducible corpus of ``projects`` projects.

    Names mix spellings ("Pkg_Name.3") so normalization is exercised; each
    project has 1-3 releases of sdist + wheel, some with dependencies,
    requires-python, yanks and provenance.
    """
    rng = random.Random(seed)
    names: list[str] = []
    for i in range(projects):
        style = rng.randrange(4)
        base = f"pkg-{i:05d}"
        name = {
            0: base,
            1: base.replace("-", "_"),
            2: base.replace("-", ".").title(),
            3: base.upper(),
        }[style]
        names.append(name)
        for r in range(rng.randint(1, 3)):
            deps = [
                canonicalize_name(d)
                for d in rng.sample(names[:-1], min(len(names) - 1, rng.randrange(3)))
            ]
            up.add_release(
                name,
                f"1.{r}.0",
                deps=deps,
                requires_python=">=3.8" if rng.random() < 0.5 else None,
                provenance=rng.random() < 0.2,
                yanked=rng.random() < 0.05,
            )
        if blob_size:
            up.add_file(
                name,
                "1.0.0",
                make_blob_file(f"{name}-blob", "1.0.0", blob_size, seed + i),
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.harness.fakepypi", description=__doc__
    )
    parser.add_argument(
        "--port", type=int, default=0, help="0 (the default) picks a free port"
    )
    parser.add_argument("--projects", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--blob-size",
        type=int,
        default=0,
        help="add one random file of this size per project",
    )
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    up = FakePyPI(seed=args.seed, port=args.port)
    populate(up, args.projects, args.seed, blob_size=args.blob_size)
    with up:
        print(f"URL {up.url}", flush=True)
        # A timed wait keeps the main thread returning to the interpreter so
        # the signal handler runs promptly.
        while not stop.wait(0.2):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
