"""Hostile and broken CiliumNode claims: tables of every case, and
property tests that random claims from other nodes never touch traffic outside the accepted
cluster prefixes nor displace an honest node's encryption."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings as hyp_settings, strategies as st

from nodecryptor.policy.admission import REASONS, special_purpose
from nodecryptor.policy.topology import compile_topology
from nodecryptor.policy.ciliumnode import parse_ciliumnode, parse_node_roles
from nodecryptor.datapath.iprule.spec import desired_routes
from nodecryptor.observe.metrics import Metrics
from nodecryptor.core.model import KIND_NODE_IP, KIND_POD_CIDR, NodeInfo, Rejection, WgState
from nodecryptor.policy.plan import compute_desired, compute_plan
from nodecryptor.observe.rejectlog import RejectionLog
from nodecryptor.core.settings import Settings

from tests.cilium_objects import CP_LABEL, KUBEADM_CP, W1, W2, ciliumnode

net = ipaddress.ip_network
addr = ipaddress.ip_address


def trusted(*objs, node_roles: dict | None = None) -> dict[str, NodeInfo]:
    """NodeInfo by name; ``node_roles``: the v1 Nodes' role labels by name (default: the
    CiliumNode's own labels, i.e. the two sources agree)."""
    out = {}
    for obj in objs:
        info, _ = parse_ciliumnode(obj)
        labels = info.labels if node_roles is None else node_roles.get(info.name)
        out[info.name] = dataclasses.replace(
            info, node_labels=labels, node_addresses=info.addresses
        )
    return out


def prefixes(plan) -> set[str]:
    return {str(d.prefix) for d in plan.destinations}


def reasons(plan) -> set[tuple[str, str, str]]:
    return {(r.obj, r.value, r.reason) for r in plan.rejected}


SETTINGS = Settings(node_name="w1")

# --------------------------------------------------------------------------------------------
# Address classes, at parse time


