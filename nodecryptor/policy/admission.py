"""Admission of claims: which prefixes another node's CiliumNode may make a destination.

CiliumNodes are written by the Cilium agent's service account, which every node has and which
may write any CiliumNode. So every address and pod CIDR in them is an untrusted *claim*. This
module is the one place that decides which claims become encrypted destinations. Its
guarantees, each enforced by one rule below and listed in ``REASONS``:

1. **Nothing outside the cluster is touched.** Special-purpose addresses (unspecified,
   loopback, link-local, multicast, broadcast, IPv4-mapped and -compatible IPv6) are never a
   node address nor part of a pod CIDR; a pod CIDR is never broader than the per-family limit;
   when the cluster's pod ranges are configured, a pod CIDR lies inside them.
2. **The local node's own traffic is never captured.** A claim that overlaps one of the local
   node's own addresses or pod CIDRs is rejected (in the ip-rule datapath such a route would
   send host-to-local-pod traffic into WireGuard or drop it).
3. **No claim displaces another node's encryption.** A claim that strictly contains another
   node's claim is rejected and the claims inside it stay destinations (longest-prefix match
   keeps sending them to WireGuard). Identical claims by several nodes stay one encrypted
   destination and are reported as conflicts.
4. **A worker cannot switch a control-plane node's bootstrap exemption off.** When a
   control-plane node claims an address as its node address, the address stays exempt
   whatever else claims it; the other claimant gains nothing (its claim is reported).
   Whether a node is control-plane is not decided here: see ``policy.node_is_control_plane``.

Context-free rules (the address classes) run when a CiliumNode is parsed, so a rejected address
never reaches the store; the rules that need the settings or the rest of the cluster run in
``admit``, called by ``policy.compute_plan``. Both report ``Rejection``s carrying one of the
``REASONS`` keys, a bounded set that is also the metric's label set.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nodecryptor.core.model import KIND_NODE_IP, IPNetwork, Rejection

FIELD_ADDRESSES = "spec.addresses"
FIELD_POD_CIDRS = "spec.ipam.podCIDRs"

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
    "outside-cluster-pod-cidrs": "pod CIDR not inside the cluster's pod ranges "
                                 "(--cluster-pod-cidrs)",
    "overlaps-local-node": "overlaps an address or pod CIDR of the local node",
    "covers-other-node": "strictly contains another node's address or pod CIDR; the claims "
                         "inside stay encrypted",
    "duplicate-claim": "the same prefix is claimed by several nodes; it stays encrypted (and "
                       "exempt when a control-plane node claims it as its node address)",
    "exemption-limit": "an EncryptionExemption beyond the limits on policies or port ranges "
                       "(exemptions.py); rejected whole",
}

# Special-purpose ranges, most specific first so that an address inside several (::1 is in
# ::/96 too) gets the most telling reason.
_SPECIAL: tuple[tuple[IPNetwork, str], ...] = tuple(
    (ipaddress.ip_network(net), reason) for net, reason in (
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
    ))


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
        return Rejection(self.node, self.field, str(self.prefix), detail, reason)


@dataclass(frozen=True)
class Limits:
    """The settings admission depends on (see Settings for their meaning)."""

    min_prefix_v4: int = 16
    min_prefix_v6: int = 48
    cluster_pod_cidrs: tuple[IPNetwork, ...] = ()

    def min_prefix(self, version: int) -> int:
        return self.min_prefix_v4 if version == 4 else self.min_prefix_v6


@dataclass(frozen=True)
class Admission:
    admitted: tuple[tuple[Claim, ...], ...]
    """The admitted claims, grouped by prefix (several nodes may claim one prefix)."""
    rejected: tuple[Rejection, ...]
    """Rejections and conflicts (duplicate claims, which stay admitted), in a stable order."""


def _span(prefix: IPNetwork) -> tuple[int, int, int]:
    first = int(prefix.network_address)
    return (prefix.version, first, first | ((1 << (prefix.max_prefixlen - prefix.prefixlen)) - 1))


def _overlapping(span: tuple[int, int, int], spans: Sequence[tuple[int, int, int]]) -> bool:
    version, first, last = span
    return any(v == version and first <= l and f <= last for v, f, l in spans)


def admit(claims: Iterable[Claim], local_prefixes: Iterable[IPNetwork], limits: Limits,
          underlay_networks: Iterable[IPNetwork] = ()) -> Admission:
    """Split remote ``claims`` into admitted and rejected ones.

    ``local_prefixes``: the local node's own addresses (as host prefixes) and pod CIDRs.
    ``underlay_networks``: the local node's underlay subnets when known (the agent reads them
    from its underlay devices), whose broadcast addresses are no node address. Class rules (``special_purpose``) already ran at parse time.
    """
    local_spans = [_span(p) for p in local_prefixes]
    broadcasts = {n.broadcast_address for n in underlay_networks
                  if n.version == 4 and n.prefixlen <= 30}
    rejected: list[Rejection] = []
    survivors: list[Claim] = []
    for claim in claims:
        prefix = claim.prefix
        if claim.field == FIELD_POD_CIDRS:
            limit = limits.min_prefix(prefix.version)
            if prefix.prefixlen < limit:
                rejected.append(claim.reject(
                    "too-broad", f"/{prefix.prefixlen} is broader than the IPv{prefix.version} "
                                 f"limit /{limit}"))
                continue
            ranges = [r for r in limits.cluster_pod_cidrs if r.version == prefix.version]
            if ranges and not any(prefix.subnet_of(r) for r in ranges):
                rejected.append(claim.reject("outside-cluster-pod-cidrs",
                                             "not inside " + ", ".join(map(str, ranges))))
                continue
        elif prefix.network_address in broadcasts:
            rejected.append(claim.reject("broadcast", "the broadcast address of the local "
                                                      "node's underlay subnet"))
            continue
        if _overlapping(claim.span, local_spans):
            rejected.append(claim.reject("overlaps-local-node", "overlaps the local node's own "
                                                                "addresses or pod CIDRs"))
            continue
        survivors.append(claim)

    survivors, covering = _reject_covering(survivors)
    rejected.extend(covering)
    groups: dict[tuple[int, int, int], list[Claim]] = {}
    for claim in survivors:
        groups.setdefault(claim.span, []).append(claim)
    rejected.extend(_duplicates(groups.values()))
    rejected.sort(key=lambda r: (r.obj, r.field, r.value, r.reason))
    return Admission(admitted=tuple(tuple(g) for g in groups.values()), rejected=tuple(rejected))


def _reject_covering(claims: list[Claim]) -> tuple[list[Claim], list[Rejection]]:
    """Reject every claim that strictly contains a claim of another node. Sorted by start
    address, the claims inside a prefix follow it; honest claims do not nest, so the scan
    after each prefix is short (a hostile supernet is bounded by the breadth limit)."""
    # Ties broken by content, not input order, so the reported detail is deterministic.
    spans = sorted(((c.span, c.prefix.prefixlen, c.node, c.kind, i)
                    for i, c in enumerate(claims)))
    starts = [(s[0][0], s[0][1]) for s in spans]
    keep, rejected = [], []
    for claim in claims:
        version, first, last = claim.span
        inner = None
        j = bisect.bisect_left(starts, (version, first))
        while j < len(spans) and starts[j] <= (version, last):
            (_, _, other_last), other_len, _, _, k = spans[j]
            other = claims[k]
            if (other.node != claim.node and other_last <= last
                    and other_len > claim.prefix.prefixlen):
                inner = other
                break
            j += 1
        if inner is None:
            keep.append(claim)
        else:
            rejected.append(claim.reject("covers-other-node", f"contains {inner.prefix} of "
                                                              f"node {inner.node}"))
    return keep, rejected


def _duplicates(groups: Iterable[list[Claim]]) -> list[Rejection]:
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
                detail = (f"also the node address of control-plane node {keeper.node}: stays "
                          f"encrypted except its bootstrap ports, which stay exempt")
            else:
                detail = f"also claimed by {', '.join(n for n in nodes if n != claim.node)}; " \
                         "stays encrypted"
            conflicts.append(claim.reject("duplicate-claim", detail))
    return conflicts


def owner_of(owners: Sequence[Claim]) -> Claim:
    """The claim a shared prefix is attributed to: a control-plane node's node address first
    (so a worker claiming it cannot switch the exemption off), then any node address, then
    the first node by name."""
    return min(owners, key=lambda c: (not (c.control_plane and c.kind == KIND_NODE_IP),
                                      c.kind != KIND_NODE_IP, c.node))
