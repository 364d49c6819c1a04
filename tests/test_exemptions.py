"""EncryptionExemption policies (nodecryptor/policy/exemptions.py): selectors as Kubernetes defines
them, malformed policies rejected whole, the built-in policy, overlaps, limits, and what the
plan says per destination."""

from __future__ import annotations

import ipaddress

import pytest

from nodecryptor.policy import exemptions as ex
from nodecryptor.core.model import NodeInfo
from nodecryptor.policy.plan import compute_plan
from nodecryptor.core.settings import RoleSource, Settings

CP = "node-role.kubernetes.io/control-plane"
ZONE = "topology.kubernetes.io/zone"


def sel(obj):
    return ex.parse_selector(obj, "spec.nodeSelector")


@pytest.mark.parametrize(
    "selector,labels,expected",
    [
        ({}, {}, True),  # empty selector: every node
        ({}, {"a": "1"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        ({"matchLabels": {"a": "1"}}, {}, False),
        ({"matchLabels": {"a": ""}}, {"a": ""}, True),  # kubeadm's empty value
        (
            {"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]},
            {"a": "2"},
            True,
        ),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        (
            {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]},
            {"a": "1"},
            False,
        ),
        (
            {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]},
            {"a": "3"},
            True,
        ),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"b": ""}, False),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"b": ""}, True),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "x"}, False),
        # matchLabels and every expression must all hold
        (
            {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]},
            {"a": "1"},
            False,
        ),
        (
            {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]},
            {"a": "1", "b": "x"},
            True,
        ),
    ],
)
def test_selector_semantics(selector, labels, expected):
    assert sel(selector).matches(labels) is expected


def policy(name="p", node_selector=None, ports=None, clients=None, **spec_extra):
    spec = {
        "nodeSelector": {} if node_selector is None else node_selector,
        "ports": ports if ports is not None else [{"port": 9345}],
    }
    if clients is not None:
        spec["clientNodeSelector"] = clients
    spec.update(spec_extra)
    return {
        "apiVersion": "nodecryptor.io/v1alpha1",
        "kind": "EncryptionExemption",
        "metadata": {"name": name, "resourceVersion": "1"},
        "spec": spec,
    }


@pytest.mark.parametrize(
    "obj,field,why",
    [
        (policy(ports=[{"port": 0}]), "spec.ports[0].port", "not a port number"),
        (policy(ports=[{"port": 70000}]), "spec.ports[0].port", "not a port number"),
        (policy(ports=[{"port": "https"}]), "spec.ports[0].port", "not a port number"),
        (policy(ports=[{"port": 10, "endPort": 5}]), "spec.ports[0].endPort", "below port 10"),
        (
            policy(ports=[{"protocol": "ICMP", "port": 1}]),
            "spec.ports[0].protocol",
            "unknown protocol",
        ),
        (
            policy(ports=[{"protocol": "tcp", "port": 1}]),
            "spec.ports[0].protocol",
            "unknown protocol",
        ),  # Kubernetes spells them in capitals
        (policy(ports=[]), "spec.ports", "non-empty"),
        (policy(ports=[{"port": 1, "hostPort": 2}]), "spec.ports[0]", "unknown field"),
        (
            policy(
                node_selector={
                    "matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]
                }
            ),
            "spec.nodeSelector.matchExpressions[0].operator",
            "unknown operator",
        ),
        (
            policy(node_selector={"matchExpressions": [{"key": "a", "operator": "In"}]}),
            "spec.nodeSelector.matchExpressions[0].values",
            "non-empty",
        ),
        (
            policy(
                node_selector={
                    "matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]
                }
            ),
            "spec.nodeSelector.matchExpressions[0].values",
            "takes no values",
        ),
        (
            policy(clients={"matchLabels": "a=b"}),
            "spec.clientNodeSelector.matchLabels",
            "not a map",
        ),
        (
            {"metadata": {"name": "p"}, "spec": {"ports": [{"port": 1}]}},
            "spec.nodeSelector",
            "required",
        ),
        (
            {"metadata": {"name": "p"}, "spec": {"nodeSelector": None, "ports": [{"port": 1}]}},
            "spec.nodeSelector",
            "required",
        ),
        ({"metadata": {"name": "p"}}, "spec", "missing"),
        (policy(name=ex.BUILTIN_NAME), "metadata.name", "reserved"),
        (
            policy(
                ports=[{"port": p} for p in range(1, 2 * ex.MAX_RANGES_PER_POLICY + 1, 2)]
                + [{"port": 999}]
            ),
            "spec.ports",
            "at most",
        ),
    ],
)
def test_malformed_policies_are_rejected_whole(obj, field, why):
    got, rejections = ex.parse_exemption(obj)
    assert got is None
    [rej] = rejections
    assert rej.kind == "EncryptionExemption" and rej.field == field and why in rej.why
    assert rej.to_json()["kind"] == "EncryptionExemption"


