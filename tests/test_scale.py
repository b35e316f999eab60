"""Scalability properties, cheap enough for every CI run.

The long benchmarks live in ``bench/`` (``python -m bench``); these guard the
properties they measure so a regression fails CI: a no-change cycle against
a big upstream costs one small request and no writes, and the root index is
streamed in one pass with bytes identical to the whole-page renderers.
"""

from __future__ import annotations

import json
import os
import resource
import xmlrpc.client
from pathlib import Path

import pytest

from bench.seed import seed_state
from mirror import cli
from mirror.publish import render
from mirror.metrics import Metrics
from mirror.model import NormalizedName, RootEntry, Serial
from mirror.publish.rootindex import write_root
from mirror.publish.state import State
from mirror.publish.tree import FileTree
from mirror.layout import Layout
from tests.harness.e2e import make_config
from tests.harness.fakepypi import FakePyPI

PROJECTS = 20_000


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _root_stamps(web: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (web / "simple").glob("index.*")}


async def test_no_change_cycle_on_a_big_upstream_is_one_small_request(upstream: FakePyPI, tmp_path: Path) -> None:
    directory = tmp_path / "m"
    serial = seed_state(directory, PROJECTS)
    # The journal has nothing after the seeded serial: changelog_since_serial
    # answers with an empty list (the only call a no-change cycle makes).
    upstream.add_raw_route(
        "/pypi", body=xmlrpc.client.dumps(([],), methodresponse=True).encode(),
        headers={"Content-Type": "text/xml"},
    )
    cfg = make_config(upstream.url, directory, upstream={"feed": "changelog"})
    web = directory / "web"
    before = _root_stamps(web)
    metrics = Metrics()
    await cli.run_sync(cfg, metrics=metrics)  # warm-up: imports, TLS context, page cache
    upstream.reset_log()
    cpu = _cpu()
    report = await cli.run_sync(cfg, metrics=metrics)
    spent = _cpu() - cpu
    assert [(m, p) for m, p, _, _ in upstream.requests] == [("POST", "/pypi")]
    assert upstream.bytes_sent() < 10_000
    assert not report.changed and report.synced_serial == serial
    assert _root_stamps(web) == before, "a no-change cycle must not rewrite the root"
    # Measured ~10 ms; the bound only catches work that grows with the
    # number of projects (rendering the root alone costs ~100 ms here).
    assert spent < 0.5, f"no-change cycle took {spent * 1000:.0f} ms of CPU"


ENTRIES = [
    RootEntry(NormalizedName("a"), "A", Serial(1)),
    RootEntry(NormalizedName("b-c"), 'B<"&>c', Serial(22)),
    RootEntry(NormalizedName("d"), "d\u00e9\ud800", Serial(3)),
    RootEntry(NormalizedName("e"), "e", Serial(40)),
]


@pytest.mark.parametrize("entries", [ENTRIES, ENTRIES[:1], []])
@pytest.mark.parametrize("batch", [1, 3, 10_000])
def test_iter_root_is_the_whole_pages_in_pieces(entries: list[RootEntry], batch: int) -> None:
    chunks = list(render.iter_root(iter(entries), serial=7, batch=batch))
    assert b"".join(h for h, _ in chunks) == render.root_html(entries)
    assert b"".join(j for _, j in chunks) == render.root_json(entries, serial=7)
    assert len(chunks) == 2 + -(-len(entries) // batch)


def test_write_root_publishes_what_the_state_lists(tmp_path: Path) -> None:
    serial = seed_state(tmp_path, 2_500, files=False, root=False)
    tree = FileTree.at(Layout(tmp_path))
    state = State.open(Layout(tmp_path).db)
    try:
        entries = list(state.root_entries())
        # The trio thread's connection stays open, as during a sync.
        write_root(tree, state.path, serial)
    finally:
        state.close()
    simple = tmp_path / "web" / "simple"
    assert (simple / "index.html").read_bytes() == render.root_html(entries)
    assert (simple / "index.v1_json").read_bytes() == render.root_json(entries, serial=serial)
    assert os.path.samefile(simple / "index.html", simple / "index.v1_html")
    doc = json.loads((simple / "index.v1_json").read_bytes())
    assert len(doc["projects"]) == 2_500 and doc["meta"]["_last-serial"] == serial
    assert os.listdir(tmp_path / "state" / "tmp") == []
