"""Build the bytes of the static pages the mirror publishes.

Every page is rebuilt from our own `ProjectSnapshot` / `RootEntry` values
rather than copied from upstream: the simple HTML format is frozen at
api-version 1.4 and a mirror is expected to regenerate it from the JSON it
read (PEP 691 / PEP 833), and rebuilding is also the only way to make every
link point at *our* copy of a file instead of back at upstream.

Layout under ``web/`` (all links are relative so the tree can be served
from any host name or URL prefix, or copied elsewhere)::

    web/simple/index.html, index.v1_json           root_html / root_json
    web/simple/<name>/index.html, index.v1_json    project_html / project_json
    web/pypi/<name>/json                           project_api_json
    web/packages/...                               the files (ReleaseFile.path)

Both ``simple/<name>/`` and ``pypi/<name>/`` are two levels below ``web/``,
so a file is always reached as ``../../<ReleaseFile.path>``.

Everything in a snapshot came from upstream and is untrusted: every string
is HTML-escaped (attribute values with ``quote=True``) and every JSON
document is written with ``ensure_ascii=True`` so that even a lone surrogate
smuggled in through a ``\\ud800`` escape cannot make encoding fail or
produce invalid UTF-8.  These functions are pure: no I/O, no clock.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from json.encoder import encode_basestring_ascii
from typing import Any

from packaging.version import Version

from mirror.model import ProjectSnapshot, ReleaseFile, RootRow
from mirror.plan.filenames import file_version
from mirror.plan.versions import parse_version

__all__ = [
    "API_VERSION",
    "iter_root",
    "project_api_json",
    "project_html",
    "project_json",
    "root_html",
    "root_json",
]

# The simple-API version we publish, whatever upstream served: our pages
# carry every field up to and including PEP 792 (api 1.4), and HTML is frozen
# there, so the HTML and JSON pages must agree on it.
API_VERSION = "1.4"

# Relative prefix from ``web/simple/<name>/`` (and ``web/pypi/<name>/``) to ``web/``.
_UP = "../../"


def _esc(value: str) -> str:
    # quote=True everywhere: the same helper is used for text and attribute
    # values, and escaping quotes in text is harmless.
    return html.escape(value, quote=True)


def _utf8(text: str) -> bytes:
    # "replace" only matters for lone surrogates (which json.loads happily
    # produces from "\ud800"); a deterministic "?" beats a crash mid-sync.
    return text.encode("utf-8", "replace")


def _dumps(doc: Any) -> bytes:
    # Compact and deterministic: dict insertion order is fixed by the
    # builders below, so the same input always yields the same bytes (which
    # lets the writer skip rewriting unchanged pages).  allow_nan=False
    # because NaN/Infinity are not JSON; a hostile upstream value raises
    # ValueError instead of producing a page clients cannot parse.
    return json.dumps(
        doc, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _file_url(f: ReleaseFile) -> str:
    return _UP + f.path


def _provenance_url(f: ReleaseFile) -> str | None:
    # ReleaseFile.provenance being set means the sidecar was mirrored next to
    # the file, so we always link our copy, never upstream's URL.
    return _UP + f.provenance_path if f.provenance is not None else None


def _yanked_json(f: ReleaseFile) -> bool | str:
    # PEP 592/691: false, true, or a non-empty reason string.  An empty
    # reason is "yanked without a reason", which JSON spells as true.
    if isinstance(f.yanked, str):
        return f.yanked if f.yanked else True
    return bool(f.yanked)


def _core_metadata_json(f: ReleaseFile) -> bool | dict[str, str]:
    # PEP 658/714: a hashes dict when we know the hash, bare true otherwise.
    if not f.core_metadata:
        return False
    if f.core_metadata_sha256:
        return {"sha256": f.core_metadata_sha256}
    return True


# ---------------------------------------------------------------------------
# Project pages (PEP 503 HTML, PEP 691 JSON)
# ---------------------------------------------------------------------------


def _file_json(f: ReleaseFile) -> dict[str, Any]:
    d: dict[str, Any] = {
        "filename": f.filename,
        # No "#sha256=" fragment: PEP 691 carries hashes in "hashes".
        "url": _file_url(f),
        "hashes": {"sha256": f.sha256},
        # An empty specifier means "no constraint", same as absent; null
        # keeps JSON consistent with HTML, which omits the attribute.
        "requires-python": f.requires_python or None,
    }
    # PEP 700 lets size/upload-time be absent; we do not invent values.
    if f.size is not None:
        d["size"] = f.size
    if f.upload_time is not None:
        d["upload-time"] = f.upload_time
    d["yanked"] = _yanked_json(f)
    cm = _core_metadata_json(f)
    d["core-metadata"] = cm
    # PEP 714: keep the legacy key for clients that predate the rename.
    d["data-dist-info-metadata"] = cm
    d["provenance"] = _provenance_url(f)
    return d


def project_json(snap: ProjectSnapshot) -> bytes:
    """Return ``simple/<name>/index.v1_json`` (``application/vnd.pypi.simple.v1+json``)."""
    meta: dict[str, Any] = {"api-version": API_VERSION}
    if snap.serial is not None:
        meta["_last-serial"] = int(snap.serial)
    doc: dict[str, Any] = {
        "meta": meta,
        "name": snap.name,
        "versions": list(snap.versions),
        "files": [_file_json(f) for f in snap.files],
    }
    if snap.status is not None:
        status: dict[str, str] = {"status": snap.status}
        if snap.status_reason:
            status["reason"] = snap.status_reason
        doc["project-status"] = status
    return _dumps(doc)


def _file_anchor(f: ReleaseFile) -> str:
    attrs = [f'href="{_esc(_file_url(f))}#sha256={_esc(f.sha256)}"']
    if f.requires_python:
        # PEP 503: "<" must reach the client as "&lt;"; quote=True also
        # stops a '"' in the specifier from ending the attribute.
        attrs.append(f'data-requires-python="{_esc(f.requires_python)}"')
    y = _yanked_json(f)
    if y is True:
        attrs.append('data-yanked=""')
    elif isinstance(y, str):
        attrs.append(f'data-yanked="{_esc(y)}"')
    cm = _core_metadata_json(f)
    if cm is not False:
        value = "true" if cm is True else f"sha256={_esc(cm['sha256'])}"
        attrs.append(f'data-core-metadata="{value}"')
        attrs.append(f'data-dist-info-metadata="{value}"')
    prov = _provenance_url(f)
    if prov is not None:
        attrs.append(f'data-provenance="{_esc(prov)}"')
    return f"    <a {' '.join(attrs)}>{_esc(f.filename)}</a><br/>\n"


def project_html(snap: ProjectSnapshot) -> bytes:
    """Return ``simple/<name>/index.html`` (PEP 503, frozen at api 1.4)."""
    name = _esc(snap.name)
    parts = [
        "<!DOCTYPE html>\n<html>\n  <head>\n",
        f'    <meta name="pypi:repository-version" content="{API_VERSION}">\n',
    ]
    if snap.status is not None:
        parts.append(
            f'    <meta name="pypi:project-status" content="{_esc(snap.status)}">\n'
        )
        if snap.status_reason:
            parts.append(
                f'    <meta name="pypi:project-status-reason" content="{_esc(snap.status_reason)}">\n'
            )
    parts.append(f"    <title>Links for {name}</title>\n  </head>\n  <body>\n")
    parts.append(f"    <h1>Links for {name}</h1>\n")
    parts.extend(_file_anchor(f) for f in snap.files)
    parts.append("  </body>\n</html>\n")
    if snap.serial is not None:
        # PyPI's own marker; tools (and humans) use it to see how fresh the
        # HTML page is, since HTML has no meta field for the serial.
        parts.append(f"<!--SERIAL {int(snap.serial):d}-->\n")
    return _utf8("".join(parts))


# ---------------------------------------------------------------------------
# Root pages
# ---------------------------------------------------------------------------
#
# The root lists every project (~600k on PyPI) and is rebuilt often, so both
# functions use one f-string per entry joined once, instead of building dicts
# for json.dumps (measured ~3x slower) or growing a string.


_ROOT_HTML_HEAD = (
    "<!DOCTYPE html>\n<html>\n  <head>\n"
    f'    <meta name="pypi:repository-version" content="{API_VERSION}">\n'
    "    <title>Simple index</title>\n  </head>\n  <body>\n"
)
_ROOT_HTML_TAIL = "  </body>\n</html>\n"


def _root_html_rows(entries: Iterable[RootRow]) -> str:
    esc = _esc
    return "".join(
        [
            f'    <a href="{esc(name)}/">{esc(display)}</a><br/>\n'
            for name, display, _ in entries
        ]
    )


def _root_json_head(serial: int) -> str:
    return f'{{"meta":{{"api-version":"{API_VERSION}","_last-serial":{serial:d}}},"projects":['


def _root_json_rows(entries: Iterable[RootRow]) -> str:
    enc = encode_basestring_ascii  # C-accelerated JSON string literal, ASCII-only
    # ":d" rejects anything that is not an int, so a stray float or str can
    # never produce an unquoted token in the output.
    return ",".join(
        [
            f'{{"name":{enc(display)},"_last-serial":{serial:d}}}'
            for _, display, serial in entries
        ]
    )


def root_html(entries: Iterable[RootRow]) -> bytes:
    """Return ``simple/index.html``; links are relative (``<name>/``)."""
    return _utf8(_ROOT_HTML_HEAD + _root_html_rows(entries) + _ROOT_HTML_TAIL)


def root_json(entries: Iterable[RootRow], *, serial: int) -> bytes:
    """Return ``simple/index.v1_json``; projects appear in the order given."""
    return (_root_json_head(serial) + _root_json_rows(entries) + "]}").encode("ascii")


def iter_root(
    entries: Iterable[RootRow], *, serial: int, batch: int = 10_000, html: bool = True
) -> Iterator[tuple[bytes, bytes]]:
    """``root_html`` and ``root_json`` in pieces, from one pass over ``entries``.

    Yields (html, json) byte chunks whose concatenations are exactly
    ``root_html(entries)`` and ``root_json(entries, serial=serial)``, holding
    at most ``batch`` entries at a time: the writer streams a 600k-project
    root to disk without ever holding it whole.
    """
    yield _utf8(_ROOT_HTML_HEAD), _root_json_head(serial).encode("ascii")
    it = iter(entries)
    sep = ""
    while chunk := list(islice(it, batch)):
        # html=False: the caller keeps the HTML root it has; skip rendering it.
        yield _utf8(_root_html_rows(chunk)) if html else b"", (sep + _root_json_rows(chunk)).encode("ascii")
        sep = ","
    yield _utf8(_ROOT_HTML_TAIL), b"]}"


# ---------------------------------------------------------------------------
# Legacy JSON API (/pypi/<name>/json)
# ---------------------------------------------------------------------------


def _packagetype(filename: str) -> str | None:
    if filename.endswith(".whl"):
        return "bdist_wheel"
    if filename.endswith((".tar.gz", ".zip", ".tar.bz2", ".tgz")):
        return "sdist"
    if filename.endswith(".egg"):
        return "bdist_egg"
    return None


def _minimal_api_file(f: ReleaseFile) -> dict[str, Any]:
    # The subset of PyPI's per-file fields we can state truthfully from a
    # snapshot; everything else (md5, python_version, ...) is left out.
    yanked = f.yanked is True or isinstance(f.yanked, str)
    return {
        "filename": f.filename,
        "url": _file_url(f),
        "digests": {"sha256": f.sha256},
        "packagetype": _packagetype(f.filename),
        "requires_python": f.requires_python,
        "size": f.size,
        "upload_time_iso_8601": f.upload_time,
        "yanked": yanked,
        "yanked_reason": f.yanked if isinstance(f.yanked, str) and f.yanked else None,
    }


def _minimal_api(snap: ProjectSnapshot) -> dict[str, Any]:
    # Seed with the versions the simple page lists (PyPI lists releases with
    # no files too) and map files onto those original spellings, so "1.0"
    # stays "1.0" rather than whatever Version normalises it to.
    releases: dict[str, list[dict[str, Any]]] = {v: [] for v in snap.versions}
    spelled: dict[Version, str] = {}
    for v in snap.versions:
        if (parsed := parse_version(v)) is not None:
            spelled.setdefault(parsed, v)
    for f in snap.files:
        ver = file_version(snap.name, f.filename)
        key = "" if ver is None else spelled.get(ver, str(ver))
        releases.setdefault(key, []).append(_minimal_api_file(f))
    return {
        "info": {"name": snap.display_name},
        "last_serial": snap.serial,
        "releases": releases,
        "urls": [],
    }


def _rewrite_api_file(
    entry: object, local: Mapping[str, ReleaseFile]
) -> dict[str, Any] | None:
    """Point one upstream file entry at our copy, or drop it (None)."""
    if not isinstance(entry, dict):
        return None
    filename = entry.get("filename")
    if not isinstance(filename, str) or filename not in local:
        return None
    f = local[filename]
    out = dict(entry)
    out["url"] = _file_url(f)
    digests = entry.get("digests")
    if isinstance(digests, dict) and digests.get("sha256") == f.sha256:
        # Same file as upstream describes: its other digests are still valid.
        out["digests"] = {**digests, "sha256": f.sha256}
    else:
        # The entry describes different bytes from the ones we serve (or has
        # no usable digests): keep only what we can vouch for.
        out["digests"] = {"sha256": f.sha256}
        out.pop("md5_digest", None)
        if f.size is not None:
            out["size"] = f.size
    return out


def _rewrite_api_files(
    files: object, local: Mapping[str, ReleaseFile]
) -> list[dict[str, Any]]:
    if not isinstance(files, list):
        return []
    rewritten = (_rewrite_api_file(e, local) for e in files)
    return [e for e in rewritten if e is not None]


def project_api_json(
    snap: ProjectSnapshot, upstream: Mapping[str, Any] | None
) -> bytes:
    """Return ``pypi/<name>/json``, the legacy JSON API document.

    With ``upstream`` (its parsed, untrusted ``/pypi/<name>/json`` body),
    ``info``, ``last_serial`` and ``vulnerabilities`` are kept and
    ``releases`` / ``urls`` are rebuilt to list only files present in
    ``snap.files`` (by filename), each pointing at our copy.  Without it, a
    minimal document is built from the snapshot, grouping files by the
    version parsed from their filenames ("" when it cannot be parsed).

    Raises ValueError if ``upstream`` contains NaN or Infinity.
    """
    if upstream is None:
        return _dumps(_minimal_api(snap))
    local = {f.filename: f for f in snap.files}
    info = upstream.get("info")
    doc: dict[str, Any] = {
        "info": info if isinstance(info, dict) else {"name": snap.display_name},
        "last_serial": upstream.get("last_serial", snap.serial),
    }
    releases: dict[str, list[dict[str, Any]]] = {}
    up_releases = upstream.get("releases")
    if isinstance(up_releases, dict):
        for version, files in up_releases.items():
            # A version whose files we all dropped stays listed with [], the
            # same way PyPI lists releases that have no files.
            releases[str(version)] = _rewrite_api_files(files, local)
    doc["releases"] = releases
    doc["urls"] = _rewrite_api_files(upstream.get("urls"), local)
    vulns = upstream.get("vulnerabilities")
    if isinstance(vulns, list):
        # Advisory data (used by pip-audit); it references no files.
        doc["vulnerabilities"] = vulns
    return _dumps(doc)
