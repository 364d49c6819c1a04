"""Admission of claims: the vocabulary and the context-free rules of what may be a destination.

Every address and pod CIDR another node announces is a *claim*. Where each claim is checked
against a source its claimant cannot write is ``policy.topology`` (the cluster-wide part) and
``policy.plan.localize`` (the local node's own prefixes). This module holds what they share:

- ``special_purpose``: special-purpose space (unspecified, loopback, link-local, multicast,
  broadcast, IPv4-mapped and -compatible IPv6) is never a node address nor part of a pod CIDR;
  the parsers apply it, so such an entry never reaches the store.
- ``Claim`` and ``Limits`` (the breadth limits and the cluster's pod pools).
- ``duplicates`` and ``owner_of``: a prefix several nodes claim stays one encrypted
  destination, reported as a conflict. A worker cannot switch a control-plane node's
  bootstrap exemption off: when a control-plane node claims an address as its node address,
  the address stays exempt whatever else claims it.
- ``REASONS``: every rejection carries one of these keys, a bounded set that is also the
  metric's label set.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nodecryptor.core.model import KIND_NODE_IP, IPNetwork, Rejection

FIELD_ADDRESSES = "spec.addresses"
FIELD_POD_CIDRS = "spec.ipam.podCIDRs"
FIELD_NODE_ADDRESSES = "status.addresses"
"""A v1 Node's field: the claim comes from the trusted source."""
FIELD_NODE_POD_CIDRS = "spec.podCIDRs"
NODE_FIELDS = (FIELD_NODE_ADDRESSES, FIELD_NODE_POD_CIDRS)

# reason -> what it means. The keys are the `reason` of every Rejection (plan --json, logs) and
# the label values of nodecryptor_rejected_claims_total; keep the set small and fixed.
REASONS: dict[str, str] = {
    "malformed": "not parseable: wrong type, not an address or CIDR, too many entries",
    "unspecified": "is or covers an unspecified address (0.0.0.0/8, ::)",
    "loopback": "is or covers a loopback address (127.0.0.0/8, ::1)",
    "link-local": "is or covers a link-local address (169.254.0.0/16 - cloud metadata "
    "169.254.169.254 included - or fe80::/10)",
    "multicast": "is or covers a multicast address (224.0.0.0/4, ff00::/8)",
    "broadcast": "is or covers the limited broadcast address 255.255.255.255, or is the "
    "broadcast address of the local node's underlay subnet",
    "ipv4-mapped": "is or covers an IPv4-mapped IPv6 address (::ffff:0:0/96)",
    "ipv4-compatible": "is or covers a deprecated IPv4-compatible IPv6 address (::/96)",
    "too-broad": "pod CIDR broader than the per-family limit (--pod-cidr-min-prefix-v4/-v6)",
    "outside-cluster-pod-cidrs": "pod CIDR not inside the cluster's pod pools (Cilium's "
    "configuration, or --cluster-pod-cidrs)",
    "not-in-node-spec": "pod CIDR outside the pools and not among the v1 Node's spec.podCIDRs",
    "covers-node-address": "pod CIDR that no pool vouches for and that contains an address "
    "a v1 Node lists",
    "not-in-node-status": "node address the v1 Node's status.addresses do not list",
    "no-node-object": "node address of a CiliumNode that has no v1 Node of the same name",
    "overlaps-local-node": "overlaps an address or pod CIDR the local node's Node object or "
    "kernel shows as its own",
    "local-claim-conflicts": "an entry of the local node's own CiliumNode (untrusted) that "
    "overlaps another node's destination: not treated as local",
    "oversized": "the whole object is larger than the size bound and was not parsed",
    "duplicate-claim": "the same prefix is claimed by several nodes; it stays encrypted (and "
    "exempt when a control-plane node claims it as its node address)",
    "exemption-limit": "an EncryptionExemption beyond the limits on policies or port ranges "
    "(exemptions.py); rejected whole",
}

# Special-purpose ranges, most specific first so that an address inside several (::1 is in
# ::/96 too) gets the most telling reason.
_SPECIAL: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), reason)
    for net, reason in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("0.0.0.0/8", "unspecified"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("::ffff:0:0/96", "ipv4-mapped"),
        ("::/96", "ipv4-compatible"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    )
)


def special_purpose(prefix: IPNetwork) -> tuple[str, str] | None:
    """(reason, detail) when ``prefix`` (a node address as /32 or /128, or a pod CIDR) is or
    overlaps a special-purpose range; None when it is ordinary unicast space."""
    for net, reason in _SPECIAL:
        if net.version != prefix.version or not net.overlaps(prefix):
            continue
        if prefix.subnet_of(net):
            return reason, f"inside {net}"
        return reason, f"covers {net}"
    return None


@dataclass(frozen=True)
class Claim:
    """One prefix one remote node claims."""

    node: str
    field: str  # FIELD_ADDRESSES | FIELD_POD_CIDRS
    kind: str  # KIND_NODE_IP | KIND_POD_CIDR
    prefix: IPNetwork
    control_plane: bool
    span: tuple[int, int, int] = field(init=False, repr=False, compare=False)
    """(version, first, last address as integers): cheap to compare and to hash."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "span", _span(self.prefix))

    def reject(self, reason: str, detail: str) -> Rejection:
        kind = "Node" if self.field in NODE_FIELDS else "CiliumNode"
        return Rejection(self.node, self.field, str(self.prefix), detail, reason, kind=kind)


@dataclass(frozen=True)
class Limits:
    """The settings admission depends on (see Settings for their meaning)."""

    min_prefix_v4: int = 16
    min_prefix_v6: int = 48
    cluster_pod_cidrs: tuple[IPNetwork, ...] = ()

    def min_prefix(self, version: int) -> int:
        return self.min_prefix_v4 if version == 4 else self.min_prefix_v6


def _span(prefix: IPNetwork) -> tuple[int, int, int]:
    first = int(prefix.network_address)
    return (prefix.version, first, first | ((1 << (prefix.max_prefixlen - prefix.prefixlen)) - 1))


def overlapping(span: tuple[int, int, int], spans: Sequence[tuple[int, int, int]]) -> bool:
    version, first, last = span
    return any(v == version and first <= end and f <= last for v, f, end in spans)


def duplicates(groups: Iterable[list[Claim]]) -> list[Rejection]:
    conflicts = []
    for owners in groups:
        if len(owners) < 2:
            continue
        nodes = sorted({c.node for c in owners})
        if len(nodes) < 2:
            continue
        keeper = owner_of(owners)
        for claim in owners:
            if claim.node == keeper.node:
                continue
            if keeper.control_plane and keeper.kind == KIND_NODE_IP and not claim.control_plane:
                detail = (
                    f"also the node address of control-plane node {keeper.node}: stays "
                    f"encrypted except its bootstrap ports, which stay exempt"
                )
            else:
                detail = (
                    f"also claimed by {', '.join(n for n in nodes if n != claim.node)}; "
                    "stays encrypted"
                )
            conflicts.append(claim.reject("duplicate-claim", detail))
    return conflicts


def owner_of(owners: Sequence[Claim]) -> Claim:
    """The claim a shared prefix is attributed to: a control-plane node's node address first
    (so a worker claiming it cannot switch the exemption off), then any node address, then
    the first node by name."""
    return min(
        owners,
        key=lambda c: (
            not (c.control_plane and c.kind == KIND_NODE_IP),
            c.kind != KIND_NODE_IP,
            c.node,
        ),
    )