@pytest.mark.parametrize(
    "ip,reason",
    [
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("169.254.0.1", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("::ffff:127.0.0.1", "ipv4-mapped"),
        ("::ffff:192.168.50.10", "ipv4-mapped"),
        ("::192.168.50.10", "ipv4-compatible"),
    ],
)
def test_special_addresses_are_never_node_addresses(ip, reason):
    obj = ciliumnode("evil", ip)
    info, rejections = parse_ciliumnode(obj)
    assert info.addresses == ()
    assert [(r.field, r.reason) for r in rejections] == [("spec.addresses[0].ip", reason)]


@pytest.mark.parametrize(
    "cidr,reason",
    [
        ("0.0.0.0/0", "unspecified"),
        ("::/0", "unspecified"),
        ("0.0.0.0/1", "unspecified"),
        ("::/1", "unspecified"),
        ("128.0.0.0/1", "link-local"),  # covers 169.254.0.0/16 (and multicast, broadcast)
        ("8000::/1", "link-local"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("169.254.169.0/24", "link-local"),
        ("fe80::/64", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("ff00::/8", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("240.0.0.0/4", "broadcast"),
        ("::ffff:0:0/96", "ipv4-mapped"),
        ("::ffff:10.0.0.0/120", "ipv4-mapped"),
    ],
)
def test_special_ranges_are_never_pod_cidrs(cidr, reason):
    info, rejections = parse_ciliumnode(ciliumnode("evil", "192.168.50.99", pod_cidrs=[cidr]))
    assert info.pod_cidrs == ()
    assert [(r.field, r.reason) for r in rejections] == [("spec.ipam.podCIDRs[0]", reason)]


@pytest.mark.parametrize(
    "prefix",
    [
        "10.244.0.0/24",
        "100.64.3.0/24",
        "fd00:10:244::/64",
        "192.168.50.10/32",
        "2001:db8::1/128",
        "172.16.0.0/12",
    ],
)
def test_ordinary_unicast_is_not_special(prefix):
    assert special_purpose(net(prefix)) is None


# --------------------------------------------------------------------------------------------
# Rules that need the settings or the rest of the cluster


def test_finding_1_supernet_pod_cidrs_are_rejected_and_nothing_else_moves():
    evil = ciliumnode(
        "evil",
        "192.168.50.66",
        pod_cidrs=[
            "0.0.0.0/1",
            "128.0.0.0/1",
            "::/1",
            "8000::/1",
            "100.64.0.0/10",
            "10.0.0.0/8",
            "fd00::/8",
            "10.99.0.0/16",
            "fd00:99::/48",
        ],
    )
    plan = compute_plan(trusted(KUBEADM_CP, W1, W2, evil), "w1", SETTINGS)
    honest = compute_plan(trusted(KUBEADM_CP, W1, W2), "w1", SETTINGS)
    assert prefixes(plan) == prefixes(honest) | {"192.168.50.66/32", "10.99.0.0/16", "fd00:99::/48"}
    assert {(v, r) for n, v, r in reasons(plan)} == {
        ("100.64.0.0/10", "too-broad"),
        ("10.0.0.0/8", "too-broad"),
        ("fd00::/8", "too-broad"),
    }


def test_breadth_limits_are_settings():
    evil = ciliumnode("evil", "192.168.50.66", pod_cidrs=["10.99.0.0/16", "fd00:99::/48"])
    strict = Settings(node_name="w1", pod_cidr_min_prefix_v4=20, pod_cidr_min_prefix_v6=56)
    plan = compute_plan(trusted(W1, evil), "w1", strict)
    assert prefixes(plan) == {"192.168.50.66/32"}
    assert {r for _, _, r in reasons(plan)} == {"too-broad"}


def test_cluster_pod_cidrs_reject_pod_cidrs_outside_them_per_family():
    evil = ciliumnode(
        "evil", "192.168.50.66", pod_cidrs=["10.99.1.0/24", "10.244.77.0/24", "fd00:99::/64"]
    )
    settings = Settings(node_name="w1", cluster_pod_cidrs=(net("10.244.0.0/16"),))
    plan = compute_plan(trusted(KUBEADM_CP, W1, evil), "w1", settings)
    assert "10.244.77.0/24" in prefixes(plan) and "10.99.1.0/24" not in prefixes(plan)
    # No IPv6 range configured: IPv6 pod CIDRs are not checked (never silently unencrypted).
    assert "fd00:99::/64" in prefixes(plan)
    assert reasons(plan) == {("evil", "10.99.1.0/24", "outside-cluster-pod-cidrs")}


# The local node's own pod CIDRs as the kernel shows them (Cilium's route over cilium_host).
W1_KERNEL = (net("10.244.1.0/24"), net("fd00:10:244:1::/64"))


@pytest.mark.parametrize(
    "claim",
    [
        "10.244.1.0/24",  # the local pod CIDR itself
        "10.244.0.0/16",  # a supernet of it (ip-rule: 'unreachable 10.244.0.0/16' broke probes)
        "10.244.1.128/25",  # inside it
        "fd00:10:244:1::/64",
        "fd00:10:244::/48",
    ],
)
def test_claims_overlapping_the_local_node_are_rejected(claim):
    evil = ciliumnode("evil", "192.168.50.66", pod_cidrs=[claim])
    plan = compute_plan(trusted(KUBEADM_CP, W1, evil), "w1", SETTINGS, kernel_prefixes=W1_KERNEL)
    assert claim not in prefixes(plan)
    assert ("evil", claim, "overlaps-local-node") in reasons(plan)


@pytest.mark.parametrize("claim", ["192.168.50.0/24", "fd50::/64"])
def test_a_pod_cidr_over_node_addresses_is_rejected(claim):
    """The underlay subnet claimed as a pod CIDR (no pool configured) contains addresses v1
    Nodes list: refused, and every node address inside stays a destination."""
    evil = ciliumnode("evil", "192.168.50.66", pod_cidrs=[claim])
    plan = compute_plan(trusted(KUBEADM_CP, W1, W2, evil), "w1", SETTINGS)
    assert claim not in prefixes(plan)
    assert ("evil", claim, "covers-node-address") in reasons(plan)
    assert {"192.168.50.10/32", "192.168.50.22/32"} <= prefixes(plan)


def test_another_node_claiming_the_local_address_is_rejected():
    evil = ciliumnode("evil", "192.168.50.21")  # w1's address
    plan = compute_plan(trusted(W1, evil), "w1", SETTINGS)
    assert prefixes(plan) == set()
    assert reasons(plan) == {("evil", "192.168.50.21/32", "overlaps-local-node")}


def test_a_claim_covering_other_nodes_removes_nothing():
    """Nested claims all stay (longest-prefix match sends each packet to the most specific
    claimant); a pod CIDR over node addresses is refused, the addresses stay."""
    w9 = ciliumnode("w9", "192.168.60.9", pod_cidrs=["10.245.9.0/24"])
    evil = ciliumnode(
        "evil", "192.168.60.66", pod_cidrs=["10.244.0.0/22", "192.168.50.0/24", "10.250.0.0/24"]
    )
    plan = compute_plan(trusted(KUBEADM_CP, W1, W2, w9, evil), "w9", Settings(node_name="w9"))
    assert {
        "10.244.0.0/24",
        "10.244.1.0/24",
        "10.244.2.0/24",
        "192.168.50.10/32",
        "192.168.50.21/32",
        "192.168.50.22/32",
        "10.250.0.0/24",
        "10.244.0.0/22",
    } <= prefixes(plan)
    assert {(v, r) for _, v, r in reasons(plan)} == {("192.168.50.0/24", "covers-node-address")}


def test_a_node_address_inside_its_own_pod_cidr_is_fine():
    own = ciliumnode(
        "w5", "192.168.50.25", pod_cidrs=["10.244.5.0/24"], cilium_internal_ip="10.244.5.1"
    )
    settings = Settings(node_name="w1", address_types=("InternalIP", "CiliumInternalIP"))
    plan = compute_plan(trusted(W1, own), "w1", settings)
    assert {"10.244.5.0/24", "10.244.5.1/32"} <= prefixes(plan)
    assert plan.rejected == ()


def test_identical_claims_stay_encrypted_and_are_reported():
    a = ciliumnode("a", "192.168.50.31", pod_cidrs=["10.244.31.0/24"])
    b = ciliumnode("b", "192.168.50.32", pod_cidrs=["10.244.31.0/24"])
    plan = compute_plan(trusted(W1, a, b), "w1", SETTINGS)
    shared = [d for d in plan.destinations if str(d.prefix) == "10.244.31.0/24"]
    assert len(shared) == 1 and shared[0].node == "a" and not shared[0].control_plane
    assert reasons(plan) == {("b", "10.244.31.0/24", "duplicate-claim")}


def test_finding_3_worker_claiming_a_control_plane_address():
    """The exemption of a control-plane node's address survives a worker claiming the same
    address; the worker gains nothing: the destination stays the control-plane node's, its
    claim is reported, and whoever is the first claimant by name does not matter."""
    for thief in ("a-first", "zz-last"):
        evil = ciliumnode(thief, "192.168.50.10", pod_cidrs=["10.244.66.0/24"])
        plan = compute_plan(trusted(evil, KUBEADM_CP, W1), "w1", SETTINGS)
        cp_ip = [d for d in plan.destinations if str(d.prefix) == "192.168.50.10/32"]
        assert len(cp_ip) == 1
        assert (cp_ip[0].node, cp_ip[0].kind, cp_ip[0].control_plane) == ("cp1", KIND_NODE_IP, True)
        assert reasons(plan) == {(thief, "192.168.50.10/32", "duplicate-claim")}


def test_a_forged_control_plane_label_exempts_nothing():
    """With roles from the v1 Nodes, a worker whose CiliumNode was relabelled
    control-plane stays a worker; a node whose Node is not known yet is a worker."""
    forged = ciliumnode("w2", "192.168.50.22", labels={CP_LABEL: ""})
    snapshot = trusted(KUBEADM_CP, W1, forged, node_roles={"cp1": ((CP_LABEL, ""),), "w1": ()})
    plan = compute_plan(snapshot, "w1", SETTINGS)
    cp = {d.node for d in plan.destinations if d.control_plane}
    assert cp == {"cp1"}
    unknown = trusted(KUBEADM_CP, W1, node_roles={})
    assert not any(d.control_plane for d in compute_plan(unknown, "w1", SETTINGS).destinations)
    assert compute_plan(unknown, "cp1", Settings(node_name="cp1")).role == "worker"
    # Clusters without NodeRestriction can choose the CiliumNode labels.
    legacy = Settings(node_name="w1", role_source="ciliumnode")
    assert {
        d.node for d in compute_plan(snapshot, "w1", legacy).destinations if d.control_plane
    } == {"cp1", "w2"}


def test_node_role_labels_keep_only_the_selectors():
    obj = {
        "metadata": {
            "name": "cp1",
            "labels": {CP_LABEL: "", "team": "x", "node-role.kubernetes.io/master": "true"},
        }
    }
    roles, rejections = parse_node_roles(obj, (CP_LABEL,))
    assert roles.name == "cp1" and roles.labels == ((CP_LABEL, ""),) and rejections == []
    assert parse_node_roles({"metadata": {}}, (CP_LABEL,))[0] is None
    assert parse_node_roles({"metadata": {"name": "x", "labels": []}}, (CP_LABEL,))[0].labels == ()


def test_underlay_broadcast_is_no_node_address_when_known():
    evil = ciliumnode("evil", "192.168.50.255")
    plan = compute_plan(
        trusted(W1, evil), "w1", SETTINGS, underlay_networks=[net("192.168.50.0/24")]
    )
    assert prefixes(plan) == set()
    assert reasons(plan) == {("evil", "192.168.50.255/32", "broadcast")}
    assert prefixes(compute_plan(trusted(W1, evil), "w1", SETTINGS)) == {"192.168.50.255/32"}


def test_every_reason_is_documented_and_bounded():
    assert len(REASONS) < 20
    assert all(r == r.lower() and " " not in r for r in REASONS)


# --------------------------------------------------------------------------------------------
# The ip-rule datapath's own guard


def test_iprule_never_routes_over_the_local_node_whatever_the_plan_says():
    plan = compute_plan(trusted(KUBEADM_CP, W1, W2), "w1", SETTINGS)
    # A plan from elsewhere (or a future bug) with destinations over w1's own prefixes.
    from nodecryptor.core.model import Destination

    bad = tuple(
        Destination(net(p), "evil", KIND_POD_CIDR, False)
        for p in ("10.244.0.0/16", "10.244.1.0/25", "192.168.50.0/24", "fd50::/64")
    )
    plan = dataclasses.replace(plan, destinations=plan.destinations + bad)
    wg = WgState(
        ifname="cilium_wg0",
        ifindex=7,
        present=True,
        up=True,
        mtu=1420,
        listen_port=51871,
        peers=None,
    )
    for fail_mode in ("closed", "open"):
        settings = Settings(node_name="w1", fail_mode=fail_mode)
        routes = {r.dst for r in desired_routes(compute_desired(plan, wg, (), settings))}
        assert "10.244.2.0/24" in routes and "192.168.50.22/32" in routes
        assert not routes & {"10.244.0.0/16", "10.244.1.0/25", "192.168.50.0/24", "fd50::/64"}


# --------------------------------------------------------------------------------------------
# Logged and counted once


def test_rejections_are_logged_and_counted_once_while_they_persist(caplog):
    metrics = Metrics()
    log = RejectionLog(metrics)
    a = Rejection("evil", "spec.ipam.podCIDRs", "10.0.0.0/8", "too broad", "too-broad")
    b = Rejection("evil", "spec.addresses", "192.168.50.10/32", "dup", "duplicate-claim")

    def count(reason):
        return metrics.registry.get_sample_value(
            "nodecryptor_rejected_claims_total", {"reason": reason}
        )

    assert log.report([a, b]) == [b, a]
    assert log.report([a, b]) == [] and log.report([b, a]) == []
    assert count("too-broad") == 1 and count("duplicate-claim") == 1 and count("loopback") == 0
    assert log.report([b]) == []  # a went away...
    assert log.report([a, b]) == [a]  # ...and came back: reported again
    assert count("too-broad") == 2
    assert sum("rejected" in r.message or "conflict" in r.message for r in caplog.records) == 3


# --------------------------------------------------------------------------------------------
# Properties

HONEST_V4 = [
    ("h1", "192.168.50.11", "10.244.11.0/24"),
    ("h2", "192.168.50.12", "10.244.12.0/24"),
    ("h3", "192.168.50.13", "10.244.13.0/24"),
]
LOCAL = ("me", "192.168.50.10", "10.244.10.0/24")


def honest_cluster() -> dict[str, NodeInfo]:
    out = {}
    for name, ip, cidr in [LOCAL, *HONEST_V4]:
        address = (("InternalIP", addr(ip)),)
        out[name] = NodeInfo(
            name,
            addresses=address,
            pod_cidrs=(net(cidr),),
            node_labels=((CP_LABEL, ""),) if name == "h1" else (),
            node_addresses=address,
        )
    return out


v4_prefix = st.builds(
    lambda a, length: ipaddress.IPv4Network((a, length), strict=False),
    st.integers(0, 2**32 - 1),
    st.integers(0, 32),
)
v6_prefix = st.builds(
    lambda a, length: ipaddress.IPv6Network((a, length), strict=False),
    st.integers(0, 2**128 - 1),
    st.integers(0, 128),
)
# Bias towards the interesting neighbourhood: the cluster's own ranges and the underlay.
near = st.builds(
    lambda base, length: (
        net(base).supernet(new_prefix=length) if length < net(base).prefixlen else net(base)
    ),
    st.sampled_from(
        [
            "10.244.11.0/24",
            "10.244.10.0/24",
            "192.168.50.12/32",
            "192.168.50.10/32",
            "169.254.169.254/32",
            "10.244.10.7/32",
        ]
    ),
    st.integers(0, 32),
)
claim_prefix = st.one_of(v4_prefix, v6_prefix, near)
hostile_node = st.tuples(
    st.sampled_from(["x1", "x2", "x3"]),
    st.lists(claim_prefix, max_size=4),
    st.lists(claim_prefix, max_size=3),
    st.booleans(),
)


def hostile(nodes) -> dict[str, NodeInfo]:
    out = {}
    for name, cidrs, addresses, cp in nodes:
        addrs = tuple(
            ("InternalIP", p.network_address)
            for p in addresses
            if special_purpose(net(p.network_address)) is None
        )
        pods = tuple(p for p in cidrs if special_purpose(p) is None)  # as the parser leaves
        out[name] = NodeInfo(
            name, addresses=addrs, pod_cidrs=pods, node_labels=((CP_LABEL, ""),) if cp else ()
        )
    return out


CLUSTER_RANGES = (net("10.244.0.0/16"),)
PROPERTY_SETTINGS = [
    Settings(node_name="me"),
    Settings(node_name="me", cluster_pod_cidrs=CLUSTER_RANGES),
]


@hyp_settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile_node, max_size=3), st.sampled_from(PROPERTY_SETTINGS), st.booleans())
def test_property_no_claim_touches_outside_traffic_or_displaces_an_honest_node(
    nodes, settings, kernel
):
    """Hostile CiliumNodes (no Node of their own) claim anything: the honest nodes' prefixes
    all stay encrypted, nothing special-purpose, too broad or (with pools) outside the pools
    becomes a destination, nothing over the local node's trusted prefixes either, and the
    control-plane node keeps its exemption. ``kernel``: whether the kernel shows the local
    pod CIDR (else the local CiliumNode's own claim is all there is, and it loses conflicts)."""
    snapshot = {**hostile(nodes), **honest_cluster()}
    plan = compute_plan(
        snapshot, "me", settings, kernel_prefixes=(net(LOCAL[2]),) if kernel else ()
    )
    local = [net(LOCAL[1]), *([net(LOCAL[2])] if kernel else [])]
    hostile_names = {n for n, *_ in nodes}
    for d in plan.destinations:
        p = d.prefix
        assert special_purpose(p) is None
        assert not any(p.overlaps(own) for own in local if own.version == p.version)
        if d.kind == KIND_POD_CIDR:
            assert p.prefixlen >= (16 if p.version == 4 else 48)
            if settings.cluster_pod_cidrs and p.version == 4:
                assert any(p.subnet_of(r) for r in settings.cluster_pod_cidrs)
        else:
            assert d.node not in hostile_names  # no Node object: no node address
    by_prefix = {d.prefix: d for d in plan.destinations}
    for name, ip, cidr in HONEST_V4:
        for p in (net(ip), net(cidr)):
            assert p in by_prefix, (name, p)
    assert by_prefix[net("192.168.50.11/32")].control_plane
    assert all(r.reason in REASONS for r in plan.rejected)


@hyp_settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d"]),
            st.sampled_from([KIND_NODE_IP, KIND_POD_CIDR]),
            st.sampled_from(
                [
                    "10.244.1.0/24",
                    "10.244.0.0/16",
                    "10.244.1.7/32",
                    "10.244.1.0/25",
                    "10.245.0.0/24",
                ]
            ),
            st.booleans(),
        ),
        max_size=12,
    )
)
def test_property_admission_is_order_independent_and_complete(raw):
    """Each node's addresses as its Node lists them and pod CIDRs as its CiliumNode claims
    them: whatever the input order, every claim is admitted or rejected, never both (a
    duplicate is kept and reported)."""

    def cluster(rows):
        nodes: dict = {}
        for n, k, p, _cp in rows:
            addrs, pods = nodes.setdefault(n, ([], []))
            (addrs if k == KIND_NODE_IP else pods).append(net(p))
        out = {}
        for n, (addrs, pods) in nodes.items():
            pairs = tuple(("InternalIP", a.network_address) for a in addrs if a.prefixlen == 32)
            out[n] = NodeInfo(
                n, addresses=pairs, node_addresses=pairs, pod_cidrs=tuple(pods), node_labels=()
            )
        return out

    first = compile_topology(cluster(raw), Settings())
    second = compile_topology(
        dict(reversed(list(cluster(list(reversed(raw))).items()))), Settings()
    )
    assert first == second
    admitted = {(c.node, c.kind, str(c.prefix)) for group in first.admitted for c in group}
    kinds = {
        "status.addresses": KIND_NODE_IP,
        "spec.addresses": KIND_NODE_IP,
        "spec.ipam.podCIDRs": KIND_POD_CIDR,
    }
    rejected_keys = {
        (r.obj, kinds[r.field], str(net(r.value)))
        for r in first.rejected
        if r.reason != "duplicate-claim"
    }
    assert not admitted & rejected_keys
    for node in cluster(raw).values():
        for kind, prefixes in (
            (KIND_NODE_IP, [net(a) for _, a in node.addresses]),
            (KIND_POD_CIDR, node.pod_cidrs),
        ):
            for p in prefixes:
                assert (node.name, kind, str(p)) in admitted | rejected_keys


