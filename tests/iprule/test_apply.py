"""Reconcile behaviour of IpRuleDatapath in a namespace: exact rules and routes, idempotence,
updates, fail modes, the noop route, and foreign rules/routes left untouched throughout."""

from __future__ import annotations

import dataclasses

import pytest

from nodecryptor.datapath.iprule import inspect
from nodecryptor.datapath.iprule.backend import IpRuleDatapath
from nodecryptor.datapath.iprule.noop import NOOP_ADDRESS
from tests.datapath_cases import CASES_BY_ID, desired_for, settings_for

from .conftest import ip_routes, ip_rules, sh, snapshot_routes

pytestmark = pytest.mark.privileged

W1_RULES = [
    "10300:\tfrom all fwmark 0xe00/0xf00 lookup main",
    "10305:\tfrom all ipproto udp sport 51871 dport 51871 lookup main",
    "10310:\tfrom all to 192.168.50.10 ipproto tcp dport 2379-2380 lookup main",
    "10310:\tfrom all to 192.168.50.10 ipproto tcp dport 6443 lookup main",
    # The "storage" EncryptionExemption (tests/datapath_cases.py): w2 serves TCP 3260.
    "10310:\tfrom all to 192.168.50.22 ipproto tcp dport 3260 lookup main",
    # Cilium's own pod-to-pod traffic (nodecryptor/policy/cilium.py): pods reach remote node
    # addresses (host routes) through the table, everything else through main.
    "10330:\tfrom 10.244.1.0/24 lookup 2026 suppress_prefixlength 31",
    "10331:\tfrom 10.244.1.0/24 lookup main",
    "10390:\tfrom all lookup 2026",
    "10391:\tfrom all lookup 2027",
    "10300:\tfrom all fwmark 0xe00/0xf00 lookup main",
    "10305:\tfrom all ipproto udp sport 51871 dport 51871 lookup main",
    "10310:\tfrom all to fd00:50::10 ipproto tcp dport 2379-2380 lookup main",
    "10310:\tfrom all to fd00:50::10 ipproto tcp dport 6443 lookup main",
    "10310:\tfrom all to fd00:50::22 ipproto tcp dport 3260 lookup main",
    "10330:\tfrom fd00:244:1::/64 lookup 2026 suppress_prefixlength 127",
    "10331:\tfrom fd00:244:1::/64 lookup main",
    "10390:\tfrom all lookup 2026",
    "10391:\tfrom all lookup 2027",
]


def nc_routes(ns: str) -> list[str]:
    """Both of nodecryptor's tables: its own (2026) and the pod CIDRs' guards (2027)."""
    return ip_routes(ns, "2026") + ip_routes(ns, "2027")


def band_rules(ns: str) -> list[str]:
    return [
        r
        for r in ip_rules(ns)
        if r.split(":")[0].isdigit() and 10300 <= int(r.split(":")[0]) <= 10399
    ]


