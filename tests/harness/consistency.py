"""Check a published tree the way a client (or an rsync secondary) sees it.

``check_tree(web)`` follows every link of every page, root and project, HTML
and JSON, and returns a list of problems: a page listed in the root that does
not exist, a link that does not resolve to a file under ``web/``, a file whose
sha256 differs from the one the page promises, a ``core-metadata`` or
``provenance`` sidecar that is missing or wrong.  An empty list means a pip
pointed at this tree at this instant would find everything it is offered.
"""

from __future__ import annotations

import hashlib
import json
import os
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

_BASE = "http://mirror.invalid/"


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[dict[str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.links.append(dict(attrs))


class _Hashes:
    def __init__(self) -> None:
        self.cache: dict[tuple[str, int, int], str] = {}

    def sha256(self, p: Path) -> str:
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key not in self.cache:
            self.cache[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        return self.cache[key]


def _resolve(web: Path, page_rel: str, href: str) -> Path | None:
    url = urljoin(_BASE + page_rel, href)
    parts = urlsplit(url)
    if not url.startswith(_BASE):
        return None
    rel = unquote(parts.path[len("/") :])
    p = (web / rel).resolve()
    if web.resolve() not in p.parents:
        return None
    return p


def check_tree(web: Path, hashes: _Hashes | None = None) -> list[str]:
    hashes = hashes or _Hashes()
    problems: list[str] = []
    root_json = web / "simple" / "index.v1_json"
    if not root_json.exists():
        return (
            problems
            if not (web / "simple").exists()
            else ["simple/index.v1_json missing"]
        )
    try:
        root = json.loads(root_json.read_bytes())
    except ValueError as e:
        return [f"root JSON unreadable: {e}"]
    names = [p["name"] for p in root["projects"]]
    parser = _Links()
    parser.feed((web / "simple" / "index.html").read_text())
    html_names = {str(a.get("href")).rstrip("/") for a in parser.links}
    from packaging.utils import canonicalize_name

    json_names = {canonicalize_name(n) for n in names}
    if html_names != json_names:
        problems.append(
            f"root HTML and JSON disagree: {sorted(html_names ^ json_names)[:5]}"
        )
    for name in sorted(json_names):
        problems.extend(check_project(web, name, hashes))
    return problems


def check_project(web: Path, name: str, hashes: _Hashes) -> list[str]:
    problems: list[str] = []
    page_rel = f"simple/{name}/"
    d = web / "simple" / name
    try:
        page = json.loads((d / "index.v1_json").read_bytes())
        html_text = (d / "index.html").read_text()
    except FileNotFoundError as e:
        return [
            f"{name}: listed in the root but page missing ({Path(e.filename).name})"
        ]
    if (d / "index.v1_html").read_text() != html_text:
        problems.append(f"{name}: index.v1_html differs from index.html")
    for f in page["files"]:
        p = _resolve(web, page_rel, f["url"])
        if p is None or not p.is_file():
            problems.append(
                f"{name}: {f['filename']}: link {f['url']} does not resolve"
            )
            continue
        if hashes.sha256(p) != f["hashes"]["sha256"]:
            problems.append(f"{name}: {f['filename']}: sha256 mismatch")
        if "size" in f and p.stat().st_size != f["size"]:
            problems.append(f"{name}: {f['filename']}: size mismatch")
        md = f.get("core-metadata")
        if md:
            mp = Path(str(p) + ".metadata")
            if not mp.is_file():
                problems.append(f"{name}: {f['filename']}: .metadata missing")
            elif isinstance(md, dict) and hashes.sha256(mp) != md.get("sha256"):
                problems.append(f"{name}: {f['filename']}: .metadata sha256 mismatch")
        if f.get("provenance"):
            pp = _resolve(web, page_rel, f["provenance"])
            if pp is None or not pp.is_file():
                problems.append(f"{name}: {f['filename']}: provenance missing")
    parser = _Links()
    parser.feed(html_text)
    json_files = {f["filename"] for f in page["files"]}
    html_files = set()
    for a in parser.links:
        href = str(a.get("href"))
        path, _, frag = href.partition("#")
        p = _resolve(web, page_rel, path)
        html_files.add(os.path.basename(urlsplit(path).path))
        if p is None or not p.is_file():
            problems.append(f"{name}: HTML link {href} does not resolve")
        elif frag.startswith("sha256=") and hashes.sha256(p) != frag[7:]:
            problems.append(f"{name}: HTML link {href}: sha256 mismatch")
    if html_files != json_files:
        problems.append(f"{name}: HTML and JSON list different files")
    return problems
