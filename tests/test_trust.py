"""Forged claims at plan level: what an attacker holding one node's Cilium service account can
write (any CiliumNode), and that none of it removes encryption a trusted source asks for or
adds a destination outside the cluster. Each test runs ``nodecryptor plan --json`` against the
fake API server, the path an operator uses, so it runs unchanged against older code: findings
1-4 and 6 of the trust review fail there (finding 5 is the condition, tests/test_trust_ghost.py).

The cluster: cp1 (control-plane), w1 (the local node), w2, each with a CiliumNode written by
its Cilium and a v1 Node written by its kubelet; pods in 10.244.0.0/16."""

from __future__ import annotations

import json
import re

import pytest

from nodecryptor.cli import main
from nodecryptor_testkit.fakeapi import FakeApiServer, make_ciliumnode, make_node

KEY = "nfG2tR0xq0XW3Ad7cW/0cO3tBj4M1M8s0lW2Ev4NQ1E="
POOL = "10.244.0.0/16"
NODES = {  # name: (control-plane, address, pod CIDR)
    "cp1": (True, "192.168.50.10", "10.244.0.0/24"),
    "w1": (False, "192.168.50.21", "10.244.1.0/24"),
    "w2": (False, "192.168.50.22", "10.244.2.0/24"),
}
HONEST = {"192.168.50.10/32", "10.244.0.0/24", "192.168.50.22/32", "10.244.2.0/24"}
"""What w1 encrypts towards in the honest cluster."""


def ciliumnode(name: str, address: str | None = None, pod_cidrs=None) -> dict:
    cp, ip, cidr = NODES.get(name, (False, address, None))
    obj = make_ciliumnode(
        name,
        ipv4=address or ip,
        control_plane=cp,
        wg_pub_key=KEY,
        pod_cidrs=[cidr] if pod_cidrs is None else pod_cidrs,
    )
    return obj


def honest(*skip: str, pod_cidrs_in_node: bool = False) -> list[dict]:
    out = []
    for name, (cp, ip, cidr) in NODES.items():
        if name not in skip:
            out.append(ciliumnode(name))
        node = make_node(name, control_plane=cp, ipv4=ip)
        if pod_cidrs_in_node:  # Kubernetes IPAM: the controller manager allocated it
            node["spec"].update(podCIDR=cidr, podCIDRs=[cidr])
        out.append(node)
    return out


def add_addresses(obj: dict, *ips: str) -> dict:
    obj["spec"]["addresses"] += [{"type": "InternalIP", "ip": ip} for ip in ips]
    return obj


@pytest.fixture
def plan(tmp_path, capsys):
    """``plan(objects, *flags) -> plan --json for w1`` against a fake API server."""
    servers = []

    def run(objects, *flags) -> dict:
        server = FakeApiServer(token="trust-test", objects=objects).start()
        servers.append(server)
        kc = server.write_kubeconfig(str(tmp_path / f"kc{len(servers)}"))
        rc = main(["plan", "--kubeconfig", kc, "--node-name", "w1", "--json", *flags])
        out = capsys.readouterr().out
        assert rc == 0, out
        return json.loads(out)

    yield run
    for server in servers:
        server.stop()


def prefixes(got: dict) -> set[str]:
    return {d["prefix"] for d in got["destinations"]}


def by_prefix(got: dict) -> dict[str, dict]:
    return {d["prefix"]: d for d in got["destinations"]}


def test_the_honest_cluster(plan):
    assert prefixes(plan(honest())) == HONEST


@pytest.mark.parametrize("flags", [(), ("--cluster-pod-cidrs", POOL)])
def test_finding_1_a_planted_host_route_removes_no_pod_cidr(plan, flags):
    """A /32 inside each other node's pod CIDR, from a CiliumNode no Node backs: every pod
    CIDR stays encrypted (longest-prefix match sends the /32 to its claimant's peer)."""
    ghost = ciliumnode("ghost", "192.168.50.99", ["10.244.0.7/32", "10.244.2.7/32"])
    got = plan(honest() + [ghost], *flags)
    assert HONEST <= prefixes(got)
    assert {r["reason"] for r in got["rejected"]} <= {"no-node-object"}


def test_finding_1_a_node_backed_attacker_neither(plan):
    attacker = ciliumnode(
        "w3", "192.168.50.23", ["10.244.3.0/24", "10.244.2.128/25", "10.244.0.0/22"]
    )
    got = plan(
        honest() + [attacker, make_node("w3", ipv4="192.168.50.23")], "--cluster-pod-cidrs", POOL
    )
    assert HONEST | {"192.168.50.23/32", "10.244.3.0/24"} <= prefixes(got)
    assert not [r for r in got["rejected"] if r.get("node") in ("cp1", "w2")]


def test_finding_2_hostile_entries_in_the_local_ciliumnode_remove_nothing(plan):
    """w1's own CiliumNode rewritten: the pool, the underlay subnet and the other nodes'
    addresses. Its Node names its address; the rewrite decides nothing."""
    forged = add_addresses(
        ciliumnode(
            "w1", pod_cidrs=["10.244.1.0/24", "10.0.0.0/8", "10.244.0.0/16", "192.168.50.0/24"]
        ),
        "192.168.50.10",
        "192.168.50.22",
    )
    got = plan([forged] + honest("w1"))
    assert prefixes(got) == HONEST
    assert got["local_addresses"] == ["192.168.50.21"]
    assert not [r for r in got["rejected"] if r["reason"] == "overlaps-local-node"]


