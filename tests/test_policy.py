import dataclasses
import ipaddress

import pytest

from nodecryptor.policy.ciliumnode import parse_ciliumnode
from nodecryptor.core.model import Device, WgPeer, WgState
from nodecryptor.core.ports import parse_port_spec
from nodecryptor.policy.plan import (
    compute_desired,
    compute_plan,
    effective_wg_payload,
    uncovered_destinations,
    wg_mark_match,
)
from nodecryptor.core.settings import Settings

from tests.cilium_objects import (
    CP_LABEL,
    K3S_CP,
    KUBEADM_CP,
    LEGACY_MASTER,
    NO_PODCIDRS,
    W1,
    W2,
    ciliumnode,
    copy_of,
)


def snapshot(*objs):
    """NodeInfo by name, each with a v1 Node carrying the same labels and addresses as its
    CiliumNode (the trusted source; tests/test_admission.py covers the two sources disagreeing)."""
    out = {}
    for obj in objs:
        info, _ = parse_ciliumnode(obj)
        out[info.name] = dataclasses.replace(
            info, node_labels=info.labels, node_addresses=info.addresses
        )
    return out


SETTINGS = Settings(node_name="w1")
BUILTIN_RANGES = [
    {"protocol": "tcp", "first": 2379, "last": 2380, "policy": "control-plane-bootstrap"},
    {"protocol": "tcp", "first": 6443, "last": 6443, "policy": "control-plane-bootstrap"},
]


def dest(prefix, node, kind, control_plane, exempt=()):
    return {
        "prefix": prefix,
        "node": node,
        "kind": kind,
        "control_plane": control_plane,
        "exempt_ports": list(exempt),
    }


def test_worker_plan_matches_the_contract():
    plan = compute_plan(snapshot(KUBEADM_CP, W1, W2), "w1", SETTINGS)
    assert plan.to_json() == {
        "node": "w1",
        "role": "worker",
        "local_addresses": ["192.168.50.21", "fd50::21"],
        "destinations": [
            dest("10.244.0.0/24", "cp1", "pod-cidr", True),
            dest("10.244.2.0/24", "w2", "pod-cidr", False),
            dest("192.168.50.10/32", "cp1", "node-ip", True, BUILTIN_RANGES),
            dest("192.168.50.22/32", "w2", "node-ip", False),
            dest("fd00:10:244::/64", "cp1", "pod-cidr", True),
            dest("fd00:10:244:2::/64", "w2", "pod-cidr", False),
            dest("fd50::10/128", "cp1", "node-ip", True, BUILTIN_RANGES),
            dest("fd50::22/128", "w2", "node-ip", False),
        ],
        "exempt_ports": [
            {"protocol": "tcp", "first": 2379, "last": 2380},
            {"protocol": "tcp", "first": 6443, "last": 6443},
        ],
        "serves": [],
        "rejected": [],
    }


@pytest.mark.parametrize(
    "obj,expected_role",
    [
        (KUBEADM_CP, "control-plane"),  # kubeadm: label present with an empty value
        (K3S_CP, "control-plane"),  # k3s: "true"
        (LEGACY_MASTER, "control-plane"),  # legacy master label
        (W1, "worker"),
    ],
)
def test_role_is_label_presence(obj, expected_role):
    name = obj["metadata"]["name"]
    assert compute_plan(snapshot(obj, W2), name, Settings(node_name=name)).role == expected_role


def test_configurable_selector():
    obj = ciliumnode("edge-cp", "192.168.60.1", labels={"example.com/cp": "yes"})
    settings = Settings(node_name="w1", control_plane_labels=("example.com/cp",))
    plan = compute_plan(snapshot(obj, W1, KUBEADM_CP), "w1", settings)
    cp_nodes = {d.node for d in plan.destinations if d.control_plane}
    assert cp_nodes == {"edge-cp"}  # the kubeadm label no longer counts


def test_address_types_setting_and_internal_ips_excluded_by_default():
    plan = compute_plan(snapshot(KUBEADM_CP, W1), "w1", SETTINGS)
    assert ipaddress.ip_network("10.244.0.5/32") not in {d.prefix for d in plan.destinations}
    settings = Settings(node_name="w1", address_types=("InternalIP", "CiliumInternalIP"))
    plan = compute_plan(snapshot(KUBEADM_CP, W1), "w1", settings)
    assert ipaddress.ip_network("10.244.0.5/32") in {d.prefix for d in plan.destinations}
    assert "10.244.1.9" in {str(a) for a in plan.local_addresses}


def test_missing_podcidrs_and_unknown_local_node():
    plan = compute_plan(snapshot(NO_PODCIDRS, W2), "ghost", SETTINGS)
    assert not plan.local_known and plan.role == "worker" and plan.local_addresses == ()
    assert {str(d.prefix) for d in plan.destinations if d.node == "w3"} == {"192.168.50.23/32"}


def test_local_prefixes_never_become_destinations():
    """A stale object claims w1's address and pod CIDR; w1's Node lists the address and the
    kernel routes the pod CIDR (Cilium's route over cilium_host)."""
    stale = ciliumnode("w1-old", "192.168.50.21", None, ["10.244.1.0/24"])
    plan = compute_plan(
        snapshot(W1, stale, W2),
        "w1",
        SETTINGS,
        kernel_prefixes=[ipaddress.ip_network("10.244.1.0/24")],
    )
    prefixes = {str(d.prefix) for d in plan.destinations}
    assert "192.168.50.21/32" not in prefixes and "10.244.1.0/24" not in prefixes


