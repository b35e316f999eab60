"""The shipped alert rules and Grafana dashboard query what `mirror` really exports.

* ``promtool check rules`` and ``promtool test rules`` on the alert file.
* Every PromQL expression in the dashboard and the alerts is parsed by
  promtool (as a recording rule), and every metric name in it must appear in
  a real scrape: a ``mirror sync`` cycle populates a ``Metrics`` registry and
  prometheus_client's own exporter serves it over HTTP, as the daemon does.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from mirror import cli
from mirror.metrics import Metrics
from tests.harness.e2e import make_config
from tests.harness.fakepypi import FakePyPI

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "conf" / "prometheus-alerts.yml"
ALERT_TESTS = REPO / "tests" / "prometheus" / "alerts_test.yml"
DASHBOARD = REPO / "conf" / "grafana-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")

# What an operator must see on the dashboard, per the brief: serial lag,
# time since last success, download throughput, errors by reason, pending
# projects, tree size.
REQUIRED_ON_DASHBOARD = {
    "mirror_serial_lag",
    "mirror_last_success_timestamp_seconds",
    "mirror_bytes_downloaded_total",
    "mirror_download_errors_total",
    "mirror_projects_pending",
    "mirror_tree_bytes",
}

# PromQL words that look like identifiers but are not metric names.
_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?")
_GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}
_LABEL_VALUES = re.compile(r"^label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*\w+\s*\)$")


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (syntax is promtool's job)."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # range and subquery durations
    s = _GROUPING.sub("", s)  # label lists of by/without/on/...
    s = re.sub(r"\boffset\s+\S+", "", s)
    names = set()
    for m in _IDENT.finditer(s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue  # function / aggregation, or a keyword
        names.add(word)
    return names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (reason) (rate(mirror_download_errors_total{instance=~"$instance"}[5m]))',
         {"mirror_download_errors_total"}),
        ("time() - max(mirror_last_success_timestamp_seconds)", {"mirror_last_success_timestamp_seconds"}),
        ('a_total{x="by(b)"} / on (instance) group_left (version) mirror_info offset 5m',
         {"a_total", "mirror_info"}),
        ("histogram_quantile(0.9, sum by (le) (rate(x_bucket[5m]))) > bool 1e3", {"x_bucket"}),
        ("absent(mirror_up) unless y:recorded", {"mirror_up", "y:recorded"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expr) for every panel target, in rows too, plus variable queries."""
    out: list[tuple[str, str]] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for p in items:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
            panels(p.get("panels", []))

    panels(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']}", q))
    return out


def alert_queries() -> list[tuple[str, str]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [
        (f"alert {rule['alert']}", rule["expr"])
        for group in doc["groups"] for rule in group["rules"]
    ]


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


@needs_promtool
def test_promtool_check_rules() -> None:
    r = _promtool("check", "rules", str(ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 9 rules found" in r.stdout
    names = {w for w, _ in alert_queries()}
    assert {"alert MirrorStale", "alert MirrorSyncFailing", "alert MirrorHashMismatches",
            "alert MirrorDiskErrors", "alert MirrorRetirementBlocked", "alert MirrorUploadErrors",
            "alert MirrorUploadCorruption"} <= names
    assert len(alert_queries()) == 9


@needs_promtool
def test_promtool_alert_unit_tests() -> None:
    r = _promtool("test", "rules", str(ALERT_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@needs_promtool
def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    queries = [
        (where, expr) for where, expr in dashboard_queries(json.loads(DASHBOARD.read_text()))
        if not _LABEL_VALUES.match(expr)
    ]
    assert len(queries) >= 20
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for n, (_where, expr) in enumerate(queries):
        for var, value in _GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules += [f"      - record: dashboard:query_{n}", f"        expr: {json.dumps(expr)}"]
    f = tmp_path / "dashboard-rules.yml"
    f.write_text("\n".join(rules) + "\n")
    r = _promtool("check", "rules", str(f))
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_shape() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
    used = set().union(*(metric_names(e) for _w, e in dashboard_queries(dash)))
    assert REQUIRED_ON_DASHBOARD <= used, REQUIRED_ON_DASHBOARD - used


async def scrape_after_sync(tmp_path: Path) -> str:
    """A real cycle fills a Metrics registry; the prometheus_client exporter serves it."""
    metrics = Metrics()
    with FakePyPI(seed=0) as up:
        for i in range(3):
            up.add_release(f"proj-{i}", "1.0")
        cfg = make_config(up.url, tmp_path / "m")
        report = await cli.run_sync(cfg, metrics=metrics)
    assert report.failed == {} and report.files_downloaded > 0
    server, thread = start_http_server(0, addr="127.0.0.1", registry=metrics.registry)
    try:
        port = server.server_address[1]
        r = await trio.to_thread.run_sync(lambda: httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10))
        assert r.status_code == 200
        return r.text
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


async def test_dashboard_and_alerts_only_use_exported_metrics(tmp_path: Path) -> None:
    text = await scrape_after_sync(tmp_path)
    samples = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    # The scrape is of a populated registry, not an empty one.
    assert samples["mirror_tree_files"] > 0 and samples["mirror_files_downloaded_total"] > 0
    queries = dashboard_queries(json.loads(DASHBOARD.read_text())) + alert_queries()
    missing = []
    for where, expr in queries:
        if m := _LABEL_VALUES.match(expr):
            names = {m[1]}
        else:
            names = metric_names(expr)
            assert names or expr.startswith("vector("), f"{where}: no metric in {expr}"
        missing += [f"{where}: {n}" for n in sorted(names) if n not in samples]
    assert missing == [], f"queried but not exported: {missing}"
