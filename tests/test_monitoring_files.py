"""The monitoring the chart ships: the alerting rules (helm/headwater/files/alerts.yaml) pass
``promtool check rules`` and their unit tests (tests/promtool/alerts_test.yaml, a firing and a quiet
case for each alert); the Grafana dashboard (helm/headwater/files/dashboard.json) is valid JSON with
the panels operators need; and every metric either of them names is one the node exports
(``headwater.node.metrics.EXPORTED``, which test_metrics_exposition checks against a real scrape).
The README's Monitoring section lists every exported metric and every alert.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from headwater.node.metrics import EXPORTED

ROOT = Path(__file__).resolve().parent.parent
FILES = ROOT / "helm" / "headwater" / "files"
ALERTS = FILES / "alerts.yaml"
ALERT_TESTS = ROOT / "tests" / "promtool" / "alerts_test.yaml"
DASHBOARD = FILES / "dashboard.json"
# Series a histogram exposes besides its family name.
_HISTOGRAM_SERIES = ("_bucket", "_count", "_sum")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool")
    assert found, "promtool is missing: apt-get install prometheus"
    return subprocess.run([found, *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression reads, histogram series mapped to their family."""
    names = set(re.findall(r"\b((?:headwater|process)_[a-z_]+)\b", expr))
    out = set()
    for name in names:
        for suffix in _HISTOGRAM_SERIES:
            family = name.removesuffix(suffix)
            if family != name and EXPORTED.get(family) == "histogram":
                name = family
        out.add(name)
    return out


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_alerting_rules_pass_promtool_check_and_their_unit_tests() -> None:
    check = promtool("check", "rules", str(ALERTS))
    assert check.returncode == 0, f"promtool check rules:\n{check.stdout}{check.stderr}"
    tested = promtool("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, f"promtool test rules:\n{tested.stdout}{tested.stderr}"


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    tests = ALERT_TESTS.read_text()
    for rule in alert_rules():
        name = rule["alert"]
        cases = re.findall(rf"alertname: {name}\n\s+exp_alerts:(.*)", tests)
        assert any(c.strip() == "[]" for c in cases), f"{name}: no case where it stays quiet"
        assert any(c.strip() == "" for c in cases), f"{name}: no case where it fires"


def test_the_alerts_cover_what_operators_must_hear_about() -> None:
    alerts = {r["alert"] for r in alert_rules()}
    assert {
        "HeadwaterUnderReplicatedPartitions",
        "HeadwaterOfflinePartitions",
        "HeadwaterNoActiveController",
        "HeadwaterManyActiveControllers",
        "HeadwaterFencedNodes",
        "HeadwaterDiskNearlyFull",
    } <= alerts


def test_the_alerts_and_the_dashboard_read_only_metrics_the_node_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [r["expr"] for r in alert_rules()] + dashboard_exprs(dashboard)
    assert exprs and all(exprs)
    used = set().union(*map(metric_names, exprs))
    unknown = used - set(EXPORTED)
    assert not unknown, f"not exported by a node: {sorted(unknown)}"


def test_the_dashboard_has_a_panel_for_each_thing_operators_watch() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["targets"] and p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
    used = set().union(*(metric_names(t["expr"]) for p in panels for t in p["targets"]))
    assert {
        "headwater_requests_total",
        "headwater_partition_errors_total",
        "headwater_request_duration_seconds",
        "headwater_bytes_in_total",
        "headwater_bytes_out_total",
        "headwater_records_in_total",
        "headwater_records_out_total",
        "headwater_under_replicated_partitions",
        "headwater_under_min_isr_partitions",
        "headwater_offline_partitions",
        "headwater_isr_shrinks_total",
        "headwater_isr_expands_total",
        "headwater_active_controller",
        "headwater_metadata_offset",
        "headwater_raft_commit_index",
        "headwater_fenced_nodes",
        "headwater_node_fenced",
        "headwater_rocksdb_live_sst_bytes",
        "headwater_rocksdb_pending_compaction_bytes",
        "process_resident_memory_bytes",
        "headwater_data_dir_free_bytes",
    } <= used
    p99 = [t["expr"] for p in panels for t in p["targets"] if "histogram_quantile(0.99" in t["expr"]]
    assert any("headwater_request_duration_seconds_bucket" in e and "by (rpc, le)" in e for e in p99)


def test_the_readme_lists_every_metric_and_alert() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Monitoring") :]
    section = section[: section.find("\n## ", 1)] if "\n## " in section[1:] else section
    for name in EXPORTED:
        assert f"`{name}`" in section, f"the README's Monitoring section does not list {name}"
    for alert in (rule["alert"] for rule in alert_rules()):
        assert f"`{alert}`" in section, f"the README's Monitoring section does not list {alert}"
