"""monitoring/: Prometheus config and alert rules through promtool (check config, check rules,
test rules), the Grafana dashboard's PromQL through promtool, its freshness and layout, and the
Grafana provisioning. Runs no Prometheus or Grafana server."""
from __future__ import annotations

import json
import re
import runpy

import yaml

from deploy_helpers import COMPOSE, DASHBOARD, REPO, RULES, dashboard_exprs, require_tool, run

ALERTS = {"OPDTeacherDown", "OPDTeacherNotReady", "OPDScoreLatencyP99High", "OPDTeacherErrorRate",
          "OPDTeacherReplicasDisagree", "OPDTeacherReplicaIdentityMismatch",
          "OPDScorersDown", "OPDQueueBacklogGrowing", "OPDDeadLetters"}


def test_promtool_check_config_loads_the_rules():
    promtool = require_tool("promtool")
    proc = run([promtool, "check", "config", "monitoring/prometheus.yml"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # rule_files are relative to the config: the check must have found and parsed them
    assert f"SUCCESS: {len(ALERTS)} rules found" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_promtool_check_rules():
    promtool = require_tool("promtool")
    proc = run([promtool, "check", "rules", str(RULES)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_unit_tests_pass():
    promtool = require_tool("promtool")
    tests = sorted(str(p) for p in (REPO / "monitoring" / "tests").glob("*.yml"))
    assert tests, "no promtool unit tests under monitoring/tests"
    proc = run([promtool, "test", "rules", *tests])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr


def test_promtool_unit_tests_can_fail(tmp_path):
    """A rule changed under the tests must make `promtool test rules` fail."""
    promtool = require_tool("promtool")
    broken = RULES.read_text().replace("> 2.5", "> 25")
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "opd-alerts.yml").write_text(broken)
    (tmp_path / "tests").mkdir()
    test_file = tmp_path / "tests" / "t.yml"
    test_file.write_text((REPO / "monitoring" / "tests" / "opd-alerts.test.yml").read_text())
    proc = run([promtool, "test", "rules", str(test_file)])
    assert proc.returncode != 0 and "OPDScoreLatencyP99High" in proc.stdout + proc.stderr


def test_every_alert_has_firing_and_quiet_cases():
    rules = yaml.safe_load(RULES.read_text())
    assert {r["alert"] for g in rules["groups"] for r in g["rules"]} == ALERTS
    fired, quiet = set(), set()
    for path in (REPO / "monitoring" / "tests").glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                (fired if t["exp_alerts"] else quiet).add(t["alertname"])
    assert fired == ALERTS, f"alerts never expected to fire in a test: {ALERTS - fired}"
    assert quiet == ALERTS, f"alerts never tested for staying quiet: {ALERTS - quiet}"


def test_every_alert_says_what_to_do():
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for r in group["rules"]:
            assert r["labels"]["severity"] in {"critical", "warning"}, r["alert"]
            assert {"summary", "description"} <= set(r["annotations"]), r["alert"]


def _grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$experiment", ".*")


def test_dashboard_promql_parses(tmp_path):
    """Each panel query as a recording rule: promtool parses the PromQL."""
    promtool = require_tool("promtool")
    exprs = [e for e in dashboard_exprs() if not e.startswith("label_values(")]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": _grafana_to_promql(e)} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = run([promtool, "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_json_is_generated_and_fresh():
    gen = runpy.run_path(str(REPO / "monitoring" / "grafana" / "dashboard.py"))
    assert gen["render"]() == DASHBOARD.read_text(), "run `python monitoring/grafana/dashboard.py` and commit"


def test_dashboard_layout_and_datasource():
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    cells = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        assert g["x"] + g["w"] <= 24
        cells |= mine
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
    titles = " | ".join(p["title"].lower() for p in panels)
    for need in ("scored tokens/s per experiment", "latency", "batch fill", "padding", "backlog per experiment",
                 "pending per experiment", "dead letters", "trainer loss", "reverse kl"):
        assert need in titles, f"dashboard lacks a panel for {need!r}"


def test_grafana_provisioning_matches_dashboard_and_compose():
    prov = REPO / "monitoring" / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    dash = json.loads(DASHBOARD.read_text())
    ds_var = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")
    assert ds_var["current"]["value"] == ds["uid"] and ds["type"] == ds_var["query"] == "prometheus"
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in grafana["volumes"] if v.startswith("./"))
    provider = yaml.safe_load((prov / "dashboards" / "opd.yml").read_text())["providers"][0]
    assert mounts["./monitoring/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./monitoring/grafana/provisioning"] == "/etc/grafana/provisioning"
    assert re.match(r"https?://prometheus:9090$", ds["url"])
