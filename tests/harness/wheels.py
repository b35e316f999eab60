"""Build small, real distribution files in memory for the fake upstream.

Tests need wheels that pip can actually install (to prove the mirror serves
byte-exact files) and sdists that look like what PyPI hosts, without touching
the network or a build backend.  Everything here is deterministic: the same
arguments always give the same bytes, so hashes can be asserted and a
re-uploaded "same" file really is the same file.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import random
import re
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass

from packaging.tags import parse_tag
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

__all__ = [
    "BuiltDist",
    "dist_name",
    "import_name",
    "make_blob_file",
    "make_sdist",
    "make_wheel",
]

# 1980-01-01: the earliest timestamp a zip entry can hold.  Used for every
# archive member so the output never depends on the wall clock.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
_TAR_EPOCH = 315532800


@dataclass(frozen=True)
class BuiltDist:
    """One distribution file: its name, its bytes, and its core metadata.

    ``metadata`` is exactly what a PEP 658 ``<file>.metadata`` URL serves; it
    is None for files whose metadata an index does not expose (sdists, blobs).
    """

    filename: str
    content: bytes
    metadata: bytes | None

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")

    @property
    def packagetype(self) -> str:
        return "bdist_wheel" if self.is_wheel else "sdist"

    @property
    def python_version(self) -> str:
        """What PyPI's journal puts in "add <python_version> file <fn>"."""
        if self.is_wheel:
            # name-ver(-build)?-pyver-abi-plat.whl: the python tag is third from the end.
            return self.filename[: -len(".whl")].split("-")[-3]
        return "source"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def size(self) -> int:
        return len(self.content)


def dist_name(name: str) -> str:
    """The file-name form of a project name (PEP 427 / PEP 625): normalized, '_' for '-'."""
    return canonicalize_name(name).replace("-", "_")


def import_name(name: str) -> str:
    """A valid Python module name for the project (dist name, made identifier-safe)."""
    mod = re.sub(r"\W", "_", dist_name(name))
    # Identifiers cannot start with a digit; project names can.
    return mod if not mod[:1].isdigit() else "_" + mod


def _file_version(version: str) -> str:
    # File names carry the PEP 440 normalized version with '-' escaped, so
    # "1.0-1" and "1.0.post1" end up in the same file name, as on PyPI.
    try:
        return str(Version(version)).replace("-", "_")
    except InvalidVersion:
        return version.replace("-", "_")


def _core_metadata(
    name: str, version: str, deps: Sequence[str], requires_python: str | None
) -> bytes:
    lines = [
        "Metadata-Version: 2.1",
        f"Name: {name}",
        f"Version: {version}",
        f"Summary: Test distribution {name} {version}",
    ]
    if requires_python is not None:
        lines.append(f"Requires-Python: {requires_python}")
    lines.extend(f"Requires-Dist: {dep}" for dep in deps)
    return ("\n".join(lines) + "\n").encode("utf-8")


def _record_hash(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _zip_member(path: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(path, date_time=_ZIP_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    # Regular file, rw-r--r--: without this, pip extracts files mode 0o600.
    info.external_attr = (0o100644 & 0xFFFF) << 16
    return info


def make_wheel(
    name: str,
    version: str,
    *,
    deps: Sequence[str] = (),
    requires_python: str | None = None,
    tag: str = "py3-none-any",
) -> BuiltDist:
    """A pure, installable wheel holding ``<import_name>/__init__.py`` with ``__version__``."""
    tags = sorted(str(t) for t in parse_tag(tag))  # also validates the tag
    dist = dist_name(name)
    fver = _file_version(version)
    mod = import_name(name)
    dist_info = f"{dist}-{fver}.dist-info"
    metadata = _core_metadata(name, version, deps, requires_python)
    # Root-Is-Purelib is only honest for "any" platform wheels; for others it
    # tells installers to put the files in platlib, which is what a compiled
    # wheel would want.
    purelib = all(t.endswith("-any") for t in tags)
    wheel_file = (
        "Wheel-Version: 1.0\n"
        "Generator: mirror-tests (1.0)\n"
        f"Root-Is-Purelib: {'true' if purelib else 'false'}\n"
        + "".join(f"Tag: {t}\n" for t in tags)
    ).encode("ascii")
    members: list[tuple[str, bytes]] = [
        (f"{mod}/__init__.py", f"__version__ = {json.dumps(version)}\n".encode()),
        (f"{dist_info}/METADATA", metadata),
        (f"{dist_info}/WHEEL", wheel_file),
    ]
    record_lines = [
        f"{path},{_record_hash(data)},{len(data)}" for path, data in members
    ]
    # RECORD cannot hash itself: the spec says its own line has empty fields.
    record_lines.append(f"{dist_info}/RECORD,,")
    members.append((f"{dist_info}/RECORD", ("\n".join(record_lines) + "\n").encode()))

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path, data in members:
            zf.writestr(_zip_member(path), data)
    filename = f"{dist}-{fver}-{tag}.whl"
    return BuiltDist(filename=filename, content=buf.getvalue(), metadata=metadata)


def _toml_str(value: str) -> str:
    # JSON string escapes are a subset of TOML basic-string escapes.
    return json.dumps(value)


def make_sdist(
    name: str,
    version: str,
    *,
    deps: Sequence[str] = (),
    requires_python: str | None = None,
) -> BuiltDist:
    """A PEP 625 ``.tar.gz`` sdist with PKG-INFO, pyproject.toml and the module."""
    dist = dist_name(name)
    base = f"{dist}-{_file_version(version)}"
    mod = import_name(name)
    pkg_info = _core_metadata(name, version, deps, requires_python)
    pyproject_lines = [
        "[build-system]",
        'requires = ["setuptools>=61"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f"name = {_toml_str(name)}",
        f"version = {_toml_str(version)}",
        "dependencies = [" + ", ".join(_toml_str(d) for d in deps) + "]",
    ]
    if requires_python is not None:
        pyproject_lines.append(f"requires-python = {_toml_str(requires_python)}")
    members: list[tuple[str, bytes]] = [
        (f"{base}/PKG-INFO", pkg_info),
        (f"{base}/pyproject.toml", ("\n".join(pyproject_lines) + "\n").encode()),
        (
            f"{base}/{mod}/__init__.py",
            f"__version__ = {json.dumps(version)}\n".encode(),
        ),
    ]

    raw = io.BytesIO()
    # gzip writes the mtime and the original file name into its header:
    # pin both so the bytes are reproducible.
    with (
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar,
    ):
        for path, data in members:
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = _TAR_EPOCH
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return BuiltDist(filename=f"{base}.tar.gz", content=raw.getvalue(), metadata=None)


def make_blob_file(name: str, version: str, size: int, seed: int = 0) -> BuiltDist:
    """``<name>-<ver>.tar.gz`` of ``size`` seeded random bytes.

    Not a valid archive: it exists to move many bytes (download, resume,
    hashing and disk-space tests) without the cost of compressing anything.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    content = random.Random(seed).randbytes(size)
    filename = f"{dist_name(name)}-{_file_version(version)}.tar.gz"
    return BuiltDist(filename=filename, content=content, metadata=None)
