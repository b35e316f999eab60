"""A deterministic upstream corpus written as a static tree for nginx.

Layout under ``root``::

    packages/<b2[:2]>/<b2[2:4]>/<b2[4:]>/<filename>   distribution files
    packages/.../<filename>.metadata                 PEP 658 sidecar (wheels)
    simple/<name>/index.v1_json                      PEP 691 project page
    simple/index.v1_json                             PEP 691 root
    pypi/<name>/json                                 legacy JSON API (what bandersnatch reads)
    serials.map                                      nginx map: URI -> X-PyPI-Last-Serial
    feed.json                                        what the XML-RPC server answers
    manifest.json                                    every URL path, size and sha256

File sizes are lognormal around ``median`` bytes (sigma 1.6, so the mean is
about 3.6x the median) clipped to [512 B, 48 MB], plus ``tail`` files drawn
log-uniformly between 10 and 40 MB so a run always has the heavy tail PyPI
has.  About 60 % of the files are wheels with a ``.metadata`` sidecar; the
rest are sdists.  Contents are seeded random bytes (not valid archives: the
mirror never opens them).  File URLs in the pages are absolute paths on the
serving host (``/packages/...``), as PyPI's are absolute URLs on its file host.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

API = "1.4"
MIN_SIZE = 512
MAX_SIZE = 48 << 20


@dataclass(frozen=True)
class CorpusStats:
    projects: int
    files: int  # distribution files
    sidecars: int  # .metadata files
    bytes: int  # every byte a full sync downloads (files + sidecars)
    largest: int
    median: int


def file_sizes(count: int, *, seed: int, median: int = 40_000, sigma: float = 1.6, tail: int = 4) -> list[int]:
    rng = random.Random(seed)
    mu = math.log(median)
    sizes = [min(MAX_SIZE, max(MIN_SIZE, int(rng.lognormvariate(mu, sigma)))) for _ in range(count)]
    for k in rng.sample(range(count), min(tail, count)):
        sizes[k] = int(math.exp(rng.uniform(math.log(10 << 20), math.log(40 << 20))))
    return sizes


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _metadata(name: str, version: str) -> bytes:
    return f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\nSummary: benchmark file\n".encode()


def file_entry(url_path: str, filename: str, content_sha: str, size: int, metadata: bytes | None) -> dict[str, object]:
    md: object = {"sha256": hashlib.sha256(metadata).hexdigest()} if metadata is not None else False
    return {
        "filename": filename, "url": url_path, "hashes": {"sha256": content_sha},
        "requires-python": ">=3.8", "size": size, "upload-time": "2025-01-01T00:00:00.000000Z",
        "yanked": False, "core-metadata": md, "data-dist-info-metadata": md, "provenance": None,
    }


def page(name: str, serial: int, files: list[dict[str, object]], versions: list[str]) -> bytes:
    return json.dumps({
        "meta": {"api-version": API, "_last-serial": serial}, "name": name, "versions": versions,
        "project-status": {"status": "active"}, "files": files,
    }).encode()


def api_document(name: str, serial: int, files: list[dict[str, object]], versions: list[str]) -> bytes:
    """``/pypi/<name>/json`` for the same files (PyPI's legacy JSON API)."""
    releases: dict[str, list[dict[str, object]]] = {v: [] for v in versions}
    for f in files:
        version = str(f["filename"]).split("-")[1].removesuffix(".tar.gz")
        releases.setdefault(version, []).append({
            "filename": f["filename"], "url": f["url"], "size": f["size"],
            "digests": {"sha256": f["hashes"]["sha256"]},  # type: ignore[index]
            "upload_time_iso_8601": f["upload-time"], "requires_python": f["requires-python"],
            "packagetype": "bdist_wheel" if str(f["filename"]).endswith(".whl") else "sdist",
            "yanked": False, "yanked_reason": None, "core-metadata": f["core-metadata"],
        })
    return json.dumps({"info": {"name": name, "version": versions[-1] if versions else ""},
                       "last_serial": serial, "releases": releases, "urls": []}).encode()


def add_file(root: Path, name: str, version: str, *, wheel: bool, content: bytes) -> tuple[dict[str, object], list[tuple[str, int, str]]]:
    """Write one file (and its sidecar) under ``root``; return its page entry and manifest rows."""
    dist = name.replace("-", "_")
    filename = f"{dist}-{version}-py3-none-any.whl" if wheel else f"{dist}-{version}.tar.gz"
    sha = hashlib.sha256(content).hexdigest()
    b2 = hashlib.blake2b(sha.encode() + filename.encode(), digest_size=32).hexdigest()
    url_path = f"/packages/{b2[:2]}/{b2[2:4]}/{b2[4:]}/{filename}"
    _write(root / url_path[1:], content)
    rows = [(url_path, len(content), sha)]
    metadata = _metadata(name, version) if wheel else None
    if metadata is not None:
        _write(root / (url_path[1:] + ".metadata"), metadata)
        rows.append((url_path + ".metadata", len(metadata), hashlib.sha256(metadata).hexdigest()))
    return file_entry(url_path, filename, sha, len(content), metadata), rows


def generate(root: Path, *, files: int, seed: int, median: int = 40_000, tail: int = 4) -> CorpusStats:
    """Write the corpus; the same arguments always give the same bytes."""
    rng = random.Random(seed)
    sizes = file_sizes(files, seed=seed, median=median, tail=tail)
    manifest: list[tuple[str, int, str]] = []
    listing: dict[str, int] = {}
    roots: list[dict[str, object]] = []
    serial_map: list[str] = []
    i = serial = project = 0
    while i < files:
        name = f"bench-{project:05d}"
        display = name if project % 3 else name.replace("-", "_").title()
        entries: list[dict[str, object]] = []
        versions: list[str] = []
        for k in range(min(rng.randint(1, 6), files - i)):
            version = f"1.{k // 2}.0"
            if version not in versions:
                versions.append(version)
            content = random.Random(seed * 1_000_003 + i).randbytes(sizes[i])
            entry, rows = add_file(root, name, version, wheel=rng.random() < 0.6, content=content)
            entries.append(entry)
            manifest.extend(rows)
            i += 1
        serial += len(entries) + 1
        listing[display] = serial
        roots.append({"name": display, "_last-serial": serial})
        _write(root / "simple" / name / "index.v1_json", page(name, serial, entries, versions))
        _write(root / "pypi" / name / "json", api_document(display, serial, entries, versions))
        serial_map += [f"/simple/{name}/ {serial};", f"/simple/{name}/index.v1_json {serial};",
                       f"/pypi/{name}/json {serial};"]
        project += 1
    _write(root / "simple" / "index.v1_json",
           json.dumps({"meta": {"api-version": API, "_last-serial": serial}, "projects": roots}).encode())
    _write(root / "feed.json", json.dumps({"serial": serial, "listing": listing}).encode())
    _write(root / "serials.map", ("\n".join(serial_map) + "\n").encode())
    _write(root / "manifest.json", json.dumps(manifest).encode())
    sidecars = sum(1 for p, _, _ in manifest if p.endswith(".metadata"))
    ordered = sorted(sizes)
    return CorpusStats(project, files, sidecars, sum(s for _, s, _ in manifest), ordered[-1], ordered[len(ordered) // 2])


def disk_usage(root: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(root):
        total += sum(os.lstat(os.path.join(dirpath, n)).st_size for n in names)
    return total
