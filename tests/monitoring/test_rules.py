"""The shipped PrometheusRule under promtool: it parses (as shipped and as the lab's short
variant), its unit tests (alerts.test.yaml) pass, every alert has a case where it fires and a
later evaluation where it has resolved, and each alert's cases fail when that alert's
expression is broken (so no case passes without testing its alert)."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from nodecryptor_testkit.lab import rules
from monitoring_support import promtool, run, write_yaml  # noqa: F401 (fixture)

HERE = os.path.dirname(os.path.abspath(__file__))
UNIT_TESTS = os.path.join(HERE, "alerts.test.yaml")


def _unit_test(promtool, tmp_path, rule_doc) -> tuple[int, str]:
    write_yaml(tmp_path / "nodecryptor-rules.yaml", rule_doc)
    shutil.copy(UNIT_TESTS, tmp_path / "alerts.test.yaml")
    out = run(promtool, "test", "rules", "alerts.test.yaml", cwd=tmp_path)
    return out.returncode, out.stdout + out.stderr


def test_check_rules(promtool, tmp_path):
    shipped = write_yaml(tmp_path / "shipped.yaml", rules.rule_file())
    lab = write_yaml(tmp_path / "lab.yaml", rules.lab_rule_file(hold_seconds=10, window_seconds=30))
    out = run(promtool, "check", "rules", shipped, lab)
    assert out.returncode == 0, out.stdout + out.stderr
    count = len(rules.alert_names())
    assert out.stdout.count(f"SUCCESS: {count} rules found") == 2, out.stdout


def test_check_rules_rejects_a_broken_expression(promtool, tmp_path):
    """The check is not a no-op: a syntax error fails it."""
    doc = rules.rule_file()
    doc["groups"][0]["rules"][0]["expr"] = "nodecryptor_ready =="
    out = run(promtool, "check", "rules", write_yaml(tmp_path / "bad.yaml", doc))
    assert out.returncode != 0


def test_alert_unit_tests_pass(promtool, tmp_path):
    code, output = _unit_test(promtool, tmp_path, rules.rule_file())
    assert code == 0, output


def _cases() -> dict[str, dict[str, list]]:
    """{alert: {"fires": [(test index, eval seconds)], "clear": [...]}} from the unit tests."""
    with open(UNIT_TESTS) as f:
        doc = yaml.safe_load(f)
    out: dict[str, dict[str, list]] = {}
    for index, test in enumerate(doc["tests"]):
        for case in test.get("alert_rule_test", []):
            kind = "fires" if case.get("exp_alerts") else "clear"
            entry = out.setdefault(case["alertname"], {"fires": [], "clear": []})
            entry[kind].append((index, rules.seconds(case["eval_time"])))
    return out


def test_every_alert_fires_and_resolves():
    cases = _cases()
    for alert in rules.alert_names():
        assert alert in cases, f"{alert} has no unit test"
        fires = cases[alert]["fires"]
        assert fires, f"{alert} never fires in the unit tests"
        resolved = [
            (i, t) for i, t in cases[alert]["clear"] if any(fi == i and ft < t for fi, ft in fires)
        ]
        assert resolved, f"{alert} is never seen resolved after firing"
    assert not set(cases) - set(rules.alert_names()), "unit tests of alerts that do not exist"


@pytest.mark.parametrize("alert", rules.alert_names())
def test_breaking_an_alert_fails_its_unit_tests(promtool, tmp_path, alert):
    doc = rules.rule_file()
    for group in doc["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = "vector(0) > 1"  # never fires
    code, output = _unit_test(promtool, tmp_path, doc)
    assert code != 0, f"the unit tests still pass with {alert} broken"
    assert alert in output, output
