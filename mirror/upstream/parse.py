"""Pure parsers for what upstream sends: the changelog, the root index,
project pages (PEP 691 JSON and PEP 503 HTML) and serial headers.

No I/O here (``mirror.upstream`` does the requests), so hostile or malformed
responses are tested without a network.  Upstream data is untrusted: names go
through ``normalize_name``, file URLs through ``file_url`` and
``file_relpath``; a bad file entry is dropped (and reported), a bad page is
refused whole with ``MalformedResponse``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from html.parser import HTMLParser
from typing import Any, TypeGuard
from urllib.parse import urljoin, urlsplit, urlunsplit

from mirror.errors import (
    MalformedResponse,
    UnsafeInput,
    UnsafeName,
    UnsafePath,
    UnsafeURL,
    UnsupportedAPIVersion,
)
from mirror.model import (
    ChangeEvent,
    NormalizedName,
    ProjectSnapshot,
    ReleaseFile,
    RootEntry,
    Serial,
    file_relpath,
    normalize_name,
)

log = logging.getLogger(__name__)

JSON_TYPE = "application/vnd.pypi.simple.v1+json"
ACCEPT = f"{JSON_TYPE}, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1"
SUPPORTED_MAJOR = 1
SUPPORTED_MINOR = 4
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HTML_OPEN = re.compile(r"<html[\s>]", re.I)
_HTML_CLOSE = re.compile(r"</html\s*>", re.I)
# Serials are stored as SQLite INTEGERs: a larger one from upstream would
# crash the state layer (and poison the feed position), so it is malformed.
_MAX_SERIAL = 2**63 - 1


def is_serial(v: object) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_SERIAL


# -- pure parsing ---------------------------------------------------------------


def check_api_version(version: object, *, where: str) -> str:
    if version is None:
        return "1.0"
    if not isinstance(version, str) or not re.fullmatch(r"\d+\.\d+", version):
        raise MalformedResponse(f"{where}: bad api-version {version!r}")
    major, minor = (int(x) for x in version.split("."))
    if major > SUPPORTED_MAJOR:
        raise UnsupportedAPIVersion(f"{where}: api-version {version} has a major version above {SUPPORTED_MAJOR}; refusing it")
    if major == SUPPORTED_MAJOR and minor > SUPPORTED_MINOR:
        log.warning("%s: api-version %s is newer than %d.%d; unknown fields are ignored",
                    where, version, SUPPORTED_MAJOR, SUPPORTED_MINOR)
    return version


def file_url(page_url: str, href: str, *, allow_http: bool) -> str:
    """Absolute file URL without fragment; refuses any scheme but https (and http if allowed)."""
    if not isinstance(href, str) or not href or "\x00" in href or "\\" in href:
        raise UnsafeURL(f"bad file URL {href!r:.200}")
    url = urljoin(page_url, href)
    parts = urlsplit(url)
    allowed = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in allowed or not parts.netloc:
        raise UnsafeURL(f"refused file URL {url!r:.200} (scheme {parts.scheme!r})")
    return urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, ""))


def parse_changelog(rows: object) -> list[ChangeEvent]:
    if not isinstance(rows, list):
        raise MalformedResponse(f"changelog_since_serial returned {type(rows).__name__}, not a list")
    events = []
    for row in rows:
        if (
            not isinstance(row, (list, tuple)) or len(row) != 5
            or not isinstance(row[0], str) or not isinstance(row[3], str)
            or not is_serial(row[4])
        ):
            raise MalformedResponse(f"bad changelog row {row!r:.200}")
        name, version, ts, action, serial = row
        events.append(ChangeEvent(name, version if isinstance(version, str) else None,
                                  int(ts) if isinstance(ts, int) else 0, action, Serial(serial)))
    return events


def parse_root_json(body: bytes) -> tuple[list[RootEntry], Serial | None, list[str]]:
    """Root PEP 691 index -> (entries, index serial, rejected names)."""
    data = load_json(body, where="root index")
    if not isinstance(data, dict):
        raise MalformedResponse("root index: not a JSON object")
    meta = _dict(data.get("meta"))
    check_api_version(meta.get("api-version"), where="root index")
    serial = meta.get("_last-serial")
    projects = data.get("projects")
    if not isinstance(projects, list):
        raise MalformedResponse("root index: 'projects' is not a list")
    seen: dict[str, RootEntry] = {}
    rejected = []
    for p in projects:
        name = p.get("name") if isinstance(p, dict) else None
        try:
            norm = normalize_name(name)  # type: ignore[arg-type]
        except UnsafeInput:
            rejected.append(repr(name)[:200])
            continue
        s = p.get("_last-serial", 0)
        s = s if is_serial(s) else 0
        prev = seen.get(norm)
        if prev is not None:
            # PyPI forbids two names that normalize alike; an index that lists
            # both is broken or hostile.  Keep the newer entry, report the other.
            loser, winner = (prev.display_name, name) if s > prev.serial else (name, prev.display_name)
            rejected.append(f"{loser!r:.200} (collides with {winner!r:.200} after normalization)")
        if prev is None or s > prev.serial:
            seen[norm] = RootEntry(norm, str(name), Serial(s))
    return list(seen.values()), Serial(serial) if is_serial(serial) else None, rejected


def load_json(body: bytes, *, where: str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        raise MalformedResponse(f"{where}: invalid JSON: {e}"[:300]) from None


def _dict(v: object) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _opt_str(v: object) -> str | None:
    return v if isinstance(v, str) else None


def _metadata_flag(v: object) -> tuple[bool, str | None]:
    """PEP 658/714 value -> (present, sha256 or None)."""
    if isinstance(v, dict):
        h = v.get("sha256")
        return True, h.lower() if isinstance(h, str) and _SHA256.match(h.lower()) else None
    return v is True, None


def reject_kind(e: UnsafeInput) -> str:
    """The ``mirror_upstream_rejected_total`` label for a refused file entry."""
    if isinstance(e, UnsafeURL):
        return "url"
    if isinstance(e, UnsafePath):
        return "path"
    if isinstance(e, UnsafeName):
        return "name"
    return "malformed"


def _claim_paths(rf: ReleaseFile, seen: set[str]) -> str | None:
    """Reserve the file's path and its sidecars' paths in ``seen``.

    Returns why the entry must be refused when one of them is taken: a file
    named ``x.whl.metadata`` next to ``x.whl`` (or the same path listed twice)
    would make two downloads race for one final name."""
    mine = (rf.path, rf.metadata_path, rf.provenance_path)
    if rf.path in seen:
        return f"{rf.filename}: listed twice"
    if any(p in seen for p in mine):
        return f"{rf.filename}: collides with another file's sidecar path"
    seen.update(mine)
    return None


def _make_file(
    *, filename: object, href: object, page_url: str, sha256: object, size: object, requires_python: object,
    yanked: object, upload_time: object, metadata: object, provenance: object, allow_http: bool,
) -> ReleaseFile:
    if not isinstance(filename, str):
        raise UnsafeInput(f"filename {filename!r:.200} is not a string")
    url = file_url(page_url, href, allow_http=allow_http)  # type: ignore[arg-type]
    if not isinstance(sha256, str) or not _SHA256.match(sha256.lower()):
        raise UnsafeInput(f"{filename}: no valid sha256 ({sha256!r:.100})")
    sha = sha256.lower()
    path = file_relpath(urlsplit(url).path, filename, sha)
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise UnsafeInput(f"{filename}: bad size {size!r:.50}")
    md, md_sha = _metadata_flag(metadata)
    prov = None
    if isinstance(provenance, str) and provenance:
        prov = file_url(page_url, provenance, allow_http=allow_http)
    if isinstance(yanked, bool):
        y: bool | str = yanked
    elif isinstance(yanked, str):
        y = yanked if yanked else True
    else:
        y = False
    return ReleaseFile(
        filename=filename, url=url, path=path, sha256=sha, size=size,
        requires_python=_opt_str(requires_python), yanked=y, upload_time=_opt_str(upload_time),
        core_metadata=md, core_metadata_sha256=md_sha, provenance=prov,
    )


def parse_project_json(
    body: bytes, *, name: NormalizedName, page_url: str, header_serial: int | None, allow_http: bool
) -> ProjectSnapshot:
    data = load_json(body, where=name)
    if not isinstance(data, dict):
        raise MalformedResponse(f"{name}: project page is not a JSON object")
    meta = _dict(data.get("meta"))
    api = check_api_version(meta.get("api-version"), where=name)
    raw_name = data.get("name", name)
    try:
        if normalize_name(raw_name) != name:
            raise MalformedResponse(f"{name}: page is for another project ({raw_name!r:.100})")
    except UnsafeInput:
        raise MalformedResponse(f"{name}: page carries an invalid name {raw_name!r:.100}") from None
    files_raw = data.get("files")
    if not isinstance(files_raw, list):
        raise MalformedResponse(f"{name}: 'files' is not a list")
    files: list[ReleaseFile] = []
    rejected: list[tuple[str, str]] = []
    seen: set[str] = set()
    for f in files_raw:
        if not isinstance(f, dict):
            rejected.append(("malformed", f"file entry {f!r:.100} is not an object"))
            continue
        hashes = _dict(f.get("hashes"))
        metadata = f.get("core-metadata", f.get("data-dist-info-metadata"))
        try:
            rf = _make_file(
                filename=f.get("filename"), href=f.get("url"), page_url=page_url, sha256=hashes.get("sha256"),
                size=f.get("size"), requires_python=f.get("requires-python"), yanked=f.get("yanked", False),
                upload_time=f.get("upload-time"), metadata=metadata, provenance=f.get("provenance"),
                allow_http=allow_http,
            )
        except UnsafeInput as e:
            rejected.append((reject_kind(e), str(e)))
            continue
        if (why := _claim_paths(rf, seen)) is not None:
            rejected.append(("path", why))
            continue
        files.append(rf)
    serial = header_serial if header_serial is not None else meta.get("_last-serial")
    versions = data.get("versions")
    status = data.get("project-status")
    st = status.get("status") if isinstance(status, dict) else None
    reason = status.get("reason") if isinstance(status, dict) else None
    return ProjectSnapshot(
        name=name,
        display_name=raw_name if isinstance(raw_name, str) else name,
        serial=Serial(serial) if is_serial(serial) else None,
        files=tuple(files),
        versions=tuple(v for v in versions if isinstance(v, str)) if isinstance(versions, list) else (),
        status=st if isinstance(st, str) else None,
        status_reason=reason if isinstance(reason, str) else None,
        api_version=api,
        rejected=tuple(rejected),
    )


class _AnchorParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[tuple[dict[str, str | None], str]] = []
        self.meta: dict[str, str] = {}
        self._cur: dict[str, str | None] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._cur, self._text = dict(attrs), []
        elif tag == "meta":
            d = dict(attrs)
            if d.get("name") and d.get("content") is not None:
                self.meta[str(d["name"])] = str(d["content"])

    def handle_data(self, data: str) -> None:
        if self._cur is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._cur is not None:
            self.anchors.append((self._cur, "".join(self._text).strip()))
            self._cur = None


def parse_project_html(
    body: bytes, *, name: NormalizedName, page_url: str, header_serial: int | None, allow_http: bool
) -> ProjectSnapshot:
    """A PEP 503 page (HTML-only upstreams).  Files without a sha256 are dropped:
    we never publish what we cannot verify."""
    text = body.decode("utf-8", "replace")
    # html.parser takes anything, and a page cut short (a CDN caching half an
    # object, garbage) parses as a project with fewer files: publishing it
    # would unlist the rest.  Markup must end with a tag, and a document that
    # opens <html> must close it.
    if not text.rstrip().endswith(">") or (_HTML_OPEN.search(text) and not _HTML_CLOSE.search(text)):
        raise MalformedResponse(f"{name}: HTML page is cut short or garbled")
    p = _AnchorParser()
    try:
        p.feed(text)
        p.close()
    except Exception as e:  # html.parser is lenient; this is belt and braces
        raise MalformedResponse(f"{name}: unparsable HTML: {e}"[:300]) from None
    api = check_api_version(p.meta.get("pypi:repository-version"), where=name)
    files: list[ReleaseFile] = []
    rejected: list[tuple[str, str]] = []
    seen: set[str] = set()
    for attrs, text in p.anchors:
        href = attrs.get("href") or ""
        frag = urlsplit(href).fragment
        sha = frag[len("sha256="):] if frag.startswith("sha256=") else None
        filename = urlsplit(href).path.rsplit("/", 1)[-1]
        md_attr = attrs.get("data-core-metadata", attrs.get("data-dist-info-metadata"))
        metadata: object = False
        if md_attr is not None:
            metadata = {"sha256": md_attr[7:]} if md_attr.startswith("sha256=") else md_attr == "true"
        yanked: object = attrs["data-yanked"] if "data-yanked" in attrs else False
        try:
            rf = _make_file(
                filename=filename, href=href, page_url=page_url, sha256=sha, size=None,
                requires_python=attrs.get("data-requires-python"), yanked=yanked if yanked is not None else True,
                upload_time=None, metadata=metadata, provenance=attrs.get("data-provenance"),
                allow_http=allow_http,
            )
        except UnsafeInput as e:
            rejected.append((reject_kind(e), f"{text or href!r:.100}: {e}"))
            continue
        if rf.path in seen:
            continue  # an HTML page may repeat a link; the first one wins
        if (why := _claim_paths(rf, seen)) is not None:
            rejected.append(("path", why))
            continue
        files.append(rf)
    return ProjectSnapshot(
        name=name, display_name=name,
        serial=Serial(header_serial) if header_serial is not None else None,
        files=tuple(files), api_version=api,
        status=p.meta.get("pypi:project-status"), status_reason=p.meta.get("pypi:project-status-reason"),
        rejected=tuple(rejected),
    )


def header_serial(headers: Mapping[str, str]) -> int | None:
    v = headers.get("x-pypi-last-serial")
    try:
        return int(v) if v is not None and is_serial(int(v)) else None
    except ValueError:
        return None