def test_ports_default_to_tcp_and_merge():
    got, rejections = ex.parse_exemption(
        policy(
            ports=[
                {"port": 10000, "endPort": 10010},
                {"protocol": "TCP", "port": 10005, "endPort": 10020},
                {"protocol": "UDP", "port": 53},
                {"protocol": "SCTP", "port": 9},
            ]
        )
    )
    assert rejections == []
    assert [str(r) for r in got.ports] == ["sctp/9", "10000-10020", "udp/53"]


def node(name, ip, labels=None):
    """A node whose trusted (v1 Node) labels are ``labels``; None: its Node is not known."""
    net = ipaddress.ip_network(f"10.{int(ip.split('.')[-1])}.0.0/24")
    return NodeInfo(
        name=name,
        addresses=(("InternalIP", ipaddress.ip_address(ip)),),
        pod_cidrs=(net,),
        node_labels=None if labels is None else tuple(sorted(labels.items())),
        node_addresses=(("InternalIP", ipaddress.ip_address(ip)),),
    )


CLUSTER = {
    "cp1": node("cp1", "192.0.2.1", {CP: ""}),
    "w1": node("w1", "192.0.2.11", {ZONE: "a"}),
    "w2": node("w2", "192.0.2.12", {ZONE: "a", "storage": "yes"}),
    "w3": node("w3", "192.0.2.13", {ZONE: "b"}),
    "w4": node("w4", "192.0.2.14", None),  # its Node not known yet
}


def parsed(*objs):
    out = []
    for obj in objs:
        got, rej = ex.parse_exemption(obj)
        assert rej == [], rej
        out.append(got)
    return out


def exempt_by_node(plan):
    """node -> sorted "policy:proto/first-last" of its node-address destination."""
    out = {}
    for d in plan.destinations:
        if d.kind == "node-ip":
            out[d.node] = sorted(
                f"{r.policy}:{r.protocol}/{r.first}-{r.last}" for r in d.exempt_ports
            )
        else:
            assert d.exempt_ports == ()  # traffic to pods is never exempt
    return out


STORAGE = policy(
    "storage",
    {"matchLabels": {"storage": "yes"}},
    [{"port": 3260}, {"protocol": "UDP", "port": 4000, "endPort": 4010}],
)
ZONE_A_CLIENTS = policy(
    "zone-a-only",
    {"matchLabels": {"storage": "yes"}},
    [{"port": 3260}],
    clients={"matchExpressions": [{"key": ZONE, "operator": "In", "values": ["a"]}]},
)
BUILTIN = ["control-plane-bootstrap:tcp/2379-2380", "control-plane-bootstrap:tcp/6443-6443"]


