"""What a published page points at, read back from its bytes: the one parser
of our own pages, for ``mirror verify`` and ``mirror pull``.

``links`` lists every link of a project page (PEP 503 HTML or PEP 691 JSON)
or of a ``pypi/<name>/json`` document: each distribution with the sha256 the
page promises, each ``.metadata`` sidecar (``core-metadata`` and its legacy
alias ``data-dist-info-metadata``) and each provenance file.  ``page_refs``
is the set of paths they resolve to, which ``mirror pull`` makes sure are on
disk before it renames a page into place; ``root_names`` is what a root
index lists.

Links are resolved relative to the page's own path, as a browser would.  An
absolute URL is not ours (``rel`` is None); a link that climbs out of the
tree, or a path component ``model.safe_relpath`` refuses, is marked
``escapes``: ``page_refs`` then calls the page invalid (``ValueError``) so
that a secondary never follows it, and verify reports it.

Pure: no I/O.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from packaging.utils import canonicalize_name

from mirror.errors import UnsafePath
from mirror.layout import ROOT_PAGES
from mirror.model import safe_relpath

LinkKind = Literal["dist", "metadata", "provenance"]


@dataclass(frozen=True, slots=True)
class Link:
    kind: LinkKind
    href: str
    rel: str | None  # the path under web/; None for an absolute URL or one that escapes
    sha256: str | None = None  # the hash the page promises, if any
    escapes: bool = False  # climbs out of the tree, or is not a path we write


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.anchors.append(dict(attrs))


def _anchors(data: bytes) -> list[dict[str, str | None]]:
    p = _Anchors()
    p.feed(data.decode("utf-8", "replace"))
    p.close()
    return p.anchors


def resolve(page: str, href: str) -> str | None:
    """``href`` found in ``page`` (a path under web/) -> path under web/;
    None for an absolute URL; ValueError when it leaves the tree."""
    parts = urlsplit(href)
    if parts.scheme or parts.netloc:
        return None
    path = posixpath.normpath(posixpath.join(posixpath.dirname(page), unquote(parts.path)))
    try:
        return safe_relpath(path)
    except UnsafePath:
        raise ValueError(f"{page}: link {href[:200]!r} leaves the tree") from None


def _link(page: str, kind: LinkKind, href: str, sha256: object = None, suffix: str = "") -> Link:
    sha = sha256 if isinstance(sha256, str) else None
    try:
        rel = resolve(page, href.partition("#")[0] + suffix)
    except ValueError:
        return Link(kind, href, None, sha, escapes=True)
    return Link(kind, href, rel, sha)


def is_root(page: str) -> bool:
    return page in ROOT_PAGES


def root_names(page: str, data: bytes) -> frozenset[str]:
    """Normalized project names listed by a root index (HTML or JSON)."""
    if page.endswith(".v1_json"):
        doc = _json(page, data)
        projects = doc.get("projects")
        if not isinstance(projects, list):
            raise ValueError(f"{page}: no projects list")
        return frozenset(canonicalize_name(str(p.get("name", ""))) for p in projects if isinstance(p, dict))
    return frozenset(
        canonicalize_name(str(a.get("href") or "").split("/")[0]) for a in _anchors(data) if a.get("href")
    )


def _json_links(page: str, files: list[Any], *, sidecars: bool = True) -> list[Link]:
    out: list[Link] = []
    for f in files:
        if not isinstance(f, dict):
            continue
        url = f.get("url")
        if isinstance(url, str) and url:
            out.append(_link(page, "dist", url, (f.get("hashes") or f.get("digests") or {}).get("sha256")))
            if not sidecars:
                continue
            md = f.get("core-metadata") or f.get("data-dist-info-metadata")
            if md:
                out.append(_link(page, "metadata", url, md.get("sha256") if isinstance(md, dict) else None,
                                 suffix=".metadata"))
        prov = f.get("provenance")
        if sidecars and isinstance(prov, str) and prov:
            out.append(_link(page, "provenance", prov))
    return out


def links(page: str, data: bytes) -> list[Link]:
    """Every link of a project page or ``pypi/<name>/json``, in page order.

    ValueError when the page is not a page at all (not JSON, no files list)."""
    if page.startswith("pypi/"):
        doc = _json(page, data)
        groups: list[Any] = list(doc["releases"].values()) if isinstance(doc.get("releases"), dict) else []
        groups.append(doc.get("urls") or [])
        # Entries copied from upstream's JSON API: only the files are ours
        # to vouch for (their sidecar fields describe upstream's).
        return [link for files in groups if isinstance(files, list)
                for link in _json_links(page, files, sidecars=False)]
    if page.endswith(".v1_json"):
        files = _json(page, data).get("files")
        if not isinstance(files, list) or not all(isinstance(f, dict) for f in files):
            raise ValueError(f"{page}: 'files' is not a list of objects")
        return _json_links(page, files)
    out: list[Link] = []
    for a in _anchors(data):
        href = a.get("href")
        if not href:
            continue
        frag = urlsplit(href).fragment
        out.append(_link(page, "dist", href, frag.removeprefix("sha256=") if frag.startswith("sha256=") else None))
        md = a.get("data-core-metadata", a.get("data-dist-info-metadata"))
        if md is not None and md.lower() != "false":
            out.append(_link(page, "metadata", href, md[7:] if md.startswith("sha256=") else None, suffix=".metadata"))
        prov = a.get("data-provenance")
        if prov:
            out.append(_link(page, "provenance", prov))
    return out


def page_refs(page: str, data: bytes) -> frozenset[str]:
    """Paths under web/ that a page links; ValueError if one leaves the tree."""
    out: set[str] = set()
    for link in links(page, data):
        if link.escapes:
            raise ValueError(f"{page}: link {link.href[:200]!r} leaves the tree")
        if link.rel is not None:
            out.add(link.rel)
    return frozenset(out)


def _json(page: str, data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{page}: not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{page}: not a JSON object")
    return doc
