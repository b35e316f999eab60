"""Frozen value types shared by every step of the data path.

Everything here is plain data: no I/O, no trio, no httpx.  Names and paths
coming from upstream are untrusted; the constructors in this module
(`normalize_name`, `safe_relpath`) are the single place that decides whether
such a value may be used at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple, NewType
from urllib.parse import unquote

from packaging.utils import canonicalize_name

from mirror.errors import UnsafeName, UnsafePath

Serial = NewType("Serial", int)
NormalizedName = NewType("NormalizedName", str)

# PEP 508 project name, case-insensitive.
_VALID_NAME = re.compile(r"^([A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9])$", re.IGNORECASE)
_MAX_NAME = 200
# One path component of a mirrored file.  Everything PyPI produces fits
# (letters, digits, "._-+!~"); anything else (NUL, "\\", "%", ":", spaces,
# "..") is refused rather than escaped.
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_+!~-][A-Za-z0-9._+!~-]*$")
_MAX_COMPONENT = 255
_MAX_PATH = 1024


def normalize_name(name: str) -> NormalizedName:
    """Return the PEP 503 form of an upstream project name, or raise UnsafeName."""
    if not isinstance(name, str) or len(name) > _MAX_NAME or not _VALID_NAME.fullmatch(name):
        raise UnsafeName(repr(name)[:300])
    return NormalizedName(canonicalize_name(name))


def safe_component(part: str) -> str:
    if (
        not part
        or part in (".", "..")
        or len(part.encode("utf-8", "surrogatepass")) > _MAX_COMPONENT
        or not _SAFE_COMPONENT.fullmatch(part)
    ):
        raise UnsafePath(repr(part)[:300])
    return part


def safe_relpath(path: str) -> str:
    """Validate a '/'-separated path relative to ``web/``; return it unchanged.

    Every component must be a safe component: this rejects absolute paths,
    ``..``, backslashes, NUL and anything percent-encoded.
    """
    if len(path) > _MAX_PATH:
        raise UnsafePath(repr(path)[:300])
    for part in path.split("/"):
        safe_component(part)
    return path


def file_relpath(url_path: str, filename: str, sha256: str) -> str:
    """Map an upstream file URL path to its place under ``web/``.

    PyPI's file URLs are ``/packages/<b2[:2]>/<b2[2:4]>/<b2[4:]>/<filename>``;
    we keep whatever follows ``/packages/`` (bandersnatch's layout) so an
    operator can switch without moving files.  Other servers get a
    content-addressed path built from the sha256.  Each component is
    percent-decoded *before* validation, so ``%2e%2e`` is caught as ``..``.
    """
    safe_component(filename)
    raw = url_path.split("/")
    parts = [unquote(p) for p in raw]
    if "packages" in parts[:-1]:
        idx = parts.index("packages")
        rest = parts[idx + 1 :]
        if not rest or rest[-1] != filename:
            raise UnsafePath(f"{url_path!r} does not end in {filename!r}")
        rel = "packages/" + "/".join(safe_component(p) for p in rest)
    else:
        if parts[-1] != filename:
            raise UnsafePath(f"{url_path!r} does not end in {filename!r}")
        rel = f"packages/{sha256[:2]}/{sha256[2:4]}/{sha256[4:]}/{filename}"
    return safe_relpath(rel)


@dataclass(frozen=True, slots=True)
class ReleaseFile:
    """One distribution file of a project, as upstream describes it.

    ``path`` is where it lives under ``web/`` (already validated).  After
    mirroring, ``core_metadata`` / ``provenance`` say whether a sidecar
    exists next to the file in *our* tree.
    """

    filename: str
    url: str
    path: str
    sha256: str
    size: int | None = None
    requires_python: str | None = None
    yanked: bool | str = False
    upload_time: str | None = None
    core_metadata: bool = False
    core_metadata_sha256: str | None = None
    provenance: str | None = None

    @property
    def metadata_path(self) -> str:
        return self.path + ".metadata"

    @property
    def provenance_path(self) -> str:
        return self.path + ".provenance"


@dataclass(frozen=True, slots=True)
class ProjectSnapshot:
    """A project's simple page as read from upstream (or as we publish it)."""

    name: NormalizedName
    display_name: str
    serial: Serial | None
    files: tuple[ReleaseFile, ...] = ()
    versions: tuple[str, ...] = ()
    status: str | None = None
    status_reason: str | None = None
    api_version: str = "1.0"
    # Problems found while parsing (e.g. a file with an unsafe name that was
    # dropped), as (metric kind, message).  Kept so the caller can log and
    # count them.
    rejected: tuple[tuple[str, str], ...] = field(default=(), compare=False)


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One row of PyPI's changelog journal."""

    name: str
    version: str | None
    timestamp: int
    action: str
    serial: Serial


# (normalized name, display name, serial): the shape the root index is built
# from.  A RootEntry is one; so is a row of the state's ``projects`` table.
RootRow = tuple[str, str, int]


class RootEntry(NamedTuple):
    """One project as listed by the root index.

    A tuple on purpose: the root lists every project (600k on PyPI), and the
    state hands SQLite's row tuples straight to the renderer, which unpacks
    them, instead of building an object per project."""

    name: NormalizedName
    display_name: str
    serial: Serial
