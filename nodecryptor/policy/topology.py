"""The topology compiler: cluster objects in, the cluster's encrypted destinations out.

``compile_topology`` is one pure function from what the API server holds (CiliumNodes, v1
Nodes, the cluster's pod pools, the settings) to the prefixes nodecryptor encrypts towards,
each with the node it belongs to, its kind and its control-plane bit, plus every claim it
refused and why. It knows nothing of the node it runs on: the same result holds on every node
(the local node's own prefixes are taken out afterwards, by ``policy.plan.localize``).

Each fact comes from the one source its subject cannot forge:

- **Node addresses** from the v1 Node's ``status.addresses``: only that node's kubelet may
  write them (the NodeRestriction admission plugin). An address a CiliumNode claims that its
  Node does not list is refused (``not-in-node-status``; ``no-node-object`` when there is no
  Node of that name at all). A node whose CiliumNode vanished keeps its Node's addresses.
- **Pod CIDRs** from ``Node.spec.podCIDRs`` when Kubernetes allocates them; a CiliumNode's pod
  CIDR claim is a destination when it lies inside the cluster's pod pools (Cilium's
  configuration or ``--cluster-pod-cidrs``, which only administrators write), because
  encrypting the cluster's own pod space is always safe. Claims of different nodes inside the
  pools may overlap: all stay destinations, and longest-prefix match sends each packet to the
  most specific claimant's peer. No claim is ever removed because of a neighbour's claim.
- **Roles and exemption selectors** from the v1 Node's labels (see ``plan.is_control_plane``).

A refused claim never removes encryption another trusted fact asks for, and never adds a
destination outside space a trusted source proves is the cluster's (where no pool is known,
the breadth limit is the only bound on pod CIDRs, and the topology says so in ``pools``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from nodecryptor.core.model import (
    KIND_NODE_IP,
    KIND_POD_CIDR,
    IPNetwork,
    NodeInfo,
    PodPools,
    Rejection,
)
from nodecryptor.core.settings import RoleSource, Settings
from nodecryptor.policy.admission import (
    FIELD_ADDRESSES,
    FIELD_NODE_ADDRESSES,
    FIELD_NODE_POD_CIDRS,
    FIELD_POD_CIDRS,
    Claim,
    Limits,
    duplicates,
)
from nodecryptor.policy.exemptions import trusted_labels


@dataclass(frozen=True)
class Topology:
    """The cluster's destinations as every node sees them, before the local node's view."""

    admitted: tuple[tuple[Claim, ...], ...]
    """Admitted claims grouped by prefix (several nodes may claim one prefix), sorted."""
    rejected: tuple[Rejection, ...]
    """Refused claims and reported conflicts, in a stable order."""
    pools: PodPools = PodPools()
    """The pod pools the pod CIDR claims were checked against."""


def limits_of(settings: Settings, pools: PodPools = PodPools()) -> Limits:
    """Admission limits: the breadth limits, and the pod pools (the flag wins over Cilium's
    configuration)."""
    cidrs = tuple(settings.cluster_pod_cidrs) or tuple(pools.cidrs)
    return Limits(
        min_prefix_v4=settings.pod_cidr_min_prefix_v4,
        min_prefix_v6=settings.pod_cidr_min_prefix_v6,
        cluster_pod_cidrs=cidrs,
    )


def effective_pools(settings: Settings, pools: PodPools | None) -> PodPools:
    if settings.cluster_pod_cidrs:
        return PodPools(tuple(settings.cluster_pod_cidrs), "flag")
    return pools if pools is not None else PodPools(problem="pod pools not read")


def is_control_plane(
    node: NodeInfo, selector_labels, role_source: RoleSource = RoleSource.NODE
) -> bool:
    """Control-plane when any selector label is present, whatever its value: kubeadm sets
    ``node-role.kubernetes.io/control-plane=""``, k3s sets ``"true"``.

    The labels come from the trusted source (``Settings.role_source``): by default the v1
    Node's (``node.node_labels``, None until that Node is known: a worker, so its traffic is
    encrypted); with ``ciliumnode`` the CiliumNode's own labels."""
    labels = trusted_labels(node, role_source)
    return any(label in labels for label in selector_labels)


def node_is_control_plane(node: NodeInfo, settings: Settings) -> bool:
    return is_control_plane(node, settings.control_plane_labels, settings.role_source)


def trusted_addresses(node: NodeInfo, address_types) -> list:
    """The node's addresses of the wanted types as its v1 Node lists them (empty while the
    Node is unknown)."""
    wanted = set(address_types)
    seen: list = []
    for kind, addr in node.node_addresses or ():
        if kind in wanted and addr not in seen:
            seen.append(addr)
    return seen


