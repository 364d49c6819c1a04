"""Generated EncryptionExemption policy sets through both datapaths.

Any valid policy set must turn into an ip-rule spec without raising (a policy with a
``clientNodeSelector`` next to one without once made ``desired_rules`` compare ``None`` with a
prefix), and the ip-rule datapath must give the verdict the BPF program gives for every client
connection to a policy port, on every node of the shared case cluster.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from tests import datapath_cases as dc
from tests.conftest import have_bcc, require
from nodecryptor.datapath.base import PacketQuery
from nodecryptor.datapath.iprule import inspect
from nodecryptor.datapath.iprule.backend import IpRuleDatapath
from nodecryptor.datapath.iprule.spec import desired_routes, desired_rules

SELECTORS = [
    {},
    {"matchLabels": {dc.STORAGE_LABEL: "yes"}},
    {"matchExpressions": [{"key": dc.CP_LABEL, "operator": "Exists"}]},
    {"matchExpressions": [{"key": dc.CP_LABEL, "operator": "DoesNotExist"}]},
    {"matchLabels": {"kubernetes.io/hostname": "w1"}},
]
PORTS = st.builds(
    lambda proto, port, span: (
        {"protocol": proto, "port": port, "endPort": port + span}
        if span
        else {"protocol": proto, "port": port}
    ),
    st.sampled_from(["TCP", "UDP", "SCTP"]),
    st.integers(1, 65000),
    st.sampled_from([0, 0, 9]),
)


@st.composite
def policy_sets(draw) -> list[dict]:
    count = draw(st.integers(0, 4))
    out = []
    for i in range(count):
        spec = {
            "nodeSelector": draw(st.sampled_from(SELECTORS)),
            "ports": draw(st.lists(PORTS, min_size=1, max_size=3)),
        }
        client = draw(st.sampled_from([None] + SELECTORS))
        if client is not None:
            spec["clientNodeSelector"] = client
        out.append(
            {
                "apiVersion": "nodecryptor.io/v1alpha1",
                "kind": "EncryptionExemption",
                "metadata": {"name": f"policy-{i}"},
                "spec": spec,
            }
        )
    return out


NODES = sorted(dc.snapshot())


def case_on(node: str, dst: str = dc.CP1_V4) -> dc.Case:
    """A plain case on ``node``: the builders only read its node, destination and extras."""
    return dc.Case(
        id="generated",
        local_node=node,
        query=PacketQuery(dst=dst),
        expected_verdict="",
        expected_reason="",
    )


def test_the_mixed_client_selector_pair_that_crashed():
    """One policy restricted to some clients and one for everybody, on the serving node."""
    objs = [
        {
            "apiVersion": "nodecryptor.io/v1alpha1",
            "kind": "EncryptionExemption",
            "metadata": {"name": "restricted"},
            "spec": {
                "nodeSelector": {"matchLabels": {dc.STORAGE_LABEL: "yes"}},
                "clientNodeSelector": SELECTORS[3],
                "ports": [{"port": 3260}],
            },
        },
        {
            "apiVersion": "nodecryptor.io/v1alpha1",
            "kind": "EncryptionExemption",
            "metadata": {"name": "everybody"},
            "spec": {
                "nodeSelector": {"matchLabels": {dc.STORAGE_LABEL: "yes"}},
                "ports": [{"port": 9100}],
            },
        },
    ]
    settings = dc.settings_for(case_on("w2"))
    rules = desired_rules(dc.desired_for(case_on("w2"), policy_objs=objs), settings)
    replies = [r for r in rules if r.purpose == "exempt-control-plane-reply"]
    assert any(r.dst is None for r in replies) and any(r.dst for r in replies)


@hyp_settings(max_examples=200, deadline=None)
@given(objs=policy_sets(), node=st.sampled_from(NODES))
def test_any_policy_set_gives_a_sorted_spec(objs, node):
    case = case_on(node)
    desired = dc.desired_for(case, policy_objs=objs)
    rules = desired_rules(desired, dc.settings_for(case))
    routes = desired_routes(desired)
    assert rules == sorted(set(rules))
    assert routes == sorted(routes)


def client_queries(objs: list[dict], node: str) -> list[PacketQuery]:
    """From ``node``'s address to every other node's address of each family, on every
    policy port (first and last of a range) and on a port no policy names."""
    snap = dc.snapshot()
    ports = {
        (p.get("protocol", "TCP").lower(), n)
        for o in objs
        for p in o["spec"]["ports"]
        for n in (p["port"], p.get("endPort", p["port"]))
    }
    ports |= {("tcp", 6443), ("tcp", 65535)}
    out = []
    for name, info in snap.items():
        if name == node:
            continue
        for kind, addr in info.addresses:
            if kind != "InternalIP":
                continue
            for proto, port in sorted(ports):
                out.append(PacketQuery(dst=str(addr), proto=proto, sport=40000, dport=port))
    return out


@pytest.fixture(scope="module")
def loaded_program():
    require(os.geteuid() == 0, "needs root")
    ok, why = have_bcc()
    require(ok, why)
    from nodecryptor.core.settings import Settings
    from nodecryptor.datapath.bpf import program

    prog = program.load(Settings())
    yield prog
    prog.close()


@pytest.mark.privileged
@pytest.mark.bpf
@pytest.mark.parametrize("node", NODES)
def test_both_datapaths_agree_on_generated_policies(loaded_program, node_ns, node):
    from nodecryptor.datapath.bpf import testrun
    from nodecryptor.datapath.bpf.maps import diff

    ns, wg_index = node_ns(node)
    case = case_on(node)
    datapath = IpRuleDatapath(dc.settings_for(case), netns=ns).start()
    mismatches = []

    @hyp_settings(
        max_examples=12, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(objs=policy_sets())
    def check(objs):
        desired = dc.desired_for(case, wg_ifindex=wg_index, policy_objs=objs)
        datapath.apply(desired)
        diff.sync(loaded_program.map_fds, desired)
        for query in client_queries(objs, node):
            src = dc.source_address(case_on(node, query.dst))
            bpf = testrun.run(loaded_program.prog_fd, testrun.packet_for_query(query, src))
            ipr = inspect.explain(datapath.settings, query, netns=ns)
            if (bpf.verdict, bpf.reason_name) != (ipr.verdict, ipr.reason):
                mismatches.append(
                    (objs, query, bpf.verdict, bpf.reason_name, ipr.verdict, ipr.reason)
                )
        assert mismatches == []

    try:
        check()
    finally:
        datapath.close()
