"""Defaults are resolved once, in the policy, and both backends realise the same value: with the
WireGuard listen port unread, the BPF configuration and the ip-rule band both exempt Cilium's
port 51871 (they used to differ: the BPF maps substituted it, the rule spec dropped the rule)."""

from __future__ import annotations

import dataclasses

import pytest

from nodecryptor.datapath.iprule.spec import OFFSET_WG_PORT, desired_rules
from nodecryptor.core.model import DEFAULT_WG_PORT
from nodecryptor.policy.plan import compute_desired, compute_plan
from nodecryptor.core.settings import FailMode, Settings
from tests.datapath_cases import CASES_BY_ID, UNDERLAY, snapshot, wg_state_for

CASE = CASES_BY_ID["v4-node-to-remote-node"]


@pytest.mark.parametrize("listen_port,expected", [(0, DEFAULT_WG_PORT), (41000, 41000)])
def test_both_backends_exempt_the_port_the_policy_resolved(listen_port, expected):
    settings = Settings(node_name=CASE.local_node)
    plan = compute_plan(snapshot(), CASE.local_node, settings)
    wg = dataclasses.replace(wg_state_for(CASE), listen_port=listen_port)
    desired = compute_desired(plan, wg, (UNDERLAY,), settings)
    assert desired.wg_port == expected

    port_rules = [
        r
        for r in desired_rules(desired, settings)
        if r.priority == settings.iprule_priority_base + OFFSET_WG_PORT
    ]
    assert {(r.family, r.sport, r.dport) for r in port_rules} == {
        (4, (expected, expected), (expected, expected)),
        (6, (expected, expected), (expected, expected)),
    }

    from nodecryptor.datapath.bpf.maps import encode  # desired_config only builds the struct

    assert encode.desired_config(desired, now_ns=0).wg_port == expected


def test_fail_mode_and_datapath_are_enums_from_any_spelling():
    settings = Settings(fail_mode="open", datapath="iprule")
    assert settings.fail_mode is FailMode.OPEN
    assert (
        compute_desired(
            compute_plan(snapshot(), "w1", settings), wg_state_for(CASE), (UNDERLAY,), settings
        ).fail_mode
        is FailMode.OPEN
    )
