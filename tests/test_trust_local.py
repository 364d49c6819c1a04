"""The local node's own prefixes (``policy.plan.localize``): from its Node and its kernel, never
only from its CiliumNode, which any node's Cilium may rewrite."""

from __future__ import annotations

import ipaddress

from nodecryptor.core.model import NodeInfo
from nodecryptor.core.settings import Settings
from nodecryptor.policy.plan import compute_plan

net = ipaddress.ip_network
addr = ipaddress.ip_address
SETTINGS = Settings(node_name="w1")


def node(name, ip, pod, node_backed=True, **kw):
    pair = (("InternalIP", addr(ip)),)
    return NodeInfo(
        name,
        addresses=pair,
        pod_cidrs=(net(pod),),
        node_labels=(),
        node_addresses=pair if node_backed else None,
        **kw,
    )


def cluster(*extra):
    base = [
        node("w1", "192.168.50.21", "10.244.1.0/24"),
        node("w2", "192.168.50.22", "10.244.2.0/24"),
    ]
    return {n.name: n for n in [*base, *extra]}


def prefixes(plan):
    return {str(d.prefix) for d in plan.destinations}


def reasons(plan):
    return {(r.obj, r.value, r.reason) for r in plan.rejected}


def test_a_route_shown_by_the_kernel_protects_the_local_pod_cidr():
    """A ghost plants w1's pod address: with Cilium's route to 10.244.1.0/24 in the kernel the
    claim is refused on w1; the underlay subnet the kernel also shows is not treated as local
    (the other nodes live there)."""
    ghost = node("ghost", "192.168.50.99", "10.244.1.10/32", node_backed=False)
    kernel = [net("10.244.1.0/24"), net("192.168.50.0/24"), net("192.168.50.21/32")]
    plan = compute_plan(cluster(ghost), "w1", SETTINGS, kernel_prefixes=kernel)
    assert prefixes(plan) == {"192.168.50.22/32", "10.244.2.0/24"}
    assert ("ghost", "10.244.1.10/32", "overlaps-local-node") in reasons(plan)
    assert plan.local_pod_cidrs == (net("10.244.1.0/24"),)


def test_without_the_kernel_the_local_ciliumnode_loses_every_conflict():
    """Only the local CiliumNode names the pod CIDR: a conflicting remote claim wins (it is
    encrypted); the local entry is reported and not treated as local."""
    ghost = node("ghost", "192.168.50.99", "10.244.1.10/32", node_backed=False)
    plan = compute_plan(cluster(ghost), "w1", SETTINGS)
    assert "10.244.1.10/32" in prefixes(plan)
    assert ("w1", "10.244.1.0/24", "local-claim-conflicts") in reasons(plan)
    assert plan.local_pod_cidrs == ()


def test_a_broad_kernel_prefix_is_not_a_local_pod_cidr():
    """A kernel route broader than the pod limit (a /8 on some bridge) shields nothing."""
    plan = compute_plan(cluster(), "w1", SETTINGS, kernel_prefixes=[net("10.0.0.0/8")])
    assert prefixes(plan) == {"192.168.50.22/32", "10.244.2.0/24"}
