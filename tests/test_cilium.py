"""policy/cilium.py: what is concluded about Cilium from observed facts, and what follows."""

from __future__ import annotations

import ipaddress

from nodecryptor.policy import cilium
from nodecryptor.core.model import KIND_POD_CIDR, WgPeer, WgState
from nodecryptor.policy.plan import compute_desired, compute_plan
from nodecryptor.core.settings import Settings
from tests import datapath_cases as dc

N = ipaddress.ip_network
A = ipaddress.ip_address


def _wg(*peers, mtu=1420, present=True):
    return WgState(
        ifname="cilium_wg0",
        ifindex=7,
        present=present,
        up=present,
        mtu=mtu,
        listen_port=51871,
        fwmark=0xE00,
        peers=tuple(peers) if peers or present else None,
    )


NODE_IPS = [A("192.168.50.22"), A("fd00:50::22")]
PODS = [N("10.244.2.0/24"), N("fd00:244:2::/64")]
NATIVE = WgPeer("k", (N("192.168.50.22/32"), N("fd00:50::22/128"), *PODS), "192.168.50.22:51871")
TUNNEL = WgPeer("k", (N("192.168.50.22/32"), N("fd00:50::22/128")), "192.168.50.22:51871")
OLD = WgPeer("k", tuple(PODS), "192.168.50.22:51871")  # before cilium/cilium#30975


def test_native_routing_from_allowed_ips():
    f = cilium.detect(_wg(NATIVE), (), NODE_IPS, PODS)
    assert (f.routing_mode, f.node_ips_in_allowed_ips) == ("native", True)
    assert "pod CIDRs" in f.routing_mode_source
    assert (f.wg_port, f.wg_fwmark, f.wg_mtu) == (51871, 0xE00, 1420)
    assert cilium.readiness_problem(f) is None


def test_tunnel_mode_is_decided_by_the_tunnel_device():
    f = cilium.detect(_wg(TUNNEL), ("cilium_vxlan",), NODE_IPS, PODS)
    assert f.routing_mode == "tunnel" and f.tunnel_device == "cilium_vxlan"
    assert "node addresses only" in f.routing_mode_source
    g = cilium.detect(_wg(TUNNEL), ("cilium_geneve",), NODE_IPS, PODS)
    assert g.routing_mode == "tunnel" and g.tunnel_device == "cilium_geneve"


def test_node_only_allowed_ips_without_tunnel_device_stay_native():
    """Native routing with per-pod allowed-IPs and no remote pod yet looks like this: taking it
    for tunnel mode would remove pod CIDRs from the destinations and let host traffic to the
    first new remote pod leave in the clear."""
    f = cilium.detect(_wg(TUNNEL), (), NODE_IPS, PODS)
    assert f.routing_mode == "native" and "node addresses only" in f.routing_mode_source
    d = dc.desired_for(dc.CASES_BY_ID["v4-node-to-remote-pod"])
    assert any(x.kind == KIND_POD_CIDR for x in d.destinations)


def test_node_ips_missing_from_allowed_ips_is_not_ready():
    f = cilium.detect(_wg(OLD), (), NODE_IPS, PODS)
    assert f.node_ips_in_allowed_ips is False and f.routing_mode == "native"
    problem = cilium.readiness_problem(f)
    assert "cilium/cilium#30975" in problem and "cilium_wg0" in problem
    assert f.to_json()["node_ips_in_allowed_ips"] is False


def test_unknown_without_peers_is_not_a_readiness_problem():
    f = cilium.detect(_wg(), (), NODE_IPS, PODS)
    assert f.node_ips_in_allowed_ips is None and f.routing_mode == "native"
    assert cilium.readiness_problem(f) is None
    absent = cilium.detect(WgState(ifname="cilium_wg0"), ())
    assert absent.wg_port == 51871 and "default" in absent.wg_port_source


