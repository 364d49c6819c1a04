"""The shipped PrometheusRule as a plain Prometheus rule file: as is (for promtool) or as a
lab variant whose `for:` holds and range windows are shortened, so alerts fire and resolve in
seconds against a lab that runs for minutes. The expressions are otherwise the shipped ones."""

from __future__ import annotations

import copy
import os
import re

import yaml

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMETHEUS_RULE = os.path.join(SOURCE_ROOT, "k8s", "optional", "monitoring", "prometheusrule.yaml")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"^(\d+)([smhd])$")
_WINDOW = re.compile(r"\[(\d+)([smhd])\]")


def seconds(duration: str) -> int:
    """A single-unit Prometheus duration ("5m") in seconds."""
    m = _DURATION.match(duration)
    if not m:
        raise ValueError(f"duration {duration!r}: expected a number and one of s, m, h, d")
    return int(m.group(1)) * _UNITS[m.group(2)]


def rule_file(path: str = PROMETHEUS_RULE) -> dict:
    """``{"groups": [...]}`` from the PrometheusRule's spec."""
    with open(path) as f:
        doc = yaml.safe_load(f)
    if doc.get("kind") != "PrometheusRule":
        raise ValueError(f"{path}: kind {doc.get('kind')!r}, expected PrometheusRule")
    return {"groups": doc["spec"]["groups"]}


def lab_rule_file(hold_seconds: int, window_seconds: int, path: str = PROMETHEUS_RULE) -> dict:
    """The rule file with every `for:` at most ``hold_seconds`` and every range window
    ("[5m]") at most ``window_seconds``."""
    out = copy.deepcopy(rule_file(path))

    def shorter(m: re.Match) -> str:
        return f"[{min(int(m.group(1)) * _UNITS[m.group(2)], window_seconds)}s]"

    for group in out["groups"]:
        for rule in group["rules"]:
            rule["expr"] = _WINDOW.sub(shorter, str(rule["expr"]))
            if "for" in rule:
                rule["for"] = f"{min(seconds(rule['for']), hold_seconds)}s"
    return out


def alert_names(path: str = PROMETHEUS_RULE) -> list[str]:
    return [
        rule["alert"]
        for group in rule_file(path)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]
