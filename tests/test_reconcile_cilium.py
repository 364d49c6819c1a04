"""The reconciler applies what nodecryptor/policy/cilium.py concludes: local pod CIDRs handed to the
datapath as Cilium's own, pod CIDRs dropped in tunnel mode, not ready without node addresses in
the peers' allowed-IPs."""

import ipaddress

from nodecryptor.policy.ciliumnode import parse_ciliumnode
from nodecryptor.datapath.base import FakeDatapath
from nodecryptor.observe.metrics import Metrics
from nodecryptor.core.model import KIND_POD_CIDR, Device, WgPeer, WgState
from nodecryptor.agent.reconcile import Reconciler
from nodecryptor.core.settings import Settings
from nodecryptor.cluster.store import Store
from tests.cilium_objects import KUBEADM_CP, W1, W2

N = ipaddress.ip_network


def _nodes():
    return [parse_ciliumnode(o)[0] for o in (KUBEADM_CP, W1, W2)]


def _peers(with_nodes: bool, with_pods: bool):
    peers = []
    for node in _nodes():
        if node.name == "w1":
            continue
        allowed = []
        if with_nodes:
            allowed += [N(a) for kind, a in node.addresses if kind == "InternalIP"]
        if with_pods:
            allowed += list(node.pod_cidrs)
        peers.append(
            WgPeer(
                node.name,
                tuple(allowed),
                f"{[a for _, a in node.addresses if a.version == 4][0]}:51871",
            )
        )
    return tuple(peers)


def make(peers, tunnel=(), take_over=False):
    store = Store()
    wg = WgState(
        ifname="cilium_wg0",
        ifindex=9,
        present=True,
        up=True,
        mtu=1405,
        listen_port=51871,
        fwmark=0xE00,
        peers=peers,
    )
    rec = Reconciler(
        Settings(node_name="w1", take_over_pod_to_pod=take_over),
        store,
        FakeDatapath(),
        Metrics(),
        read_wg=lambda name: wg,
        resolve_devices=lambda names, addrs, exclude: ((Device("eth0", 2, 1500),), []),
        read_sysctl=lambda name: {"all": 0, name: 0},
        read_tunnel=lambda: tunnel,
    )
    store.replace_all(_nodes())
    assert rec.reconcile_once().ok
    return rec


def test_native_hands_local_pod_cidrs_to_cilium():
    rec = make(_peers(True, True))
    d = rec.datapath.current
    local = next(n for n in _nodes() if n.name == "w1")
    assert set(d.cilium_pod_cidrs) == set(local.pod_cidrs) and d.cilium_pod_cidrs
    assert d.cilium.routing_mode == "native"
    assert rec.ready() == (True, "synced, applied and attached")
    assert make(_peers(True, True), take_over=True).datapath.current.cilium_pod_cidrs == ()


def test_tunnel_mode_has_no_pod_destinations_and_nothing_uncovered():
    rec = make(_peers(True, False), tunnel=("cilium_vxlan",))
    d = rec.datapath.current
    assert d.cilium.routing_mode == "tunnel"
    assert not [x for x in d.destinations if x.kind == KIND_POD_CIDR]
    assert d.uncovered == frozenset() and d.cilium_pod_cidrs == ()
    assert rec.ready()[0] is True


def test_not_ready_without_node_addresses_in_allowed_ips():
    rec = make(_peers(False, True))
    ready, reason = rec.ready()
    assert ready is False
    assert "cilium/cilium#30975" in reason and "cilium_wg0" in reason
