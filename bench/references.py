"""The real references a first sync is measured against, in the same run.

* **curl**: the raw limit of this machine.  One ``curl --parallel`` process
  with ``--workers`` transfers at a time over keep-alive connections fetches
  every file and ``.metadata`` of the manifest into a directory, then
  ``sha256sum -c`` checks every one (the mirror's own work minus everything
  a mirror adds: pages, state, durability).  One shell command, so wall time
  and CPU (user+sys, from ``wait4``) include both programs.
* **bandersnatch**: the tool we replace, from an install of its own
  (``--bandersnatch PATH``; it needs Python >= 3.12), configured as its
  docs suggest for a full mirror: ``workers = 10`` (its cap), release files
  and core metadata on, JSON off, reading ``/simple/`` and ``/pypi/<name>/json``
  from the same nginx.

Both print nothing useful; the caller checks what they left on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

CURL = "curl"


def curl_command(url: str, manifest: Path, work: Path, *, concurrency: int) -> list[str]:
    """A shell command that downloads every manifest entry and checks its sha256."""
    rows = [tuple(x) for x in json.loads(manifest.read_bytes())]
    work.mkdir(parents=True, exist_ok=True)
    config = work / "curl.cfg"
    sums = work / "sha256sums"
    with open(config, "w") as cfg, open(sums, "w") as s:
        for n, (path, _size, sha) in enumerate(rows):
            cfg.write(f'url = "{url}{path}"\noutput = "{work}/{n}"\n')
            s.write(f"{sha}  {work}/{n}\n")
    script = (
        f"{CURL} --silent --show-error --fail --parallel --parallel-max {concurrency} "
        f"--config {config} && sha256sum --quiet --check {sums}"
    )
    return ["sh", "-c", script]


def bandersnatch_config(path: Path, url: str, directory: Path, *, workers: int = 10) -> Path:
    path.write_text(
        "[mirror]\n"
        f"directory = {directory}\n"
        f"master = {url}\n"
        # The corpus' pages name files by path; fetch them from the same host.
        f"download-mirror = {url}\n"
        "download-mirror-no-fallback = true\n"
        "allow-non-https = true\n"
        "json = false\n"
        "release-files = true\n"
        "core-metadata = true\n"
        f"workers = {workers}\n"
        "timeout = 60\n"
        "global-timeout = 18000\n"
        "stop-on-error = true\n"
        "hash-index = false\n"
        "simple-format = ALL\n"
        "compare-method = hash\n"
        "[plugins]\n"
        "enabled =\n"
    )
    return path


def bandersnatch_command(binary: str, config: Path) -> list[str]:
    return [binary, "--config", str(config), "mirror"]


def count_files(root: Path) -> tuple[int, int]:
    """(files, bytes) under ``root``."""
    n = total = 0
    for p in root.rglob("*"):
        if p.is_file():
            n += 1
            total += p.stat().st_size
    return n, total
