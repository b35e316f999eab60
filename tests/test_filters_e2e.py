"""End-to-end: filters decide what is mirrored, and a filter change is replayed
from the state (no upstream re-read) with retirement of what is now excluded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mirror import cli
from mirror.config import Config
from mirror.metrics import Metrics
from mirror.publish.state import State
from mirror.layout import Layout
from tests.harness.consistency import check_tree
from tests.harness.e2e import make_config, write_config
from tests.harness.fakepypi import FakePyPI, make_wheel


def corpus(up: FakePyPI) -> None:
    for name in ("keep-me", "other", "dropme"):
        up.add_release(name, "1.0")
        up.add_release(name, "2.0b1")
        up.add_release(name, "2.0")
    up.add_file("keep-me", "2.0", make_wheel("keep-me", "2.0", tag="cp38-cp38-win_amd64"))


def files(web: Path, name: str) -> set[str]:
    return {f["filename"] for f in json.loads((web / "simple" / name / "index.v1_json").read_bytes())["files"]}


def root_names(web: Path) -> set[str]:
    return {p["name"] for p in json.loads((web / "simple/index.v1_json").read_bytes())["projects"]}


async def sync(cfg: Config) -> cli.CycleReport:
    return await cli.run_sync(cfg, metrics=Metrics())


async def test_filters_then_filter_change(upstream: FakePyPI, tmp_path: Path) -> None:
    corpus(upstream)
    directory = tmp_path / "m"
    web = directory / "web"
    cfg = make_config(upstream.url, directory, filters={
        "allow": ["keep-me", "other<2"], "prereleases": False, "exclude_platforms": ["win*"],
    })
    report = await sync(cfg)
    assert report.failed == {}
    assert check_tree(web) == []
    assert root_names(web) == {"keep-me", "other"}
    assert not (web / "simple/dropme").exists()
    # excluded projects were never asked for
    assert not upstream.requests_matching("/simple/dropme/")
    assert files(web, "keep-me") == {f for f in upstream.filenames("keep-me") if "b1" not in f and "win" not in f}
    assert files(web, "other") == {f for f in upstream.filenames("other") if "-1.0" in f}
    win = next(f for f in upstream.filenames("keep-me") if "win_amd64" in f)
    assert not upstream.requests_matching(win)

    # Change the filters: drop "other", allow "dropme", accept pre-releases.
    upstream.reset_log()
    cfg2 = make_config(upstream.url, directory, filters={
        "allow": ["keep-me", "dropme"], "exclude_platforms": ["win*"],
    })
    report = await sync(cfg2)
    assert report.failed == {}
    assert check_tree(web) == []
    assert root_names(web) == {"keep-me", "dropme"}
    assert not (web / "simple/other").exists()
    assert any("b1" in f for f in files(web, "keep-me"))
    # keep-me was replayed from the stored snapshot: only its new files were fetched
    assert not upstream.requests_matching("/simple/keep-me/")
    assert upstream.requests_matching("/simple/dropme/")
    # what "other" had is up for retirement (not deleted yet)
    state = State.open(Layout(directory).db)
    retired = {r[0] for r in state.db.execute("SELECT path FROM retire")}
    other_paths = {upstream.file_path("other", f).lstrip("/") for f in upstream.filenames("other") if "-1.0" in f}
    assert other_paths <= retired
    assert all((web / p).exists() for p in other_paths)
    # a third run with the same filters does nothing
    upstream.reset_log()
    report = await sync(cfg2)
    assert not report.changed and [r[1] for r in upstream.requests] == ["/pypi"]


def test_filters_explain(upstream: FakePyPI, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus(upstream)
    (tmp_path / "requirements.txt").write_text("# what our CI needs\nkeep-me  # the app\n\n")
    conf = write_config(tmp_path / "mirror.toml", upstream.url, tmp_path / "m",
                        filters={"allow_from": "requirements.txt", "exclude_platforms": ["win*"],
                                 "prereleases": False})
    assert cli.main(["sync", "--config", str(conf)]) == 0
    capsys.readouterr()
    assert cli.main(["filters", "--config", str(conf), "--explain", "Keep_Me", "dropme"]) == 0
    out = capsys.readouterr().out
    assert "keep-me: allowed by the filters; published" in out
    assert "excluded  keep_me-2.0-cp38-cp38-win_amd64.whl" in out
    assert "excluded  keep_me-2.0b1" in out
    assert "dropme: excluded (not in filters.allow); not published" in out


def test_bad_filters_fail_at_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for table, key in [
        ({"allow": ["django>=>4"]}, "filters.allow"),
        ({"exclude_platforms": ["windows*"]}, "filters.exclude_platforms"),
        ({"allow_from": "missing.txt"}, "filters.allow_from"),
        ({"max_file_size": "lots"}, "filters.max_file_size"),
    ]:
        p = tmp_path / "bad.toml"
        body = '[upstream]\nurl = "http://127.0.0.1:9"\nallow_http = true\nuser_agent = "t (a@b.c)"\n'
        body += '[mirror]\ndirectory = "m"\n[filters]\n'
        for k, v in table.items():
            body += f"{k} = {json.dumps(v)}\n"
        p.write_text(body)
        assert cli.main(["sync", "--config", str(p)]) == 2, table
        err = capsys.readouterr().err
        assert key in err and str(p) in err and "Traceback" not in err, err
