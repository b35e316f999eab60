"""The blocking steps of ``mirror pull`` on DEST and its stage, one thread
hop each: reading traces, examining staged pages against DEST (which pages to
fetch again, which files they link that DEST lacks), moving staged pages into
DEST in order, and choosing what may be deleted.  ``mirror.downstream.pull``
runs them between its rsync stages.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mirror import layout
from mirror.downstream import changes, trace
from mirror.errors import UnsafePath
from mirror.layout import PullLayout
from mirror.model import safe_relpath
from mirror.publish import pagelinks
from mirror.publish.tree import Tree

log = logging.getLogger(__name__)

# Never pages: what stage 2 leaves out and the stage never publishes.
NOT_PAGES = (layout.PACKAGES, layout.TRACES, layout.CHANGES, PullLayout.WORK + "/")


def valid(paths: set[str], what: str) -> list[str]:
    out = []
    for p in sorted(paths):
        try:
            out.append(safe_relpath(p))
        except UnsafePath:
            log.warning("%s: ignoring unsafe path %r", what, p[:200])
    return out



def read_traces(directory: Path, only: str | None = None) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    try:
        entries = [directory / only] if only else list(directory.iterdir())
    except FileNotFoundError:
        return out
    for p in entries:
        try:
            if p.is_file() and not p.is_symlink():
                out[p.name] = trace.parse_trace(p.read_bytes())
        except (OSError, ValueError):
            continue
    return out


def mtimes(directory: Path) -> dict[str, int]:
    try:
        return {e.name: e.stat(follow_symlinks=False).st_mtime_ns for e in os.scandir(directory)}
    except FileNotFoundError:
        return {}


def effective(stage: Path, dest: Path, rel: str) -> bytes | None:
    """A page as DEST will have it once the stage is published."""
    for base in (stage, dest):
        try:
            return (base / rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            continue
    return None


def staged_paths(stage: Path) -> list[str]:
    out = []
    for root, _dirs, files in os.walk(stage):
        for f in files:
            out.append(os.path.relpath(os.path.join(root, f), stage).replace(os.sep, "/"))
    return sorted(out)


def examine(stage: Path, dest: Path) -> tuple[set[str], set[str]]:
    """(pages to fetch again, files the staged pages link that DEST lacks)."""
    staged = staged_paths(stage)
    again: set[str] = set()
    projects: set[str] = set()
    for rel in staged:
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] in layout.PAGE_TOPS:
            projects.add(f"{parts[0]}/{parts[1]}")
    if any(r in staged for r in layout.ROOT_PAGES):
        try:
            names = [pagelinks.root_names(r, effective(stage, dest, r) or b"") for r in layout.ROOT_PAGES]
            ok = names[0] == names[1] == names[2]
        except ValueError:
            ok = False
        if not ok:
            again.update(layout.ROOT_PAGES)
        else:
            old = dest / layout.ROOT_JSON
            try:
                before = pagelinks.root_names(layout.ROOT_JSON, old.read_bytes()) if old.exists() else frozenset()
            except ValueError:
                before = frozenset()
            for n in names[2] - before:
                if layout.project_dir(n) not in projects and not (dest / layout.project_pages(n)[2]).is_file():
                    # Its page is new, or gone again upstream (then the
                    # root no longer lists it): fetch both once more.
                    again.update(layout.project_pages(n))
                    again.update(layout.ROOT_PAGES)
    links: set[str] = set()
    for proj in sorted(projects):
        if proj.startswith("pypi/"):
            rel = proj + "/json"
            data = effective(stage, dest, rel)
            try:
                links |= pagelinks.page_refs(rel, data) if data is not None else frozenset()
            except ValueError as e:
                log.warning("%s", e)
                again.add(rel)
            continue
        rels = [f"{proj}/{p}" for p in layout.PROJECT_PAGES]
        copies = [effective(stage, dest, r) for r in rels]
        if copies[0] is None or copies[2] is None:
            # Gone upstream while we copied: do not publish half a project.
            for r in rels:
                (stage / r).unlink(missing_ok=True)
            continue
        try:
            html_refs = pagelinks.page_refs(rels[0], copies[0])
            json_refs = pagelinks.page_refs(rels[2], copies[2])
            coherent = copies[0] == copies[1] and html_refs == json_refs
        except ValueError as e:
            log.warning("%s", e)
            coherent = False
        if not coherent:
            again.update(rels)
        else:
            links |= json_refs
    foreign = {p for p in links if not layout.is_package_path(p)}
    if foreign:
        log.warning("ignoring %d link(s) outside packages/, e.g. %s", len(foreign), sorted(foreign)[0])
    missing = {p for p in links - foreign if not (dest / p).is_file()}
    return again, missing


def publish(tree: Tree, stage: Path) -> list[str]:
    """Move staged pages into DEST: project pages, then the root, then the
    rest, each group durable (``Tree.barrier``) before the next."""
    staged = [r for r in valid(set(staged_paths(stage)), "staged page") if not r.startswith(NOT_PAGES)]
    first = [r for r in staged if "/" in r and r not in layout.ROOT_PAGES]
    root = [r for r in staged if r in layout.ROOT_PAGES]
    rest = [r for r in staged if "/" not in r]
    for group in (first, root, rest):
        for rel in group:
            tree.place(stage / rel, rel)
        if group:
            tree.barrier()
    return first + root + rest


def deletion_candidates(dest: Path, net: changes.Net | None) -> list[str]:
    """Paths to delete if the source no longer has them; never the page of a
    project our (new) root index lists."""
    try:
        listed = pagelinks.root_names(layout.ROOT_JSON, (dest / layout.ROOT_JSON).read_bytes())
    except (OSError, ValueError):
        listed = frozenset()
    if net is not None:
        wanted = {p for p in net.remove if not p.startswith((layout.TRACES, layout.CHANGES, PullLayout.WORK + "/"))}
    else:
        # Full mode: pages of projects our root does not list.
        wanted = set()
        for top in layout.PAGE_TOPS:
            try:
                entries = list(os.scandir(dest / top))
            except FileNotFoundError:
                continue
            for e in entries:
                if e.is_dir(follow_symlinks=False) and e.name not in listed:
                    wanted.update(f"{top}/{e.name}/{f.name}" for f in os.scandir(e.path) if f.is_file())
    out = []
    for p in valid(wanted, "deletion"):
        parts = p.split("/")
        if len(parts) == 3 and parts[0] in layout.PAGE_TOPS and parts[1] in listed:
            continue
        if (dest / p).is_file():
            out.append(p)
    return out


def write_traces(tree: Tree, staged: Path, own: str, body: bytes) -> None:
    """The source's traces, then ours, last and atomically."""
    for p in sorted(staged.iterdir()) if staged.is_dir() else []:
        if p.is_file() and not p.is_symlink() and p.name != own:
            tree.place(p, layout.trace(p.name))
    tree.barrier()
    tree.write_files([(layout.trace(own), body)])
