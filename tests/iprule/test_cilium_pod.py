"""The ip-rule datapath leaves local-pod to remote-pod traffic to Cilium (two rules per local pod
CIDR), takes it over with --take-over-pod-to-pod, and has none of these rules in tunnel mode.
While WireGuard is down pod-to-pod traffic is still left to Cilium, as the BPF datapath does:
the remote pod CIDRs' fail-closed guards live in the guard table, which the pods' rule never
consults (a guard in the own table would answer it with an error ``suppress_prefixlength``
cannot skip), while the node's own traffic to remote pods still meets them."""

from __future__ import annotations

import dataclasses

import pytest

from nodecryptor.datapath.iprule import inspect
from nodecryptor.datapath.iprule.backend import IpRuleDatapath
from nodecryptor.datapath.iprule.spec import (
    MAIN_TABLE,
    OFFSET_CILIUM_NODES,
    OFFSET_CILIUM_POD,
    desired_rules,
    guard_table,
)
from tests.datapath_cases import CASES_BY_ID, WG_IFNAME, desired_for, settings_for

from .conftest import sh


def _pod_rules(case_id: str):
    case = CASES_BY_ID[case_id]
    settings = settings_for(case)
    base = settings.iprule_priority_base
    return settings, [
        r
        for r in desired_rules(desired_for(case), settings)
        if r.priority in (base + OFFSET_CILIUM_NODES, base + OFFSET_CILIUM_POD)
    ]


def test_pod_rules_by_default():
    settings, rules = _pod_rules("v4-pod-to-remote-pod-cilium")
    base = settings.iprule_priority_base
    got = {(r.family, r.priority - base, r.src, r.table, r.suppress_prefixlen) for r in rules}
    assert got == {
        (4, OFFSET_CILIUM_NODES, "10.244.1.0/24", settings.iprule_table, 31),
        (4, OFFSET_CILIUM_POD, "10.244.1.0/24", MAIN_TABLE, None),
        (6, OFFSET_CILIUM_NODES, "fd00:244:1::/64", settings.iprule_table, 127),
        (6, OFFSET_CILIUM_POD, "fd00:244:1::/64", MAIN_TABLE, None),
    }
    assert all(r.priority in range(10300, 10400) for r in rules)


def test_no_pod_rules_when_taken_over_or_in_tunnel_mode():
    assert _pod_rules("v4-pod-to-remote-pod-taken-over")[1] == []
    assert _pod_rules("v4-tunnel-pod-to-pod-not-dropped")[1] == []


@pytest.mark.privileged
def test_wireguard_down_leaves_pod_to_pod_to_cilium_and_guards_the_node(root, node_ns):
    case = CASES_BY_ID["v4-pod-to-remote-pod-wg-down-cilium"]
    ns, wg_index = node_ns(case.local_node)
    settings = settings_for(case)
    datapath = IpRuleDatapath(settings, netns=ns).start()
    try:
        sh(ns, "ip", "link", "set", WG_IFNAME, "down")
        datapath.apply(desired_for(case, wg_index))
        down = inspect.explain(settings, case.query, netns=ns)
        # The node itself to the same remote pod: the guard still drops it (fail-closed).
        host = inspect.explain(settings, dataclasses.replace(case.query, src=None), netns=ns)
        guards = sh(ns, "ip", "route", "show", "table", str(guard_table(settings)))
        sh(ns, "ip", "link", "set", WG_IFNAME, "up")
        up_case = CASES_BY_ID["v4-pod-to-remote-pod-cilium"]
        datapath.apply(desired_for(up_case, wg_index))
        up = inspect.explain(settings, up_case.query, netns=ns)
        taken = CASES_BY_ID["v4-pod-to-remote-pod-taken-over"]
        datapath.settings = settings_for(taken)
        datapath.apply(desired_for(taken, wg_index))
        over = inspect.explain(datapath.settings, taken.query, netns=ns)
    finally:
        datapath.close()
        inspect.cleanup(settings, netns=ns)
    assert (down.verdict, down.reason) == ("pass", "cilium-pod-to-pod")
    assert (host.verdict, host.reason) == ("drop", "wireguard-down-fail-closed")
    assert "unreachable 10.244.2.0/24" in guards, guards
    assert (up.verdict, up.reason) == ("pass", "cilium-pod-to-pod")
    assert (over.verdict, over.reason) == ("encrypt", "cluster-destination")
