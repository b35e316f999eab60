"""``[upstream] download_mirror``: files come from a nearby mirror with the
same ``/packages/`` layout, held to upstream's sha256; upstream serves what
the mirror lacks or has wrong, unless ``download_mirror_only``."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirror import cli
from mirror.errors import ConfigError
from mirror.metrics import Metrics
from tests.harness.consistency import check_tree
from tests.harness.e2e import make_config, static_server
from tests.harness.fakepypi import FakePyPI
from tests.harness.reliability import tree_files, upstream_files

pytestmark = pytest.mark.slow


def file_requests(up: FakePyPI) -> list[str]:
    return [t for _, t, status, _ in up.requests if t.startswith("/packages/") and status == 200]


def sample(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


async def test_files_come_from_the_download_mirror_and_fall_back(upstream: FakePyPI, tmp_path: Path) -> None:
    for n in range(3):
        upstream.add_release(f"near-{n}", "1.0")
    nearby = tmp_path / "nearby"
    await cli.run_sync(make_config(upstream.url, nearby), metrics=Metrics())
    with static_server(nearby / "web") as near_url:
        # Files the nearby mirror lacks, and one it holds with other bytes.
        upstream.add_release("near-0", "2.0")
        web = nearby / "web"
        have = sorted(rel for rel in tree_files(web) if not rel.endswith(".metadata"))
        (web / have[0]).unlink()
        data = (web / have[1]).read_bytes()
        (web / have[1]).write_bytes(bytes(b ^ 0xFF for b in data))  # same size, other bytes
        upstream.reset_log()
        m, metrics = tmp_path / "m", Metrics()
        cfg = make_config(upstream.url, m, upstream={"download_mirror": near_url + "/"})
        report = await cli.run_sync(cfg, metrics=metrics)
        assert not report.failed
        want = upstream_files(upstream)
        got = tree_files(m / "web")
        assert set(got) == set(want) and all(got[r].read_bytes() == want[r] for r in want)
        assert check_tree(m / "web") == []
        # Upstream served only what the nearby mirror could not.
        fetched = {t.lstrip("/") for t in file_requests(upstream)}
        missing_upstream = {r for r in want if r.startswith("packages/") and "near_0-2.0" in r}
        assert fetched == {have[0], have[1]} | missing_upstream, fetched
        assert sample(metrics, "mirror_files_by_source_total", source="upstream") == len(fetched)
        assert sample(metrics, "mirror_files_by_source_total", source="download_mirror") == len(want) - len(fetched)
        assert sample(metrics, "mirror_download_mirror_misses_total", reason="hash_mismatch") == 1
        assert sample(metrics, "mirror_download_mirror_misses_total", reason="http_status") == len(fetched) - 1


async def test_download_mirror_only_never_falls_back(upstream: FakePyPI, tmp_path: Path) -> None:
    upstream.add_release("only-0", "1.0")
    upstream.add_release("only-1", "1.0")
    nearby = tmp_path / "nearby"
    await cli.run_sync(make_config(upstream.url, nearby), metrics=Metrics())
    gone = next(r for r in tree_files(nearby / "web") if "only_1" in r and not r.endswith(".metadata"))
    (nearby / "web" / gone).unlink()
    with static_server(nearby / "web") as near_url:
        upstream.reset_log()
        m = tmp_path / "m"
        cfg = make_config(upstream.url, m, upstream={"download_mirror": near_url, "download_mirror_only": True,
                                                     "retries": 1})
        report = await cli.run_sync(cfg, metrics=Metrics())
    assert list(report.failed) == ["only-1"]
    assert file_requests(upstream) == []
    assert check_tree(m / "web") == []


def test_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="download_mirror"):
        make_config("https://up.test", tmp_path / "m", upstream={"download_mirror": "ftp://x"})
    with pytest.raises(ConfigError, match="allow_http"):
        make_config("https://up.test", tmp_path / "m", upstream={"allow_http": False, "download_mirror": "http://x"})
    with pytest.raises(ConfigError, match="needs upstream.download_mirror"):
        make_config("https://up.test", tmp_path / "m", upstream={"download_mirror_only": True})