def test_reconcile_reports_each_rejection_once_across_passes():
    from nodecryptor.datapath.base import FakeDatapath
    from nodecryptor.core.model import Device
    from nodecryptor.agent.reconcile import Reconciler
    from nodecryptor.cluster.store import Store

    store = Store()
    evil = ciliumnode("evil", "192.168.50.66", pod_cidrs=["10.0.0.0/8", "10.244.1.0/25"])
    kernel = (net("10.244.1.0/24"),)  # Cilium's route to w1's pod CIDR
    store.replace_all(trusted(KUBEADM_CP, W1, evil).values())
    metrics = Metrics()
    wg = WgState(
        ifname="cilium_wg0",
        ifindex=9,
        present=True,
        up=True,
        mtu=1420,
        listen_port=51871,
        fwmark=0xE00,
        peers=(),
    )
    rec = Reconciler(
        Settings(node_name="w1"),
        store,
        FakeDatapath(),
        metrics,
        read_wg=lambda name: wg,
        resolve_devices=lambda names, addrs, exclude: ((Device("eth0", 2, 1500),), []),
        read_sysctl=lambda name: {"all": 0, name: 0},
        read_local=lambda: kernel,
    )
    for _ in range(3):
        assert rec.reconcile_once(force=True).ok
    counts = {
        r: metrics.registry.get_sample_value("nodecryptor_rejected_claims_total", {"reason": r})
        for r in REASONS
    }
    assert counts["too-broad"] == 1 and counts["overlaps-local-node"] == 1
    assert sum(counts.values()) == 2
    assert "10.0.0.0/8" not in {str(d.prefix) for d in rec.last_desired.destinations}