@pytest.mark.parametrize(
    "outside", ["8.8.8.8", "192.168.50.1", "10.96.0.1", "10.96.0.10", "203.0.113.5"]
)
def test_finding_3_non_cluster_addresses_are_never_destinations(plan, outside):
    """A public resolver, the gateway, the API VIP, kube-dns, an outside client: claimed as
    w2's node address (w2's CiliumNode rewritten) or by a Node-less CiliumNode."""
    forged = add_addresses(ciliumnode("w2"), outside)
    ghost = ciliumnode("ghost", outside, [])
    got = plan(honest("w2") + [forged, ghost])
    assert outside + "/32" not in prefixes(got)
    assert prefixes(got) == HONEST
    reasons = {(r["node"], r["value"], r["reason"]) for r in got["rejected"]}
    assert ("w2", outside, "not-in-node-status") in reasons
    assert ("ghost", outside, "no-node-object") in reasons


def test_finding_3_non_cluster_pod_cidrs_are_never_destinations_with_pools(plan):
    forged = ciliumnode("w2", pod_cidrs=["10.244.2.0/24", "8.8.8.0/24", "192.168.60.0/24"])
    got = plan(honest("w2") + [forged], "--cluster-pod-cidrs", POOL)
    assert prefixes(got) == HONEST
    assert {(r["value"], r["reason"]) for r in got["rejected"]} == {
        ("8.8.8.0/24", "outside-cluster-pod-cidrs"),
        ("192.168.60.0/24", "outside-cluster-pod-cidrs"),
    }


def test_finding_4_a_deleted_ciliumnode_keeps_what_the_node_lists(plan):
    """w2's CiliumNode deleted (or never written): its Node's address stays encrypted; with
    Kubernetes IPAM its pod CIDR too."""
    got = plan(honest("w2", pod_cidrs_in_node=True))
    assert prefixes(got) == HONEST


def test_finding_4_a_rewritten_ciliumnode_keeps_what_the_node_lists(plan):
    emptied = ciliumnode("w2", pod_cidrs=[])
    emptied["spec"]["addresses"] = []
    got = plan(honest("w2", pod_cidrs_in_node=True) + [emptied])
    assert prefixes(got) == HONEST


def test_finding_4_no_address_moves_between_roles(plan):
    """A worker's address written into the control-plane node's CiliumNode gains no
    exemption; the control-plane address moved into a worker's CiliumNode keeps its own."""
    cp_forged = add_addresses(ciliumnode("cp1"), "192.168.50.22")
    w2_forged = ciliumnode("w2", address="192.168.50.10")
    got = by_prefix(plan(honest("cp1", "w2") + [cp_forged, w2_forged]))
    assert got["192.168.50.22/32"]["node"] == "w2"
    assert got["192.168.50.22/32"]["exempt_ports"] == []
    assert got["192.168.50.10/32"]["node"] == "cp1"
    assert got["192.168.50.10/32"]["control_plane"] is True
    assert {(r["first"], r["last"]) for r in got["192.168.50.10/32"]["exempt_ports"]} == {
        (2379, 2380),
        (6443, 6443),
    }


def test_pools_come_from_ciliums_configmap(plan):
    """Without the flag, the pools are Cilium's own (cilium-config, cluster-pool IPAM, two
    IPv4 ranges separated by a space): a claim outside them is refused."""
    config = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cilium-config", "namespace": "kube-system"},
        "data": {"cluster-pool-ipv4-cidr": f"{POOL} 10.245.0.0/16"},
    }
    forged = ciliumnode("w2", pod_cidrs=["10.244.2.0/24", "10.245.7.0/24", "172.20.0.0/24"])
    got = plan(honest("w2") + [forged, config])
    assert got["pools"]["cidrs"] == [POOL, "10.245.0.0/16"]
    assert prefixes(got) == HONEST | {"10.245.7.0/24"}
    assert {(r["value"], r["reason"]) for r in got["rejected"]} == {
        ("172.20.0.0/24", "outside-cluster-pod-cidrs")
    }


def test_pools_from_ciliumpodippools_and_a_missing_configmap_is_reported(plan):
    pool = {
        "apiVersion": "cilium.io/v2alpha1",
        "kind": "CiliumPodIPPool",
        "metadata": {"name": "default"},
        "spec": {"ipv4": {"cidrs": [POOL]}},
    }
    forged = ciliumnode("w2", pod_cidrs=["10.244.2.0/24", "172.20.0.0/24"])
    got = plan(honest("w2") + [forged, pool])
    assert got["pools"] == {"cidrs": [POOL], "source": "cilium", "problem": ""}
    assert "172.20.0.0/24" not in prefixes(got)
    got = plan(honest())
    assert got["pools"]["cidrs"] == [] and "cilium-config not found" in got["pools"]["problem"]


def test_finding_6_an_oversized_object_is_rejected_whole(plan):
    """A CiliumNode with a huge spec.ipam.pool (Cilium's schema allows it) is not parsed."""
    bloated = ciliumnode("w2")
    bloated["spec"]["ipam"]["pool"] = {
        f"10.244.{i // 256 % 256}.{i % 256}": {"owner": "x" * 40} for i in range(12000)
    }
    got = plan(honest("w2", pod_cidrs_in_node=True) + [bloated])
    assert prefixes(got) == HONEST  # w2's Node still names its address and pod CIDR
    oversized = [r for r in got["rejected"] if r["reason"] == "oversized"]
    assert len(oversized) == 1 and oversized[0]["node"] == "w2"
    assert re.fullmatch(r"\d+ bytes", oversized[0]["value"])
