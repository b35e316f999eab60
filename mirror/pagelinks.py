"""What a published page points at, read back from its bytes.

``mirror pull`` uses this to close the gap between the pages it copied and
the files it holds: every path a new page links must be on disk before the
page is renamed into place.  It also checks that the copies of one page
agree (``index.html``, ``index.v1_html`` and ``index.v1_json`` are written
together on the primary, but rsync may read them on either side of a
rewrite).

Links are resolved relative to the page's own path, as a browser would;
absolute URLs are not ours to check and are ignored.  A link that climbs
out of the tree, or a path component ``model.safe_relpath`` refuses, makes
the page invalid (``ValueError``): a secondary never follows it.

Pure: no I/O.
"""

from __future__ import annotations

import json
import posixpath
from html.parser import HTMLParser
from typing import Any
from urllib.parse import unquote, urlsplit

from packaging.utils import canonicalize_name

from mirror.errors import UnsafePath
from mirror.model import safe_relpath

ROOT_PAGES = ("simple/index.html", "simple/index.v1_html", "simple/index.v1_json")
PROJECT_PAGES = ("index.html", "index.v1_html", "index.v1_json")


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
    """``href`` found in ``page`` (a path under web/) -> path under web/."""
    parts = urlsplit(href)
    if parts.scheme or parts.netloc:
        return None
    path = posixpath.normpath(posixpath.join(posixpath.dirname(page), unquote(parts.path)))
    try:
        return safe_relpath(path)
    except UnsafePath:
        raise ValueError(f"{page}: link {href[:200]!r} leaves the tree") from None


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


def page_refs(page: str, data: bytes) -> frozenset[str]:
    """Paths under web/ that a project page or a ``pypi/<name>/json`` links."""
    out: set[str] = set()

    def add(href: object, suffix: str = "") -> None:
        if isinstance(href, str) and href:
            rel = resolve(page, href.partition("#")[0] + suffix)
            if rel is not None:
                out.add(rel)

    if page.startswith("pypi/"):
        doc = _json(page, data)
        groups: list[Any] = list((doc.get("releases") or {}).values()) if isinstance(doc.get("releases"), dict) else []
        groups.append(doc.get("urls") or [])
        for files in groups:
            for f in files if isinstance(files, list) else []:
                if isinstance(f, dict):
                    add(f.get("url"))
    elif page.endswith(".v1_json"):
        doc = _json(page, data)
        files = doc.get("files")
        if not isinstance(files, list):
            raise ValueError(f"{page}: no files list")
        for f in files:
            if not isinstance(f, dict):
                continue
            add(f.get("url"))
            if f.get("core-metadata") or f.get("data-dist-info-metadata"):
                add(f.get("url"), ".metadata")
            add(f.get("provenance"))
    else:
        for a in _anchors(data):
            add(a.get("href"))
            md = a.get("data-core-metadata", a.get("data-dist-info-metadata"))
            if md is not None and md.lower() != "false":
                add(a.get("href"), ".metadata")
            add(a.get("data-provenance"))
    return frozenset(out)


def _json(page: str, data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{page}: not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{page}: not a JSON object")
    return doc
