"""The Grafana dashboard: the committed dashboard.json and its ConfigMap are what the
generator (nodecryptor_testkit.dashboard) builds, every query parses (promtool), every
metric a query names is one a running agent exports, and every query is per node."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from monitoring_support import ScrapedAgent, check_expressions, promtool  # noqa: F401
from nodecryptor_testkit import dashboard

# Grafana's own macros and the dashboard's variables, replaced by values PromQL accepts.
GRAFANA_SUBSTITUTES = {"$__rate_interval": "5m", "$node": ".*"}
METRIC = re.compile(r"\bnodecryptor_[a-z0-9_]+")


def promql(expr: str) -> str:
    for macro, value in GRAFANA_SUBSTITUTES.items():
        expr = expr.replace(macro, value)
    m = re.fullmatch(r"label_values\((.+), *[a-z_]+\)", expr)
    return m.group(1) if m else expr  # a variable query names a selector and a label


@pytest.fixture(scope="module")
def model() -> dict:
    return dashboard.build()


def test_committed_files_match_the_generator():
    assert dashboard.main(["--check"]) == 0, "run python -m nodecryptor_testkit.dashboard"


def test_configmap_carries_the_dashboard_for_the_sidecar(model):
    with open(dashboard.CONFIGMAP_YAML) as f:
        cm = yaml.safe_load(f)
    assert cm["kind"] == "ConfigMap"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["nodecryptor.json"]) == model
    with open(dashboard.DASHBOARD_JSON) as f:
        assert json.load(f) == model


def test_every_query_parses(model, promtool, tmp_path):
    exprs = {e: promql(e) for e in dashboard.expressions(model)}
    assert len(exprs) >= 10
    out = check_expressions(promtool, tmp_path, exprs)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_broken_query_is_caught(promtool, tmp_path):
    out = check_expressions(promtool, tmp_path, {"x": "sum by (node) (rate(nodecryptor_ready[5m]"})
    assert out.returncode != 0


def test_queries_name_only_exported_metrics(model, tmp_path):
    agent = ScrapedAgent(tmp_path)
    try:
        text = agent.wait_nodes(2)
    finally:
        agent.close()
    exported = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            exported.add(name)
            if kind == "histogram":
                exported.update(f"{name}_{s}" for s in ("bucket", "sum", "count"))
        elif line and not line.startswith("#"):
            exported.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    named = {m for e in dashboard.expressions(model) for m in METRIC.findall(e)}
    assert named, "no nodecryptor metric in the dashboard"
    assert named <= exported, f"not exported by the agent: {sorted(named - exported)}"


def test_every_panel_query_is_per_node(model):
    targets = [t for p in model["panels"] for t in p.get("targets", [])]
    assert targets
    for t in targets:
        assert 'node=~"$node"' in t["expr"], t["expr"]
        assert "{{node}}" in t["legendFormat"], t