@pytest.mark.parametrize(
    "local,objs,expected",
    [
        # The built-in policy alone (today's behaviour).
        ("w1", [], {"cp1": BUILTIN, "w2": [], "w3": [], "w4": []}),
        # A policy to a labelled worker; the same port to other workers stays encrypted.
        (
            "w1",
            [STORAGE],
            {
                "cp1": BUILTIN,
                "w2": ["storage:tcp/3260-3260", "storage:udp/4000-4010"],
                "w3": [],
                "w4": [],
            },
        ),
        # Client selector: w3 (zone b) is no client.
        (
            "w1",
            [ZONE_A_CLIENTS],
            {"cp1": BUILTIN, "w2": ["zone-a-only:tcp/3260-3260"], "w3": [], "w4": []},
        ),
        ("w3", [ZONE_A_CLIENTS], {"cp1": BUILTIN, "w1": [], "w2": [], "w4": []}),
        # Overlapping policies: each range is listed with its policy.
        (
            "w1",
            [STORAGE, ZONE_A_CLIENTS],
            {
                "cp1": BUILTIN,
                "w2": [
                    "storage:tcp/3260-3260",
                    "storage:udp/4000-4010",
                    "zone-a-only:tcp/3260-3260",
                ],
                "w3": [],
                "w4": [],
            },
        ),
        # A policy adding to the control plane's ports: both listed; the built-in stays.
        (
            "w1",
            [policy("rke2-supervisor", {"matchLabels": {CP: ""}}, [{"port": 9345}])],
            {"cp1": BUILTIN + ["rke2-supervisor:tcp/9345-9345"], "w2": [], "w3": [], "w4": []},
        ),
        # The empty selector selects every node (whose labels are known or not).
        (
            "w1",
            [policy("all", {}, [{"port": 7946}])],
            {
                "cp1": ["all:tcp/7946-7946"] + BUILTIN,
                "w2": ["all:tcp/7946-7946"],
                "w3": ["all:tcp/7946-7946"],
                "w4": ["all:tcp/7946-7946"],
            },
        ),
        # NotIn matches nodes without the key, including one whose Node is not known.
        (
            "w1",
            [
                policy(
                    "not-b",
                    {"matchExpressions": [{"key": ZONE, "operator": "NotIn", "values": ["b"]}]},
                    [{"port": 1}],
                )
            ],
            {
                "cp1": BUILTIN + ["not-b:tcp/1-1"],
                "w2": ["not-b:tcp/1-1"],
                "w3": [],
                "w4": ["not-b:tcp/1-1"],
            },
        ),
    ],
)
def test_exempt_ports_per_destination(local, objs, expected):
    plan = compute_plan(CLUSTER, local, Settings(node_name=local), policies=parsed(*objs))
    assert exempt_by_node(plan) == expected


def test_builtin_policy_is_off_with_the_empty_port_list():
    settings = Settings(node_name="w1", exempt_ports=())
    plan = compute_plan(CLUSTER, "w1", settings, policies=parsed(STORAGE))
    assert exempt_by_node(plan)["cp1"] == []
    assert plan.policies == ("storage",)


def test_serving_node_lists_its_ranges_and_clients():
    plan = compute_plan(
        CLUSTER, "w2", Settings(node_name="w2"), policies=parsed(STORAGE, ZONE_A_CLIENTS)
    )
    assert [(r.policy, str(r.range)) for r in plan.serves] == [
        ("storage", "3260"),
        ("zone-a-only", "3260"),
        ("storage", "udp/4000-4010"),
    ]
    clients = {d.node: sorted(d.client_of) for d in plan.destinations if d.kind == "node-ip"}
    assert clients == {
        "cp1": ["storage"],
        "w1": ["storage", "zone-a-only"],
        "w3": ["storage"],
        "w4": ["storage"],
    }
    # Pod CIDR destinations are clients too: replies to pods of client nodes stay clear.
    assert {
        d.node: sorted(d.client_of) for d in plan.destinations if d.kind == "pod-cidr"
    } == clients
    assert plan.to_json()["serves"][0] == {
        "protocol": "tcp",
        "first": 3260,
        "last": 3260,
        "policy": "storage",
    }


def test_control_plane_serves_the_builtin_policy():
    plan = compute_plan(CLUSTER, "cp1", Settings(node_name="cp1"))
    assert [r.policy for r in plan.serves] == ["control-plane-bootstrap"] * 2


def test_selectors_use_the_trusted_labels():
    """A CiliumNode label (writable by any Cilium agent) does not select a node by default."""
    cluster = dict(CLUSTER)
    cluster["w3"] = NodeInfo(
        name="w3",
        labels=(("storage", "yes"),),
        addresses=CLUSTER["w3"].addresses,
        node_labels=((ZONE, "b"),),
        node_addresses=CLUSTER["w3"].addresses,
    )
    plan = compute_plan(cluster, "w1", Settings(node_name="w1"), policies=parsed(STORAGE))
    assert exempt_by_node(plan)["w3"] == []
    plan = compute_plan(
        cluster,
        "w1",
        Settings(node_name="w1", role_source=RoleSource.CILIUMNODE),
        policies=parsed(STORAGE),
    )
    assert exempt_by_node(plan)["w3"] == ["storage:tcp/3260-3260", "storage:udp/4000-4010"]


