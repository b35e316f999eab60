"""Helpers for the reliability tests: compare a mirror with its fake upstream.

``check_tree`` (tests/consistency.py) proves that every link of every page
resolves to the promised bytes.  These helpers add what only a test that
knows the upstream can say: every byte under ``web/packages`` is a complete
upstream file (no partial or corrupt file under a final name, even one that
no page links yet), and a finished mirror holds exactly the upstream.
"""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.harness.consistency import _Hashes, _Links, _resolve, check_project, check_tree
from tests.harness.fakepypi import PROVENANCE_DOC, FakePyPI


def upstream_files(up: FakePyPI) -> dict[str, bytes]:
    """Every path (relative to ``web/``) the mirror should hold, with its bytes."""
    out: dict[str, bytes] = {}
    for name in up.project_names():
        for fn in up.filenames(name):
            rel = up.file_path(name, fn).lstrip("/")
            out[rel] = up.file_content(name, fn)
            md = up.file_metadata(name, fn)
            if md is not None:
                out[rel + ".metadata"] = md
    return out


def tree_files(web: Path) -> dict[str, Path]:
    """rel path -> Path of every regular file under ``web/packages``."""
    out: dict[str, Path] = {}
    root = web / "packages"
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            out[p.relative_to(web).as_posix()] = p
    return out


def foreign_files(web: Path, expected: dict[str, bytes]) -> list[str]:
    """Files under ``web/packages`` that are not byte-identical upstream files.

    Must be empty at every instant: a partial, truncated or corrupt download
    is never renamed to a final name."""
    bad = []
    for rel, p in sorted(tree_files(web).items()):
        data = p.read_bytes()
        if rel.endswith(".provenance"):
            if data != PROVENANCE_DOC:
                bad.append(f"{rel}: not the upstream provenance")
        elif rel not in expected:
            bad.append(f"{rel}: not an upstream file")
        elif data != expected[rel]:
            bad.append(f"{rel}: {len(data)} bytes differ from upstream ({len(expected[rel])})")
    return bad


def mirror_problems(web: Path, up: FakePyPI) -> list[str]:
    """Empty when ``web`` is a complete, consistent, byte-exact copy of ``up``."""
    expected = upstream_files(up)
    problems = check_tree(web) + foreign_files(web, expected)
    missing = sorted(set(expected) - set(tree_files(web)))
    problems += [f"{rel}: missing" for rel in missing[:20]]
    root = web / "simple" / "index.v1_json"
    if not root.exists():
        return problems + ["root index missing"]
    listed = {p["name"] for p in json.loads(root.read_bytes())["projects"]}
    if len(listed) != len(up.project_names()):
        problems.append(f"root lists {len(listed)} projects, upstream has {len(up.project_names())}")
    for name in up.project_names():
        page = web / "simple" / name / "index.v1_json"
        if not page.exists():
            problems.append(f"{name}: page missing")
            continue
        got = {f["filename"] for f in json.loads(page.read_bytes())["files"]}
        if got != set(up.filenames(name)):
            problems.append(f"{name}: page lists {sorted(got ^ set(up.filenames(name)))[:4]} wrongly")
    return problems


def check_published(web: Path) -> list[str]:
    """``check_tree``, also during a first sync, before any root index exists:
    then every project page written so far must be whole and resolve."""
    if (web / "simple" / "index.v1_json").exists() or not (web / "simple").exists():
        return check_tree(web)
    hashes = _Hashes()
    problems = []
    for d in sorted((web / "simple").iterdir()):
        pages = [d / n for n in ("index.html", "index.v1_html", "index.v1_json")]
        if all(p.exists() for p in pages):
            problems += check_project(web, d.name, hashes)
        else:
            # A write stopped between the renames of a new project's three
            # pages (nothing lists it yet): each page present must resolve.
            problems += _check_lone_pages(web, d.name, [p for p in pages if p.exists()], hashes)
    return problems


def _check_lone_pages(web: Path, name: str, pages: list[Path], hashes: _Hashes) -> list[str]:
    problems = []
    for p in pages:
        if p.name == "index.v1_json":
            links = [(f["url"], f["hashes"]["sha256"]) for f in json.loads(p.read_bytes())["files"]]
        else:
            parser = _Links()
            parser.feed(p.read_text())
            links = []
            for a in parser.links:
                href, _, frag = str(a.get("href")).partition("#")
                links.append((href, frag.removeprefix("sha256=")))
        for href, sha in links:
            target = _resolve(web, f"simple/{name}/", href)
            if target is None or not target.is_file() or hashes.sha256(target) != sha:
                problems.append(f"{name}: {p.name}: link {href} does not resolve to its sha256")
    return problems


def snapshot_fs(path: Path) -> set[str]:
    """Every entry under ``path`` (not following symlinks), to prove a run
    wrote nothing outside the mirror directory."""
    out = set()
    for dirpath, dirs, files in os.walk(path):
        for n in dirs + files:
            out.add(os.path.relpath(os.path.join(dirpath, n), path))
    return out


class HostileServer:
    """A loopback HTTP server with the file-store behaviours the fake PyPI
    lacks: an endless body, a trickle, arbitrary bytes at any path.

    ``routes[path]`` is ("bytes", body) | ("endless", None) | ("trickle",
    (body, seconds between writes[, bytes per write])).  ``sent[path]`` counts the body bytes the
    socket accepted, to prove a client stopped reading."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[str, Any]] = {}
        self.sent: Counter[str] = Counter()
        self.stopping = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                kind, arg = outer.routes.get(self.path, ("missing", None))
                if kind == "missing":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.close_connection = kind != "bytes"
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if kind == "endless":
                    # No length: the body ends when the connection does.
                    self.send_header("Connection", "close")
                    self.end_headers()
                    chunk = b"\0" * 65536
                    try:
                        while not outer.stopping.is_set() and outer.sent[self.path] < 1 << 30:
                            self.wfile.write(chunk)
                            outer.sent[self.path] += len(chunk)
                    except OSError:
                        pass  # the client hung up: what we want
                    return
                body = arg if kind == "bytes" else arg[0]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    if kind == "bytes":
                        self.wfile.write(body)
                        outer.sent[self.path] += len(body)
                        return
                    step = arg[2] if len(arg) > 2 else 1
                    for i in range(0, len(body), step):
                        if outer.stopping.wait(arg[1]):
                            return
                        self.wfile.write(body[i : i + step])
                        self.wfile.flush()
                        outer.sent[self.path] += len(body[i : i + step])
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> HostileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
