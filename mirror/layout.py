"""Where everything lives: the one owner of every path under a mirror's
directory, the served tree (``web/``) and the private state (``state/``).

Other modules never spell a path of their own: they ask a ``Layout`` (a
primary's directory), a ``PullLayout`` (a secondary's destination), or the
web-relative helpers below.  bandersnatch's layout is kept, so an operator
can switch without touching nginx::

    <directory>/
      web/                          what nginx and rsync serve
        simple/index.html           root index (PEP 503); index.v1_html is the same bytes
        simple/index.v1_json        root index (PEP 691)
        simple/<name>/index.html, index.v1_html, index.v1_json
        packages/...                files, at the path of PyPI's file URL
        pypi/<name>/json            legacy JSON API (json_api = true)
        last-modified
        changes/<gen>-<epoch>.txt, changes/index.txt
        trace/<mirror name>         written last
      state/
        mirror.sqlite3              the state database (WAL)
        lock                        flock; the pid of the running instance
        s3-uploads                  [storage] backend = "s3": uploads not yet recorded
        tmp/                        temp files, on web/'s filesystem (renames are atomic)

Pure: path arithmetic only, no I/O.
"""

from __future__ import annotations

import functools
import itertools
import secrets
from dataclasses import dataclass
from pathlib import Path

# -- paths relative to web/ ------------------------------------------------------

PACKAGES = "packages/"
ROOT_PAGES = ("simple/index.html", "simple/index.v1_html", "simple/index.v1_json")
ROOT_JSON = ROOT_PAGES[2]
PROJECT_PAGES = ("index.html", "index.v1_html", "index.v1_json")
LAST_MODIFIED = "last-modified"
CHANGES = "changes/"
CHANGES_INDEX = "changes/index.txt"
TRACES = "trace/"
# What a web server sends with each kind of path (conf/nginx.conf says the
# same in its own words; tests/test_conf_files.py holds the two together),
# and what an object store is told to send (the S3 tree sets both on every
# object it uploads).
_TYPES = (
    (".v1_json", "application/vnd.pypi.simple.v1+json"),
    (".v1_html", "application/vnd.pypi.simple.v1+html"),
    (".html", "text/html; charset=utf-8"),
    (".metadata", "text/plain; charset=utf-8"),
    (".provenance", "application/json"),
    (".zip", "application/zip"),
)
IMMUTABLE = "public, max-age=31536000, immutable"
PAGE_MAX_AGE = "public, max-age=600"
NO_CACHE = "no-cache"
# The directories holding one directory of pages per project.
PAGE_TOPS = ("simple", "pypi")
TEMP_SUFFIX = ".part"


def project_dir(name: str) -> str:
    return f"simple/{name}"


def project_pages(name: str) -> tuple[str, str, str]:
    """``index.html``, ``index.v1_html`` and ``index.v1_json`` of one project."""
    return (f"simple/{name}/index.html", f"simple/{name}/index.v1_html", f"simple/{name}/index.v1_json")


def api_json(name: str) -> str:
    """The legacy JSON API document of one project."""
    return f"pypi/{name}/json"


def project_paths(name: str) -> tuple[str, ...]:
    """Every page a project has under web/ (its simple pages and JSON API)."""
    return (*project_pages(name), api_json(name))


def change_list(epoch: str, generation: int) -> str:
    return f"{CHANGES}{generation:010d}-{epoch}.txt"


def trace(name: str) -> str:
    return f"{TRACES}{name}"


def is_package_path(rel: str) -> bool:
    """Immutable, content-addressed files (stage 1 of a pull copies these)."""
    return rel.startswith(PACKAGES)


def content_type(rel: str) -> str:
    """The Content-Type of the object at ``rel``."""
    if rel.startswith("pypi/"):
        return "application/json"
    if rel == LAST_MODIFIED or rel.startswith((TRACES, CHANGES)):
        return "text/plain; charset=utf-8"
    for suffix, media in _TYPES:
        if rel.endswith(suffix):
            return media
    return "application/octet-stream"


def cache_control(rel: str) -> str:
    """How long a cache may keep ``rel``: files for good (their paths are
    content-addressed), pages briefly, the freshness markers not at all."""
    if is_package_path(rel):
        return IMMUTABLE
    if rel.startswith(("simple/", "pypi/")):
        return PAGE_MAX_AGE
    return NO_CACHE


# Unique among the processes sharing one state/tmp: a random prefix per
# process, then a counter (no random bytes, so no system call, per name).
_TEMP_PREFIX = secrets.token_hex(8)
_temp_counter = itertools.count()


def new_temp_name(suffix: str = "") -> str:
    return f"{_TEMP_PREFIX}-{next(_temp_counter):x}{suffix}{TEMP_SUFFIX}"


# -- directories -------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """A primary mirror's directory (``[mirror] directory``)."""

    directory: Path

    @property
    def web(self) -> Path:
        return self.directory / "web"

    @property
    def state(self) -> Path:
        return self.directory / "state"

    @property
    def db(self) -> Path:
        return self.state / "mirror.sqlite3"

    @property
    def lock(self) -> Path:
        return self.state / "lock"

    @property
    def uploads_journal(self) -> Path:
        """The keys a bucket tree may hold unrecorded (``mirror.publish.s3tree``)."""
        return self.state / "s3-uploads"

    @property
    def tmp(self) -> Path:
        """Temp files: inside ``state/`` so rsync never copies a half-written
        one, on ``web/``'s filesystem so that a rename publishes it atomically."""
        return self.state / "tmp"

    def new_temp(self, suffix: str = "") -> Path:
        return self.tmp / new_temp_name(suffix)

    def is_temp(self, path: Path) -> bool:
        """Is ``path`` a temp file name this layout hands out (and nothing else)?
        (Compared as strings: a first sync asks once per file.)"""
        head, _, name = str(path).rpartition("/")
        return head == self._tmp_str and name.endswith(TEMP_SUFFIX)

    @functools.cached_property
    def _tmp_str(self) -> str:
        return str(self.tmp)


@dataclass(frozen=True)
class PullLayout:
    """A secondary's destination: DEST is the served tree itself, and
    ``mirror pull`` keeps its work under ``DEST/.~pull~`` (same filesystem)."""

    dest: Path

    WORK = ".~pull~"

    @property
    def web(self) -> Path:
        return self.dest

    @property
    def work(self) -> Path:
        return self.dest / self.WORK

    @property
    def stage(self) -> Path:
        """Pages copied from the source, renamed into DEST once their files are there."""
        return self.work / "stage"

    @property
    def meta(self) -> Path:
        """The source's traces and change lists, as read."""
        return self.work / "meta"

    @property
    def tmp(self) -> Path:
        return self.work / "tmp"

    @property
    def lock(self) -> Path:
        return self.work / "lock"