def test_status_without_cluster_uses_endpoints():
    assert cilium.detect(_wg(TUNNEL), ("cilium_vxlan",)).routing_mode == "tunnel"
    assert "node addresses only" in cilium.detect(_wg(TUNNEL)).routing_mode_source
    assert cilium.detect(_wg(NATIVE)).routing_mode == "native"
    assert "wider than hosts" in cilium.detect(_wg(NATIVE)).routing_mode_source
    f = cilium.detect(_wg(OLD))
    assert f.node_ips_in_allowed_ips is False and "endpoint" in f.node_ips_source


def test_json_contract():
    j = cilium.detect(_wg(NATIVE), (), NODE_IPS, PODS).to_json()
    for key in ("routing_mode", "wg_port", "wg_fwmark", "wg_mtu", "node_ips_in_allowed_ips"):
        assert key in j and key in j["sources"]
    assert isinstance(j["node_ips_in_allowed_ips"], bool)


def test_apply_native_keeps_pod_cidrs_and_hands_local_ones_to_cilium():
    d = dc.desired_for(dc.CASES_BY_ID["v4-pod-to-remote-pod-cilium"])
    assert set(d.cilium_pod_cidrs) == {N("10.244.1.0/24"), N("fd00:244:1::/64")}
    assert any(x.kind == KIND_POD_CIDR for x in d.destinations)
    taken = dc.desired_for(dc.CASES_BY_ID["v4-pod-to-remote-pod-taken-over"])
    assert taken.cilium_pod_cidrs == ()


def test_apply_tunnel_drops_pod_cidrs_and_reports_none_uncovered():
    case = dc.CASES_BY_ID["v4-tunnel-pod-cidr-not-dropped"]
    settings = dc.settings_for(case)
    plan = compute_plan(dc.snapshot(), "w1", settings)
    wg = dc.wg_state_for(case)
    raw = compute_desired(plan, wg, (dc.UNDERLAY,), settings)
    assert any(p.prefixlen == 24 for p in raw.uncovered)  # what tunnel mode used to look like
    d = dc.desired_for(case)
    assert d.cilium.routing_mode == "tunnel"
    assert d.uncovered == frozenset()
    assert all(x.kind != KIND_POD_CIDR for x in d.destinations)
    assert d.cilium_pod_cidrs == ()


def test_mss_for_wg_mtu_1405_on_1500():
    d = dc.desired_for(dc.CASES_BY_ID["v4-syn-mss-clamped-wg-mtu-1405"])
    assert (d.mss_v4, d.mss_v6, d.max_packet_v4) == (1365, 1345, 1405)
    assert d.cilium.wg_mtu == 1405


def test_take_over_setting_from_flag():
    from nodecryptor.cli import build_parser
    from nodecryptor.commands.common import settings_from_args

    p = build_parser()
    assert (
        settings_from_args(p.parse_args(["run", "--node-name", "n"])).take_over_pod_to_pod is False
    )
    assert settings_from_args(
        p.parse_args(["run", "--node-name", "n", "--take-over-pod-to-pod"])
    ).take_over_pod_to_pod
    assert Settings().take_over_pod_to_pod is False


def test_hostile_local_pod_cidrs_are_never_handed_to_cilium():
    """The local CiliumNode is writable by every Cilium agent. A local "pod CIDR" that holds
    one of the node's own addresses, or one broader than the admission limit, would make host
    traffic to remote pods pass to Cilium (which does not encrypt it): such ranges are kept
    out of the hand-over, so that traffic stays encrypted."""
    import dataclasses

    from nodecryptor.policy.admission import Limits

    d = dc.desired_for(dc.CASES_BY_ID["v4-pod-to-remote-pod-cilium"])
    local_v4 = next(a for a in d.plan.local_addresses if a.version == 4)
    covering = ipaddress.ip_network(f"{local_v4}/24", strict=False)
    broad = N("10.0.0.0/12")
    honest = N("10.244.1.0/24")
    plan = dataclasses.replace(d.plan, local_pod_cidrs=(covering, broad, honest))
    facts = d.cilium
    got = cilium.cilium_pod_cidrs(plan, facts, False, Limits())
    assert got == (honest,)
    assert cilium.cilium_pod_cidrs(plan, facts, True, Limits()) == ()