def test_a_worker_claiming_a_control_plane_address_cannot_switch_its_exemption_off():
    # This used to turn the exemption off (bootstrap broke).
    worker_with_cp_ip = ciliumnode("w9", "192.168.50.10", None, [])
    plan = compute_plan(snapshot(KUBEADM_CP, worker_with_cp_ip, W1), "w1", SETTINGS)
    dest = [d for d in plan.destinations if str(d.prefix) == "192.168.50.10/32"]
    assert len(dest) == 1 and dest[0].control_plane is True and dest[0].node == "cp1"
    assert [(r.obj, r.reason) for r in plan.rejected] == [("w9", "duplicate-claim")]


def test_prefixes_are_normalised():
    odd = ciliumnode("w5", "192.168.50.25", None, ["10.250.3.7/24", "fd00:99::1/64"])
    plan = compute_plan(snapshot(odd, W1), "w1", SETTINGS)
    assert {"10.250.3.0/24", "fd00:99::/64"} <= {str(d.prefix) for d in plan.destinations}


def test_exempt_ports_come_from_settings():
    settings = Settings(node_name="w1", exempt_ports=parse_port_spec("6443,udp/8472"))
    plan = compute_plan(snapshot(W1), "w1", settings)
    assert [p.to_json() for p in plan.exempt_ports] == [
        {"protocol": "tcp", "first": 6443, "last": 6443},
        {"protocol": "udp", "first": 8472, "last": 8472},
    ]


def test_order_is_deterministic():
    a = compute_plan(snapshot(W2, KUBEADM_CP, W1), "w1", SETTINGS)
    b = compute_plan(snapshot(W1, W2, KUBEADM_CP), "w1", SETTINGS)
    assert a.to_json() == b.to_json()


def wg(peers=None, mtu=1420, fwmark=0xE00):
    return WgState(
        ifname="cilium_wg0",
        ifindex=7,
        present=True,
        up=True,
        mtu=mtu,
        listen_port=51871,
        fwmark=fwmark,
        peers=peers,
    )


def test_uncovered_destinations():
    plan = compute_plan(snapshot(KUBEADM_CP, W1, W2), "w1", SETTINGS)
    peers = (
        WgPeer(
            "k1",
            tuple(
                ipaddress.ip_network(n)
                for n in ("192.168.50.22/32", "10.244.2.0/24", "fd50::22/128", "fd00:10:244:2::/64")
            ),
        ),
        WgPeer("k2", (ipaddress.ip_network("192.168.50.0/24"),)),
    )  # a supernet covers cp1
    uncovered = uncovered_destinations(plan.destinations, wg(peers))
    assert {str(p) for p in uncovered} == {"10.244.0.0/24", "fd00:10:244::/64", "fd50::10/128"}
    assert uncovered_destinations(plan.destinations, wg(None)) == frozenset()  # unknown ≠ none


def test_mss_and_payload_follow_design_formula():
    # IPv4 underlay MTU 1500, WireGuard MTU 1420: min(1420, 1500-60-15=1425) = 1420
    assert effective_wg_payload(1420, 1500, ipv6_outer=False) == 1420
    # IPv6 outer: 1500-80-15 = 1405 < 1420
    assert effective_wg_payload(1420, 1500, ipv6_outer=True) == 1405
    plan = compute_plan(snapshot(KUBEADM_CP, W1), "w1", SETTINGS)
    peers = (WgPeer("k", (), endpoint="192.168.50.10:51871"),)
    d = compute_desired(plan, wg(peers), [Device("eth0", 2, 1500)], SETTINGS)
    assert (d.mss_v4, d.mss_v6, d.max_packet_v4) == (1380, 1360, 1420)
    peers6 = (WgPeer("k", (), endpoint="[fd50::10]:51871"),)
    d6 = compute_desired(plan, wg(peers6), [Device("eth0", 2, 1500)], SETTINGS)
    assert (d6.mss_v4, d6.mss_v6) == (1365, 1345)
    # a smaller underlay MTU lowers the clamp even though the WireGuard MTU was not adjusted
    small = compute_desired(plan, wg(peers), [Device("eth0", 2, 1400)], SETTINGS)
    assert small.mss_v4 == 1400 - 60 - 15 - 40


@pytest.mark.parametrize(
    "fwmark,expected",
    [
        (0, (0x0E00, 0x0F00)),
        (0x0E00, (0x0E00, 0x0F00)),
        (0x1E00, (0x0E00, 0x0F00)),
        (0x4200, (0x4200, 0xFFFFFFFF)),
    ],
)
def test_wireguard_mark_match(fwmark, expected):
    assert wg_mark_match(fwmark) == expected


def test_desired_state_is_a_value():
    plan = compute_plan(snapshot(KUBEADM_CP, W1), "w1", SETTINGS)
    a = compute_desired(plan, wg(()), [Device("eth0", 2, 1500)], SETTINGS)
    b = compute_desired(plan, wg(()), [Device("eth0", 2, 1500)], SETTINGS)
    assert a == b and hash(a.plan) == hash(b.plan)
    cp = copy_of(KUBEADM_CP)
    cp["metadata"]["labels"].pop(CP_LABEL)
    plan2 = compute_plan(snapshot(cp, W1), "w1", SETTINGS)
    assert compute_desired(plan2, wg(()), [Device("eth0", 2, 1500)], SETTINGS) != a