def pod_cidr_verdict(
    cidr: IPNetwork, limits: Limits, node_pod_cidrs: tuple[IPNetwork, ...]
) -> tuple[str, str] | None:
    """None when a CiliumNode's pod CIDR claim may be a destination, else (reason, detail).
    Inside the Node's own spec.podCIDRs: yes. Broader than the limit: no. Inside the pools
    (when the family has one): yes; outside: no. No pool for the family: yes, unless
    Kubernetes allocates this node's pod CIDRs (then the Node's list is the whole truth)."""
    if any(cidr.version == n.version and cidr.subnet_of(n) for n in node_pod_cidrs):
        return None
    limit = limits.min_prefix(cidr.version)
    if cidr.prefixlen < limit:
        return (
            "too-broad",
            f"/{cidr.prefixlen} is broader than the IPv{cidr.version} limit /{limit}",
        )
    ranges = [r for r in limits.cluster_pod_cidrs if r.version == cidr.version]
    if ranges:
        if any(cidr.subnet_of(r) for r in ranges):
            return None
        return "outside-cluster-pod-cidrs", "not inside " + ", ".join(map(str, ranges))
    if node_pod_cidrs:
        return "not-in-node-spec", (
            "not among the Node's spec.podCIDRs " + ", ".join(map(str, node_pod_cidrs))
        )
    return None


def compile_topology(
    snapshot: Mapping[str, NodeInfo], settings: Settings, pools: PodPools | None = None
) -> Topology:
    """Every node's destinations in ``snapshot`` (NodeInfo by name, with the v1 Node's facts
    merged in), checked against the trusted sources described in the module doc."""
    pools = effective_pools(settings, pools)
    limits = limits_of(settings, pools)
    claims: list[Claim] = []
    rejected: list[Rejection] = []
    # Every address a Node lists: a pod CIDR no pool vouches for must not contain one (pods
    # and node addresses never share space unless the administrator's pools say so).
    node_ips = [
        (a, n)
        for n in sorted(snapshot)
        for a in trusted_addresses(snapshot[n], settings.address_types)
    ]
    for name in sorted(snapshot):
        node = snapshot[name]
        cp = node_is_control_plane(node, settings)
        trusted = trusted_addresses(node, settings.address_types)
        for addr in trusted:
            claims.append(
                Claim(name, FIELD_NODE_ADDRESSES, KIND_NODE_IP, ipaddress.ip_network(addr), cp)
            )
        for kind, addr in node.addresses if node.has_ciliumnode else ():
            if kind not in settings.address_types or addr in trusted:
                continue
            if node.node_addresses is None:
                reason, detail = "no-node-object", "no v1 Node of this name lists it"
            else:
                reason, detail = "not-in-node-status", "the Node's status.addresses do not list it"
            rejected.append(Rejection(name, FIELD_ADDRESSES, str(addr), detail, reason))
        for cidr in dict.fromkeys(node.node_pod_cidrs):
            claims.append(Claim(name, FIELD_NODE_POD_CIDRS, KIND_POD_CIDR, cidr, cp))
        for cidr in dict.fromkeys(node.pod_cidrs if node.has_ciliumnode else ()):
            if cidr in node.node_pod_cidrs:
                continue  # the same fact from the trusted source
            verdict = pod_cidr_verdict(cidr, limits, node.node_pod_cidrs)
            if verdict is None and not any(
                r.version == cidr.version for r in limits.cluster_pod_cidrs
            ):
                inside = next(
                    (
                        f"{a} of node {n}"
                        for a, n in node_ips
                        if n != name and a.version == cidr.version and a in cidr
                    ),
                    None,
                )
                if inside is not None:
                    verdict = "covers-node-address", f"contains the node address {inside}"
            if verdict is not None:
                rejected.append(Rejection(name, FIELD_POD_CIDRS, str(cidr), verdict[1], verdict[0]))
                continue
            claims.append(Claim(name, FIELD_POD_CIDRS, KIND_POD_CIDR, cidr, cp))
    groups: dict[tuple[int, int, int], list[Claim]] = {}
    for claim in claims:
        groups.setdefault(claim.span, []).append(claim)
    rejected.extend(duplicates(groups.values()))
    rejected.sort(key=lambda r: (r.obj, r.field, r.value, r.reason))
    admitted = tuple(tuple(groups[k]) for k in sorted(groups))
    return Topology(admitted=admitted, rejected=tuple(rejected), pools=pools)