def test_agent_knows_its_underlay_subnets_and_rejects_their_broadcast():
    from pyroute2 import IPRoute

    from nodecryptor.node import devices
    from nodecryptor.datapath.base import FakeDatapath
    from nodecryptor.core.model import Device
    from nodecryptor.agent.reconcile import Reconciler
    from nodecryptor.cluster.store import Store

    with IPRoute() as ipr:  # device detection reads the subnets of a device's addresses
        assert net("127.0.0.0/8") in devices._device(ipr, ifname="lo").networks

    store = Store()
    store.replace_all(trusted(W1, ciliumnode("evil", "192.168.50.255"), W2).values())
    wg = WgState(
        ifname="cilium_wg0",
        ifindex=9,
        present=True,
        up=True,
        mtu=1420,
        listen_port=51871,
        fwmark=0xE00,
        peers=(),
    )
    eth0 = Device("eth0", 2, 1500, networks=(net("192.168.50.0/24"),))
    rec = Reconciler(
        Settings(node_name="w1"),
        store,
        FakeDatapath(),
        Metrics(),
        read_wg=lambda name: wg,
        resolve_devices=lambda names, addrs, exclude: ((eth0,), []),
        read_sysctl=lambda name: {"all": 0, name: 0},
    )
    desired = rec.reconcile_once().desired
    assert "192.168.50.255/32" not in {str(d.prefix) for d in desired.destinations}
    assert "192.168.50.22/32" in {str(d.prefix) for d in desired.destinations}
    assert [(r.obj, r.reason) for r in desired.plan.rejected] == [("evil", "broadcast")]