def test_a_node_claiming_a_selected_nodes_address_gains_nothing():
    cluster = dict(CLUSTER)
    # w3 (not selected) claims w2's address: the prefix is shared, and a policy exempts it
    # only when every claimant is selected, so it is encrypted.
    cluster["w3"] = node("w3", "192.0.2.12", {ZONE: "b"})
    plan = compute_plan(cluster, "w1", Settings(node_name="w1"), policies=parsed(STORAGE))
    [shared] = [d for d in plan.destinations if str(d.prefix) == "192.0.2.12/32"]
    assert shared.exempt_ports == ()


def test_limits_reject_whole_policies_in_name_order():
    many = [policy(f"p{i:02d}", {}, [{"port": 1000 + i}]) for i in range(ex.MAX_POLICIES + 2)]
    plan = compute_plan(CLUSTER, "w1", Settings(node_name="w1"), policies=parsed(*many))
    assert len(plan.policies) == ex.MAX_POLICIES
    assert plan.policies[0] == "control-plane-bootstrap"
    rejected = [r for r in plan.rejected if r.kind == "EncryptionExemption"]
    assert [r.obj for r in rejected] == ["p31", "p32", "p33"]
    assert all(r.reason == ex.REASON_LIMIT and "more than 32 policies" in r.why for r in rejected)
    # Too many ranges in total.
    wide = [
        policy(f"r{i}", {}, [{"port": p} for p in range(1000 * i + 1, 1000 * i + 32, 2)])
        for i in range(5)
    ]
    plan = compute_plan(CLUSTER, "w1", Settings(node_name="w1"), policies=parsed(*wide))
    rejected = [r for r in plan.rejected if r.kind == "EncryptionExemption"]
    assert [r.obj for r in rejected] == ["r3", "r4"]  # 2 built-in + 3 x 16 fit in 64
    assert "more than 64 port ranges" in rejected[0].why


def test_policy_for_names_the_first_matching_policy():
    ranges = [
        ex.PolicyRange("tcp", 2379, 2380, "control-plane-bootstrap"),
        ex.PolicyRange("tcp", 2379, 2379, "etcd"),
    ]
    assert ex.policy_for(ranges, "tcp", 2379) == "control-plane-bootstrap"
    assert ex.policy_for(ranges, "udp", 2379) is None


@pytest.mark.parametrize(
    "case_id,policy",
    [
        ("v4-worker-to-cp-6443", "control-plane-bootstrap"),
        ("v4-policy-worker-to-labelled-worker", "storage"),
        ("v6-policy-worker-to-labelled-worker", "storage"),
        ("v4-policy-reply-to-client", "storage"),
        ("v4-policy-reply-to-client-pod", "storage"),
        ("v4-cp-reply-6443-from-node-ip", "control-plane-bootstrap"),
        ("v4-policy-reply-to-non-client", None),
        ("v4-policy-port-to-cp", None),
    ],
)
def test_explain_names_the_policy_from_the_agents_record(tmp_path, case_id, policy):
    """The record the reconciler writes (exemption_record.py) maps an exempt verdict back to
    the policy, for either direction."""
    from nodecryptor.agent import exemption_record
    from tests import datapath_cases as dc

    case = dc.CASES_BY_ID[case_id]
    settings = Settings(node_name=case.local_node, run_dir=str(tmp_path))
    exemption_record.write(settings, exemption_record.summarize(dc.desired_for(case)))
    record = exemption_record.read(settings)
    q = case.query
    reply = case.expected_reason == dc.R_EXEMPT_SPORT or q.sport != 40000
    port = q.sport if reply else q.dport
    assert exemption_record.policy_of(record, reply, q.dst, q.proto, port) == policy


def test_a_local_node_without_ciliumnode_is_a_client_but_serves_nothing():
    cluster = {n: v for n, v in CLUSTER.items() if n != "w2"}
    plan = compute_plan(
        cluster,
        "w2",
        Settings(node_name="w2"),
        policies=parsed(policy("all", {}, [{"port": 7946}])),
    )
    assert not plan.local_known
    assert exempt_by_node(plan)["cp1"] == ["all:tcp/7946-7946"] + BUILTIN
    assert plan.serves == ()