def test_worker_rules_routes_and_idempotence(node_ns, foreign_state):
    ns, wg = node_ns("w1")
    foreign_rules, foreign_routes = foreign_state(ns)
    case = CASES_BY_ID["v4-node-to-remote-node"]
    settings = settings_for(case)
    datapath = IpRuleDatapath(settings, netns=ns).start()
    try:
        datapath.apply(desired_for(case, wg))
        assert band_rules(ns) == W1_RULES
        routes = nc_routes(ns)
        # Each destination through WireGuard, with a fail-closed guard under it.
        assert len(routes) == 16
        assert "192.168.50.22 dev cilium_wg0 proto static src 192.168.50.21 metric 100" in routes
        assert "unreachable 192.168.50.22 proto static metric 200" in routes
        assert "10.244.0.0/24 dev cilium_wg0 proto static src 192.168.50.21 metric 100" in routes
        assert any(
            r.startswith("fd00:244:2::/64 dev cilium_wg0 proto static src fd00:50::21")
            for r in routes
        )
        # Idempotent: a second apply changes nothing.
        datapath.apply(desired_for(case, wg))
        assert datapath.last_apply["rules_added"] == 0
        assert datapath.last_apply["routes_set"] == 0
        assert datapath.last_apply["routes_removed"] == 0
        obs = datapath.observe()
        assert obs.ready and obs.attached
        assert obs.details["rules"] == 18 and obs.details["routes"] == 16
        # The pod CIDRs' guards sit in the guard table, out of the pods' rule's way.
        assert "unreachable 10.244.2.0/24 proto static metric 200" in ip_routes(ns, "2027")
        assert "unreachable 192.168.50.22 proto static metric 200" in ip_routes(ns, "2026")
        # Foreign rules and routes are still there, unchanged.
        assert [r for r in ip_rules(ns) if r not in band_rules(ns)] == [
            r for r in foreign_rules if r not in W1_RULES
        ]
        assert snapshot_routes(ns) == foreign_routes
    finally:
        datapath.close()
    result = inspect.cleanup(settings, netns=ns)
    assert result["rules_removed"] == 18 and result["routes_removed"] == 16
    assert band_rules(ns) == []
    assert nc_routes(ns) == []
    assert ip_rules(ns) == [r for r in foreign_rules if r not in W1_RULES]
    assert snapshot_routes(ns) == foreign_routes
    assert not inspect.active(settings, netns=ns)


def test_update_fail_modes_and_control_plane_replies(node_ns, foreign_state):
    ns, wg = node_ns("cp1")
    foreign_rules, foreign_routes = foreign_state(ns)
    case = CASES_BY_ID["v4-cp-to-worker"]
    settings = settings_for(case)
    datapath = IpRuleDatapath(settings, netns=ns).start()
    try:
        desired = desired_for(case, wg)
        datapath.apply(desired)
        rules = band_rules(ns)
        # A control-plane node: exempt replies by source address (never "iif lo").
        assert "10320:\tfrom 192.168.50.10 ipproto tcp sport 6443 lookup main" in rules
        assert "10320:\tfrom fd00:50::10 ipproto tcp sport 2379-2380 lookup main" in rules
        assert not any("iif" in r for r in rules)
        # No other control-plane node: no dport exemptions at all.
        assert not any(r.startswith("10310:") for r in rules)
        assert len(nc_routes(ns)) == 16

        # WireGuard down, fail closed: the same prefixes become unreachable.
        down = dataclasses.replace(desired, wg=dataclasses.replace(desired.wg, up=False))
        datapath.apply(down)
        routes = nc_routes(ns)
        assert len(routes) == 8 and all(r.startswith("unreachable ") for r in routes)
        datapath.apply(down)
        assert datapath.last_apply["routes_set"] == 0  # reject routes compare equal too
        assert band_rules(ns) == rules  # exemptions still pass

        # Fail open: nothing in the table, traffic falls through to main.
        datapath.apply(dataclasses.replace(down, fail_mode="open"))
        assert nc_routes(ns) == []
        # Fail open with WireGuard up: WireGuard routes only, no guards.
        datapath.apply(dataclasses.replace(desired, fail_mode="open"))
        routes = nc_routes(ns)
        assert len(routes) == 8 and not any(r.startswith("unreachable") for r in routes)

        # One destination uncovered, fail closed: only that one is unreachable.
        uncovered = next(d.prefix for d in desired.destinations if str(d.prefix) == "10.244.2.0/24")
        datapath.apply(dataclasses.replace(desired, uncovered=frozenset({uncovered})))
        routes = nc_routes(ns)
        assert "unreachable 10.244.2.0/24 proto static metric 200" in routes
        assert not any(r.startswith("10.244.2.0/24 dev") for r in routes)
        assert len(routes) == 15  # 7 through WireGuard + 8 guards

        # A node leaves: its routes go, nothing else changes.
        plan = dataclasses.replace(
            desired.plan, destinations=tuple(d for d in desired.destinations if d.node != "w2")
        )
        datapath.apply(dataclasses.replace(desired, plan=plan))
        assert not any("192.168.50.22" in r or "10.244.2.0" in r for r in nc_routes(ns))
        assert len(nc_routes(ns)) == 8
        assert datapath.last_apply["routes_removed"] == 7
        assert snapshot_routes(ns) == foreign_routes
    finally:
        datapath.close()
    inspect.cleanup(settings, netns=ns)
    assert ip_rules(ns) == foreign_rules
    assert snapshot_routes(ns) == foreign_routes


