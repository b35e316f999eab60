"""End-to-end: `mirror sync` against a real loopback FakePyPI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from mirror import cli
from mirror.config import Config
from mirror.publish.lock import DirectoryLock
from mirror.metrics import Metrics
from mirror.publish.state import State
from mirror.layout import Layout
from tests.harness.consistency import check_tree
from tests.harness.e2e import clean_pip_env, make_config, static_server, write_config
from tests.harness.fakepypi import FakePyPI


def populate(up: FakePyPI, n: int = 6) -> None:
    for i in range(n):
        up.add_release(f"Pkg.{i}", "1.0", provenance=(i == 0))
        up.add_release(f"Pkg.{i}", "2.0rc1", requires_python=">=3.9")


async def sync(cfg: Config, metrics: Metrics | None = None) -> cli.CycleReport:
    return await cli.run_sync(cfg, metrics=metrics or Metrics())


def page(web: Path, name: str) -> dict:  # type: ignore[type-arg]
    return json.loads((web / "simple" / name / "index.v1_json").read_bytes())


def filenames(web: Path, name: str) -> set[str]:
    return {f["filename"] for f in page(web, name)["files"]}


def file_gets(up: FakePyPI) -> list[str]:
    return [
        r[1] for r in up.requests if r[0] == "GET" and r[1].startswith("/packages/")
    ]


@pytest.fixture
def cfg(upstream: FakePyPI, tmp_path: Path) -> Config:
    return make_config(upstream.url, tmp_path / "m")


async def test_first_sync_publishes_a_consistent_tree(
    upstream: FakePyPI, cfg: Config
) -> None:
    populate(upstream)
    report = await sync(cfg)
    web = cfg.mirror.directory / "web"
    assert report.failed == {}
    assert report.synced_serial == upstream.serial
    assert check_tree(web) == []
    root = json.loads((web / "simple" / "index.v1_json").read_bytes())
    assert sorted(p["name"] for p in root["projects"]) == [f"Pkg.{i}" for i in range(6)]
    assert root["meta"]["_last-serial"] == upstream.serial
    for i in range(6):
        name = f"pkg-{i}"
        assert filenames(web, name) == set(upstream.filenames(name))
        assert page(web, name)["versions"] == ["1.0", "2.0rc1"]
    # every wheel's .metadata is mirrored and advertised with its hash
    p0 = page(web, "pkg-0")
    wheels = [f for f in p0["files"] if f["filename"].endswith(".whl")]
    assert wheels and all(isinstance(f["core-metadata"], dict) for f in wheels)
    # provenance is mirrored next to the file and linked locally
    prov = [f for f in p0["files"] if f["provenance"]]
    assert prov and all(f["provenance"].startswith("../../packages/") for f in prov)
    assert (web / "last-modified").exists()
    files, nbytes = State.open(Layout(cfg.mirror.directory).db).tree_totals()
    assert files == report.files_downloaded and nbytes == report.bytes_downloaded


async def test_second_sync_without_changes_only_asks_the_feed(
    upstream: FakePyPI, cfg: Config
) -> None:
    populate(upstream, 3)
    await sync(cfg)
    web = cfg.mirror.directory / "web"
    before = {p: p.stat().st_mtime_ns for p in web.rglob("*") if p.is_file()}
    upstream.reset_log()
    report = await sync(cfg)
    assert [(m, p) for m, p, *_ in upstream.requests] == [("POST", "/pypi")]
    assert (
        report.files_downloaded == 0
        and report.pages_written == 0
        and not report.root_written
    )
    after = {p: p.stat().st_mtime_ns for p in web.rglob("*") if p.is_file()}
    assert after == before


async def test_incremental_changes(upstream: FakePyPI, cfg: Config) -> None:
    populate(upstream, 4)
    await sync(cfg)
    web = cfg.mirror.directory / "web"
    removed_file = upstream.filenames("pkg-1")[0]
    removed_rel = upstream.file_path("pkg-1", removed_file).lstrip("/")
    removed_path = web / removed_rel
    assert removed_path.exists()
    upstream.add_release("pkg-0", "3.0")
    upstream.remove_file("pkg-1", removed_file)
    upstream.yank("pkg-2", "1.0", "broken build")
    upstream.remove_project("pkg-3")
    upstream.add_release("Brand_New", "0.1")
    upstream.reset_log()
    report = await sync(cfg)
    assert report.failed == {}
    assert check_tree(web) == []
    # only the new files were downloaded
    assert sorted(p.rsplit("/", 1)[-1] for p in file_gets(upstream)) == sorted(
        [f for f in upstream.filenames("pkg-0") if "3.0" in f]
        + [
            f + ".metadata"
            for f in upstream.filenames("pkg-0")
            if "3.0" in f and f.endswith(".whl")
        ]
        + upstream.filenames("brand-new")
        + [
            f + ".metadata"
            for f in upstream.filenames("brand-new")
            if f.endswith(".whl")
        ]
    )
    assert {f for f in filenames(web, "pkg-0") if "3.0" in f}
    assert removed_file not in filenames(web, "pkg-1")
    # unreferenced files are kept (grace period) and recorded for retirement
    assert removed_path.exists()
    state = State.open(Layout(cfg.mirror.directory).db)
    retired = {r[0] for r in state.db.execute("SELECT path FROM retire")}
    assert removed_rel in retired
    yanked = [f for f in page(web, "pkg-2")["files"] if "-1.0" in f["filename"]]
    assert yanked and all(f["yanked"] == "broken build" for f in yanked)
    assert 'data-yanked="broken build"' in (web / "simple/pkg-2/index.html").read_text()
    assert not (web / "simple/pkg-3").exists()
    root = json.loads((web / "simple/index.v1_json").read_bytes())
    names = {p["name"] for p in root["projects"]}
    assert "Pkg.3" not in names and "Brand_New" in names
    assert all(r.startswith("packages/") for r in retired)


async def test_stale_page_is_retried_until_fresh(
    upstream: FakePyPI, cfg: Config
) -> None:
    populate(upstream, 2)
    await sync(cfg)
    upstream.add_release("pkg-1", "9.0")
    upstream.add_fault("stale", match="/simple/pkg-1/", count=2)
    metrics = Metrics()
    report = await sync(cfg, metrics)
    assert report.failed == {}
    assert metrics.registry.get_sample_value("mirror_stale_pages_total") == 2
    pages = [r[1] for r in upstream.requests if r[1].startswith("/simple/pkg-1/")]
    assert len(pages) >= 3 and "cachebust" in pages[-1]
    assert any("9.0" in f for f in filenames(cfg.mirror.directory / "web", "pkg-1"))


async def test_stale_project_is_deferred_without_blocking_others(
    upstream: FakePyPI, tmp_path: Path
) -> None:
    cfg = make_config(upstream.url, tmp_path / "m", upstream={"stale_retries": 1})
    populate(upstream, 3)
    await sync(cfg)
    upstream.add_release("pkg-1", "9.0")
    upstream.add_release("pkg-2", "9.0")
    upstream.add_fault("stale", match="/simple/pkg-1/")
    report = await sync(cfg)
    web = cfg.mirror.directory / "web"
    assert set(report.failed) == {"pkg-1"}
    assert any("9.0" in f for f in filenames(web, "pkg-2"))
    assert not any("9.0" in f for f in filenames(web, "pkg-1"))
    assert check_tree(web) == []
    state = State.open(Layout(cfg.mirror.directory).db)
    assert [f[0] for f in state.failures()] == ["pkg-1"]
    assert state.synced_serial() < upstream.serial
    upstream.clear_faults()
    report = await sync(cfg)
    assert report.failed == {}
    assert any("9.0" in f for f in filenames(web, "pkg-1"))
    assert state.synced_serial() == upstream.serial == state.serial


async def test_failed_downloads_defer_the_project_only(
    upstream: FakePyPI, cfg: Config
) -> None:
    populate(upstream, 3)
    bad = upstream.filenames("pkg-1")[0]
    upstream.add_fault("corrupt", match=bad)
    metrics = Metrics()
    report = await sync(cfg, metrics)
    web = cfg.mirror.directory / "web"
    assert set(report.failed) == {"pkg-1"}
    assert (
        metrics.registry.get_sample_value(
            "mirror_download_errors_total", {"reason": "hash_mismatch"}
        )
        >= 2
    )
    assert not (web / "simple/pkg-1").exists()
    assert not (web / upstream.file_path("pkg-1", bad).lstrip("/")).exists()
    assert check_tree(web) == []
    upstream.clear_faults()
    assert (await sync(cfg)).failed == {}
    assert check_tree(web) == [] and filenames(web, "pkg-1") == set(
        upstream.filenames("pkg-1")
    )


async def test_interrupted_run_resumes_without_downloading_again(
    upstream: FakePyPI, cfg: Config
) -> None:
    for i in range(12):
        upstream.add_release(f"p{i}", "1.0")
    # A few files hang, so the run is cut off while they are in flight.
    upstream.add_fault("slow", match="p7", delay=5.0)
    with trio.move_on_after(1.5):
        await sync(cfg)
    web = cfg.mirror.directory / "web"
    assert check_tree(web) == []
    done_first = {
        r[1] for r in upstream.requests if r[1].startswith("/packages/") and r[2] == 200
    }
    assert done_first
    upstream.clear_faults()
    upstream.reset_log()
    report = await sync(cfg)
    assert report.failed == {}
    assert check_tree(web) == []
    again = set(file_gets(upstream)) & done_first
    assert again == set(), f"re-downloaded {again}"
    assert (
        len(json.loads((web / "simple/index.v1_json").read_bytes())["projects"]) == 12
    )


async def test_simple_feed_uses_etag_and_detects_removals(
    upstream: FakePyPI, tmp_path: Path
) -> None:
    cfg = make_config(upstream.url, tmp_path / "m", upstream={"feed": "simple"})
    populate(upstream, 3)
    await sync(cfg)
    web = cfg.mirror.directory / "web"
    assert check_tree(web) == [] and len(list((web / "simple").iterdir())) == 6
    upstream.reset_log()
    report = await sync(cfg)
    assert [r[2] for r in upstream.requests] == [304] and not report.changed
    upstream.remove_project("pkg-0")
    upstream.add_release("pkg-1", "5.0")
    report = await sync(cfg)
    assert report.projects_removed == 1 and not (web / "simple/pkg-0").exists()
    assert any("5.0" in f for f in filenames(web, "pkg-1"))
    assert check_tree(web) == []


async def test_auto_feed_falls_back_when_xmlrpc_is_gone(
    upstream: FakePyPI, tmp_path: Path
) -> None:
    cfg = make_config(
        upstream.url, tmp_path / "m", upstream={"feed": "auto", "retries": 0}
    )
    populate(upstream, 2)
    upstream.xmlrpc_enabled = False
    report = await sync(cfg)
    assert report.failed == {} and report.projects_synced == 2
    assert check_tree(cfg.mirror.directory / "web") == []


async def test_html_only_upstream(upstream: FakePyPI, cfg: Config) -> None:
    populate(upstream, 2)
    upstream.html_only = True
    report = await sync(cfg)
    web = cfg.mirror.directory / "web"
    assert report.failed == {}
    assert check_tree(web) == []
    assert filenames(web, "pkg-0") == set(upstream.filenames("pkg-0"))
    # requires-python and metadata survive the trip through HTML
    p = page(web, "pkg-1")
    assert {f["requires-python"] for f in p["files"] if "2.0rc1" in f["filename"]} == {
        ">=3.9"
    }


async def test_json_api_documents(upstream: FakePyPI, tmp_path: Path) -> None:
    cfg = make_config(upstream.url, tmp_path / "m", mirror={"json_api": True})
    populate(upstream, 2)
    await sync(cfg)
    web = cfg.mirror.directory / "web"
    doc = json.loads((web / "pypi/pkg-1/json").read_bytes())
    urls = [f["url"] for files in doc["releases"].values() for f in files]
    assert urls and all(u.startswith("../../packages/") for u in urls)
    for u in urls:
        assert (web / "pypi/pkg-1" / u).resolve().is_file()


def test_cli_exit_codes(
    upstream: FakePyPI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    populate(upstream, 2)
    conf = write_config(tmp_path / "mirror.toml", upstream.url, tmp_path / "m")
    upstream.add_fault("status", match="/simple/pkg-1/", status=503)
    assert cli.main(["sync", "--config", str(conf)]) == 1
    err = capsys.readouterr().err
    assert "1 project(s) deferred to the next run: pkg-1" in err
    upstream.clear_faults()
    textfile = tmp_path / "mirror.prom"
    assert (
        cli.main(["sync", "--config", str(conf), "--metrics-textfile", str(textfile)])
        == 0
    )
    assert "mirror_synced_serial" in textfile.read_text()
    with DirectoryLock(tmp_path / "m" / "state" / "lock"):
        capsys.readouterr()
        assert cli.main(["sync", "--config", str(conf)]) == 3
        assert f"locked by another mirror process (pid {os.getpid()})" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text(conf.read_text().replace("workers = 8", "workerz = 3"))
    assert cli.main(["sync", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s): mirror.workerz" in err and "Traceback" not in err


@pytest.mark.slow
def test_pip_installs_from_the_mirror(upstream: FakePyPI, tmp_path: Path) -> None:
    upstream.add_release("Hello-Dep", "1.0")
    upstream.add_release("hello-app", "1.0", deps=["hello-dep"])
    conf = write_config(tmp_path / "mirror.toml", upstream.url, tmp_path / "m")
    assert cli.main(["sync", "--config", str(conf)]) == 0
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = clean_pip_env()
    with static_server(tmp_path / "m" / "web") as url:
        upstream.stop()  # prove nothing comes from the upstream
        r = subprocess.run(
            [
                str(venv / "bin/pip"),
                "install",
                "--no-deps",
                "--index-url",
                f"{url}/simple/",
                "hello-app",
                "hello-dep",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout + r.stderr
    out = subprocess.run(
        [str(venv / "bin/python"), "-c", "import hello_app, hello_dep; print('ok')"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert out.stdout.strip() == "ok", out.stderr


async def test_root_is_rewritten_after_a_kill_before_the_root_step(
    upstream: FakePyPI, cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    populate(upstream, 2)
    await sync(cfg)
    web = cfg.mirror.directory / "web"
    upstream.add_release("late-comer", "1.0")

    async def killed(self: object, report: object) -> None:  # the process died here
        return None

    with monkeypatch.context() as m:
        m.setattr("mirror.sync.cycle.Syncer.publish_root", killed)
        await sync(cfg)
    root = json.loads((web / "simple/index.v1_json").read_bytes())
    assert "late-comer" not in {p["name"] for p in root["projects"]}
    # The next cycle has no upstream change, yet it must publish the root.
    report = await sync(cfg)
    assert report.root_written
    root = json.loads((web / "simple/index.v1_json").read_bytes())
    assert "late-comer" in {p["name"] for p in root["projects"]}
    assert "late-comer/" in (web / "simple/index.html").read_text()
    assert check_tree(web) == []


async def test_serial_only_change_keeps_the_html_root(upstream: FakePyPI, cfg: Config) -> None:
    populate(upstream, 2)
    await sync(cfg)
    web = cfg.mirror.directory / "web"
    html_before = (web / "simple/index.html").stat().st_mtime_ns
    upstream.add_release("pkg-1", "7.0")
    report = await sync(cfg)
    assert report.root_written
    root = json.loads((web / "simple/index.v1_json").read_bytes())
    assert {p["name"]: p["_last-serial"] for p in root["projects"]}["Pkg.1"] == upstream.project_serial("pkg-1")
    assert (web / "simple/index.html").stat().st_mtime_ns == html_before
    upstream.add_release("pkg-9", "1.0")
    await sync(cfg)
    assert "pkg-9/" in (web / "simple/index.html").read_text()
    assert (web / "simple/index.v1_html").read_bytes() == (web / "simple/index.html").read_bytes()
