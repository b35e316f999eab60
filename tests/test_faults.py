"""Fault matrix: every fault kind of the fake upstream, at a high rate, on files
and pages, ends (after retries and at most a few runs) in a complete,
consistent, byte-exact mirror, and each kind shows up in its counter.

Between runs the tree must never hold a byte that is not upstream's: corrupt
or partial downloads are never published, whatever the fault.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mirror import cli
from mirror.errors import UpstreamError
from mirror.metrics import Metrics
from tests.harness.e2e import make_config
from tests.harness.fakepypi import FakePyPI, populate
from tests.harness.reliability import foreign_files, mirror_problems, upstream_files

RATE = 0.5
MAX_RUNS = 8


def counter(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# kind -> (fault params, upstream config overrides, counters that must rise)
MATRIX: dict[str, tuple[dict[str, Any], dict[str, Any], list[tuple[str, dict[str, str]]]]] = {
    "status": (
        {"status": 503},
        {},
        [
            ("mirror_download_errors_total", {"reason": "http_status"}),
            ("mirror_upstream_errors_total", {"kind": "page", "reason": "http_status"}),
        ],
    ),
    "reset": (
        {},
        {},
        [
            ("mirror_download_errors_total", {"reason": "connection"}),
            ("mirror_upstream_errors_total", {"kind": "page", "reason": "connection"}),
        ],
    ),
    "truncate": (
        {},
        {},
        [
            ("mirror_download_errors_total", {"reason": "truncated"}),
            ("mirror_upstream_errors_total", {"kind": "page", "reason": "truncated"}),
        ],
    ),
    "corrupt": (
        {},
        {},
        [
            ("mirror_download_errors_total", {"reason": "hash_mismatch"}),
            # A corrupted page is either unparsable or names other files.
            ("mirror_upstream_rejected_total", {"kind": "malformed"}),
        ],
    ),
    "slow": (
        {"delay": 1.0},
        {"timeout": 0.3},
        [
            ("mirror_download_errors_total", {"reason": "timeout"}),
            ("mirror_upstream_errors_total", {"kind": "page", "reason": "timeout"}),
        ],
    ),
    "stale": ({}, {}, [("mirror_stale_pages_total", {})]),
    "malformed": (
        {},
        {},
        [
            ("mirror_download_errors_total", {"reason": "size_mismatch"}),
            ("mirror_upstream_rejected_total", {"kind": "malformed"}),
        ],
    ),
    # An HTML-only upstream: html.parser accepts garbage, so a garbled page
    # must be recognised as such, not published as a project with no files.
    "malformed-html": (
        {},
        {},
        [
            ("mirror_download_errors_total", {"reason": "hash_mismatch"}),  # HTML gives no sizes
            ("mirror_upstream_rejected_total", {"kind": "malformed"}),
        ],
    ),
}


@pytest.mark.parametrize("kind", sorted(MATRIX))
async def test_fault_matrix_ends_in_a_complete_mirror(kind: str, tmp_path: Path) -> None:
    params, upstream_cfg, counters = MATRIX[kind]
    with FakePyPI(seed=6) as up:
        populate(up, 10, seed=6)
        up.html_only = kind.endswith("-html")
        expected = upstream_files(up)
        rate = 0.25 if kind == "slow" else RATE  # each slow hit costs a timeout
        for where in ("/packages/", "/simple/"):
            up.add_fault(kind.removesuffix("-html"), match=where, rate=rate, **params)
        cfg = make_config(
            up.url, tmp_path / "m",
            upstream={"retries": 3, **upstream_cfg},
            mirror={"workers": 4},
        )
        metrics = Metrics()
        web = cfg.mirror.directory / "web"
        runs = []
        for _ in range(MAX_RUNS):
            try:
                report = await cli.run_sync(cfg, metrics=metrics)
            except UpstreamError as e:  # the feed itself is not faulted
                raise AssertionError(f"feed failed: {e}") from None
            runs.append(len(report.failed))
            # Whatever the fault, nothing but upstream's exact bytes is ever published.
            assert foreign_files(web, expected) == []
            if not report.failed:
                break
        assert runs[-1] == 0, f"still failing after {MAX_RUNS} runs: {runs}"
        fired = sum(f.fired for f in up._faults)
        assert fired >= 5, fired
    assert mirror_problems(web, up) == []
    for name, labels in counters:
        assert counter(metrics, name, **labels) > 0, (name, labels, runs)
