"""The primary's promises to downstream sites: trace, change lists, retirement, safety valve."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from mirror import layout
from mirror import cli
from mirror.downstream import changes
from mirror.plan import valve
from mirror.config import Config
from mirror.metrics import Metrics
from mirror.publish.state import State
from mirror.downstream.trace import parse_date, parse_trace
from mirror.layout import Layout
from tests.harness.consistency import check_tree
from tests.harness.e2e import make_config, write_config
from tests.harness.fakepypi import FakePyPI, make_blob_file


async def sync(cfg: Config, metrics: Metrics | None = None, **kw: bool) -> cli.CycleReport:
    return await cli.run_sync(cfg, metrics=metrics or Metrics(), **kw)


def trace_of(web: Path, name: str = "primary") -> dict[str, str]:
    return parse_trace((web / "trace" / name).read_bytes())


def change_list(web: Path, gen: int) -> changes.ChangeList:
    epoch, entries = changes.parse_index((web / layout.CHANGES_INDEX).read_bytes())
    (entry,) = [e for e in entries if e.generation == gen]
    return changes.parse_list((web / "changes" / entry.name).read_bytes())


def rel(up: FakePyPI, name: str, filename: str) -> str:
    return up.file_path(name, filename).lstrip("/")


def tree_files(web: Path) -> set[str]:
    return {p.relative_to(web).as_posix() for p in web.rglob("*") if p.is_file()}


def empty_dirs(web: Path) -> list[Path]:
    return [d for d in web.rglob("*") if d.is_dir() and not any(d.iterdir())]


# -- trace and change lists ------------------------------------------------------


async def test_trace_is_written_last_and_describes_the_tree(upstream: FakePyPI, tmp_path: Path) -> None:
    cfg = make_config(upstream.url, tmp_path / "m", mirror={"name": "primary"})
    for i in range(3):
        upstream.add_release(f"pkg-{i}", "1.0")
    before = time.time()
    report = await sync(cfg)
    web = cfg.mirror.directory / "web"
    t = trace_of(web)
    files, nbytes = State.open(Layout(cfg.mirror.directory).db).tree_totals()
    assert t["Serial"] == str(upstream.serial) == str(report.synced_serial)
    assert (t["Files"], t["Bytes"]) == (str(files), str(nbytes)) and files == report.files_downloaded
    assert t["Creator"].startswith("mirror ") and t["Upstream"] == upstream.url and t["Mirror"] == "primary"
    assert t["Generation"] == "1" == str(report.generation)
    assert before - 1 <= parse_date(t["Date"]) <= time.time() + 1
    assert float(t["Cycle-Seconds"]) >= 0
    # Written last: nothing in the tree is newer than the trace.
    trace_mtime = (web / "trace/primary").stat().st_mtime_ns
    assert max(p.stat().st_mtime_ns for p in web.rglob("*") if p.is_file()) == trace_mtime
    # The first list names every file and page of the tree.
    first = change_list(web, 1)
    assert (first.generation, first.serial_from, first.serial_to) == (1, 0, upstream.serial)
    assert {p for op, p in first.entries} == tree_files(web) - {"trace/primary", layout.CHANGES_INDEX, t["Changes"]}
    assert {op for op, _ in first.entries} == {"add", "replace"}

    # A cycle with nothing new writes no list and no trace.
    report = await sync(cfg)
    assert report.generation is None
    assert (web / "trace/primary").stat().st_mtime_ns == trace_mtime


async def test_change_list_names_exactly_what_a_cycle_changed(upstream: FakePyPI, tmp_path: Path) -> None:
    cfg = make_config(upstream.url, tmp_path / "m", mirror={"name": "primary"})
    for i in range(3):
        upstream.add_release(f"pkg-{i}", "1.0")
    await sync(cfg)
    web = cfg.mirror.directory / "web"
    serial_before = upstream.serial
    new = upstream.add_release("pkg-0", "2.0")
    dropped = upstream.filenames("pkg-1")[0]
    dropped_rel = rel(upstream, "pkg-1", dropped)
    upstream.remove_file("pkg-1", dropped)
    upstream.remove_project("pkg-2")
    report = await sync(cfg)
    assert report.generation == 2
    cl = change_list(web, 2)
    assert (cl.serial_from, cl.serial_to) == (serial_before, upstream.serial)
    added = {rel(upstream, "pkg-0", f) for f in new}
    added |= {p + ".metadata" for p in added if p.endswith(".whl")}
    pages = {f"simple/{n}/{p}" for n in ("pkg-0", "pkg-1") for p in ("index.html", "index.v1_html", "index.v1_json")}
    roots = {"simple/index.html", "simple/index.v1_html", "simple/index.v1_json"}
    gone = {f"simple/pkg-2/{p}" for p in ("index.html", "index.v1_html", "index.v1_json")} | {"pypi/pkg-2/json"}
    assert set(cl.entries) == (
        {("add", p) for p in added}
        | {("replace", p) for p in pages | roots | {"last-modified"}}
        | {("delete", p) for p in gone}
    )
    # The dropped file is only up for retirement: not deleted, not listed.
    assert (web / dropped_rel).exists() and dropped_rel not in {p for _, p in cl.entries}
    epoch, entries = changes.parse_index((web / layout.CHANGES_INDEX).read_bytes())
    assert [e.generation for e in entries] == [1, 2] and trace_of(web)["Epoch"] == epoch
    assert check_tree(web) == []


# -- retirement ----------------------------------------------------------------------


async def test_retired_file_stays_for_the_grace_period_then_goes(upstream: FakePyPI, tmp_path: Path) -> None:
    cfg = make_config(upstream.url, tmp_path / "m", mirror={"name": "primary", "retire_after": "1s"})
    upstream.add_release("demo", "1.0")
    upstream.add_release("demo", "2.0")
    await sync(cfg)
    web = cfg.mirror.directory / "web"
    state = State.open(Layout(cfg.mirror.directory).db)
    old = [rel(upstream, "demo", f) for f in upstream.filenames("demo") if "-1.0" in f]
    old += [p + ".metadata" for p in old if p.endswith(".whl")]
    assert len(old) == 3 and all((web / p).is_file() for p in old)
    files0, bytes0 = state.tree_totals()
    sizes = sum((web / p).stat().st_size for p in old)
    upstream.remove_release("demo", "1.0")
    report = await sync(cfg)
    assert report.files_retired == 3 and report.files_deleted == 0
    assert all((web / p).is_file() for p in old), "deleted before the grace period"
    assert check_tree(web) == []
    await trio.sleep(1.2)
    report = await sync(cfg)  # nothing new upstream: only retirement
    assert report.files_deleted == 3
    assert not any((web / p).exists() for p in old)
    # Each file had its own directory (the path carries its hash): all pruned.
    assert not any((web / p).parent.exists() for p in old)
    assert empty_dirs(web) == []
    assert state.tree_totals() == (files0 - 3, bytes0 - sizes)
    assert state.retire_count() == 0
    cl = change_list(web, report.generation or 0)
    assert {("retire", p) for p in old} <= set(cl.entries)
    assert trace_of(web)["Files"] == str(files0 - 3)
    assert check_tree(web) == []


async def test_file_referenced_again_before_deletion_is_kept(upstream: FakePyPI, tmp_path: Path) -> None:
    cfg = make_config(upstream.url, tmp_path / "m", mirror={"name": "primary", "retire_after": "1s"})
    blob = make_blob_file("demo-blob", "1.0", 2048, seed=7)
    upstream.add_release("demo", "1.0")
    upstream.add_file("demo", "1.0", blob)
    await sync(cfg)
    web = cfg.mirror.directory / "web"
    path = rel(upstream, "demo", blob.filename)
    upstream.remove_file("demo", blob.filename)
    await sync(cfg)
    state = State.open(Layout(cfg.mirror.directory).db)
    assert [r[0] for r in state.db.execute("SELECT path FROM retire")] == [path]
    upstream.add_file("demo", "1.0", blob)  # the same bytes: the same path
    assert rel(upstream, "demo", blob.filename) == path
    await sync(cfg)
    assert state.retire_count() == 0
    await trio.sleep(1.2)
    report = await sync(cfg)
    assert report.files_deleted == 0 and (web / path).is_file()
    assert check_tree(web) == []


# -- safety valve ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retiring", "removing", "projects", "max_retire", "allow", "allowed", "reason"),
    [
        (0, 0, 100, 50_000, False, True, ""),
        (50_000, 0, 100, 50_000, False, True, ""),
        (50_001, 0, 100, 50_000, False, False, "50001 files would be retired (max_retire = 50000)"),
        (3, 0, 5, 2, False, False, "3 files would be retired (max_retire = 2)"),
        (0, 1, 3, 50_000, False, True, ""),  # small mirrors may lose a project
        (0, 10, 20, 50_000, False, True, ""),  # 50% but only 10 projects
        (0, 11, 20, 50_000, False, False, "11 of 20 projects (55%) would be removed (limit 10%)"),
        (0, 100, 1000, 50_000, False, True, ""),  # exactly 10%
        (0, 101, 1000, 50_000, False, False, "101 of 1000 projects (10%) would be removed"),
        (0, 60_001, 600_000, 50_000, False, False, "60001 of 600000 projects"),
        (60_000, 60_000, 600_000, 50_000, True, True, "60000 files would be retired"),
    ],
)
def test_valve_decision(
    retiring: int, removing: int, projects: int, max_retire: int, allow: bool, allowed: bool, reason: str
) -> None:
    v = valve.decide(retiring=retiring, removing=removing, projects=projects, max_retire=max_retire, allow=allow)
    assert v.allowed is allowed
    assert reason in v.reason and bool(v.reason) is bool(reason)
    assert v.overridden is (allow and bool(reason))


async def test_valve_holds_a_mass_removal_until_allowed(upstream: FakePyPI, tmp_path: Path) -> None:
    cfg = make_config(upstream.url, tmp_path / "m", mirror={"name": "primary"})
    for i in range(25):
        upstream.add_release(f"p{i}", "1.0", wheel=False)
    await sync(cfg)
    web = cfg.mirror.directory / "web"
    for i in range(12):
        upstream.remove_project(f"p{i}")
    fresh = upstream.add_release("p20", "2.0", wheel=False)
    metrics = Metrics()
    report = await sync(cfg, metrics)
    assert "12 of 25 projects (48%) would be removed" in report.blocked
    assert metrics.registry.get_sample_value("mirror_retirement_blocked") == 1
    # Nothing destructive happened; the harmless change was published.
    assert all((web / f"simple/p{i}/index.html").exists() for i in range(12))
    assert rel(upstream, "p20", fresh[0]) in {p for _, p in change_list(web, 2).entries}
    assert check_tree(web) == [] and len(check_root(web)) == 25
    state = State.open(Layout(cfg.mirror.directory).db)
    assert state.todo_count() == 12 and report.projects_removed == 0
    # Still blocked on the next cycle (the removals stay queued)...
    report = await sync(cfg, metrics)
    assert report.blocked and metrics.registry.get_sample_value("mirror_retirement_blocked") == 1
    # ...until the operator lets one cycle through.
    report = await sync(cfg, metrics, allow_mass_delete=True)
    assert not report.blocked and report.projects_removed == 12
    assert metrics.registry.get_sample_value("mirror_retirement_blocked") == 0
    assert len(check_root(web)) == 13 and not (web / "simple/p0").exists()
    assert state.todo_count() == 0 and check_tree(web) == []


def check_root(web: Path) -> list[str]:
    import json

    return [p["name"] for p in json.loads((web / "simple/index.v1_json").read_bytes())["projects"]]


def test_valve_max_retire_through_the_cli(
    upstream: FakePyPI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.add_release("demo", "1.0")
    upstream.add_release("demo", "2.0")
    conf = write_config(tmp_path / "mirror.toml", upstream.url, tmp_path / "m", mirror={"max_retire": 2})
    assert cli.main(["sync", "--config", str(conf)]) == 0
    upstream.remove_release("demo", "1.0")  # sdist, wheel and its .metadata: 3 files
    textfile = tmp_path / "mirror.prom"
    assert cli.main(["sync", "--config", str(conf), "--metrics-textfile", str(textfile)]) == 6
    err = capsys.readouterr().err
    assert "3 files would be retired (max_retire = 2)" in err and "--allow-mass-delete" in err
    assert "Traceback" not in err
    assert "mirror_retirement_blocked 1.0" in textfile.read_text()
    web = tmp_path / "m" / "web"
    assert any("-1.0" in f for f in (web / "simple/demo/index.html").read_text().split('"'))
    assert cli.main(["sync", "--config", str(conf), "--allow-mass-delete", "--metrics-textfile", str(textfile)]) == 0
    assert "mirror_retirement_blocked 0.0" in textfile.read_text()
    assert "-1.0" not in (web / "simple/demo/index.html").read_text()
    assert check_tree(web) == []