def test_noop_route_is_compatibility_only(node_ns):
    ns, wg = node_ns("w1")
    case = CASES_BY_ID["v4-node-to-remote-node"]
    settings = dataclasses.replace(settings_for(case), noop_route=True)
    datapath = IpRuleDatapath(settings, netns=ns).start()
    try:
        datapath.apply(desired_for(case, wg))
        main = sh(ns, "ip", "route", "show", "table", "main")
        assert NOOP_ADDRESS in main
        assert datapath.observe().details["noop_route"] is True
        # Turning the flag off removes it again.
        datapath.settings = settings_for(case)
        datapath.apply(desired_for(case, wg))
        assert NOOP_ADDRESS not in sh(ns, "ip", "route", "show", "table", "main")
        datapath.settings = settings
        datapath.apply(desired_for(case, wg))
    finally:
        datapath.close()
    result = inspect.cleanup(settings, netns=ns)
    assert result["noop_routes_removed"] == 1
    assert NOOP_ADDRESS not in sh(ns, "ip", "route", "show", "table", "main")


def test_status_reports_band_and_table(node_ns):
    ns, wg = node_ns("w1")
    case = CASES_BY_ID["v4-node-to-remote-node"]
    settings = settings_for(case)
    assert inspect.status(settings, netns=ns)["active"] is False
    datapath = IpRuleDatapath(settings, netns=ns).start()
    try:
        datapath.apply(desired_for(case, wg))
    finally:
        datapath.close()
    status = inspect.status(settings, netns=ns)
    assert status["active"] is True
    assert status["rule_count"] == 18 and status["route_count"] == 16
    assert status["routes_by_kind"] == {"unicast": 8, "unreachable": 8}
    assert status["wireguard"]["ifindex"] == wg
    inspect.cleanup(settings, netns=ns)


def test_wireguard_going_down_fails_closed_before_the_next_apply(node_ns):
    """The kernel flushes routes through a device that goes down; the guards under them must
    catch cluster traffic at once, not only when the agent re-applies."""
    ns, wg = node_ns("w1")
    case = CASES_BY_ID["v4-node-to-remote-node"]
    settings = settings_for(case)
    datapath = IpRuleDatapath(settings, netns=ns).start()
    try:
        datapath.apply(desired_for(case, wg))
    finally:
        datapath.close()
    assert inspect.explain(settings, case.query, netns=ns).verdict == "encrypt"
    sh(ns, "ip", "link", "set", "cilium_wg0", "down")
    for dst in ("192.168.50.22", "10.244.2.7", "fd00:50::22", "fd00:244:2::7"):
        got = inspect.explain(settings, dataclasses.replace(case.query, dst=dst), netns=ns)
        assert (got.verdict, got.reason) == ("drop", "wireguard-down-fail-closed"), dst
    # Exempt and non-cluster traffic are unaffected.
    exempt = CASES_BY_ID["v4-worker-to-cp-6443"].query
    assert inspect.explain(settings, exempt, netns=ns).verdict == "exempt"
    outside = CASES_BY_ID["v4-not-cluster"].query
    assert inspect.explain(settings, outside, netns=ns).verdict == "pass"
    inspect.cleanup(settings, netns=ns)
