"""The pure policy: which traffic of this node is encrypted, exempt, or left alone.

``compute_plan`` turns a snapshot of the cluster (NodeInfo by name, the v1 Nodes' facts merged
in), the local node's name, the pod pools and the settings into a Plan: the cluster-wide
topology (``topology.compile_topology``) seen from the local node (``localize``).
``compute_desired`` adds what the runtime observed (the WireGuard device, the underlay
devices) and derives the values the datapath needs: which destinations no peer covers, the
TCP MSS to clamp to, the largest packet that crosses WireGuard unfragmented.
Nothing here performs I/O; reading this module tells exactly what gets encrypted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from nodecryptor.policy import exemptions as ex
from nodecryptor.policy.admission import (
    FIELD_ADDRESSES,
    FIELD_POD_CIDRS,
    Limits,
    _span,
    overlapping,
    owner_of,
)
from nodecryptor.policy.topology import (
    Topology,
    compile_topology,
    effective_pools,
    is_control_plane,
    limits_of,
    node_is_control_plane,
    pod_cidr_verdict,
    trusted_addresses,
)
from nodecryptor.core.model import (
    DEFAULT_WG_PORT,
    KIND_NODE_IP,
    ROLE_CONTROL_PLANE,
    ROLE_WORKER,
    WG_MARK,
    WG_MARK_MASK,
    Destination,
    DesiredState,
    Device,
    IPNetwork,
    NodeInfo,
    PodPools,
    Plan,
    Rejection,
    WgState,
)
from nodecryptor.core.settings import Settings

__all__ = [
    "compute_plan",
    "compute_desired",
    "localize",
    "is_control_plane",
    "node_is_control_plane",
    "admission_limits",
    "node_addresses",
]

# WireGuard's overhead on the wire: outer IP header + UDP (8) + WireGuard data header (16) +
# Poly1305 tag (16). IPv4 outer = 20 + 8 + 32 = 60, IPv6 outer = 40 + 8 + 32 = 80.
WG_OVERHEAD_V4_OUTER = 60
WG_OVERHEAD_V6_OUTER = 80
# WireGuard pads the plaintext up to a multiple of 16 bytes (bounded by the device MTU), so a
# packet can grow by up to 15 bytes before encryption.
WG_PADDING_SLACK = 15
TCP_IPV4_HEADERS = 40  # IPv4 (20) + TCP (20)
TCP_IPV6_HEADERS = 60  # IPv6 (40) + TCP (20)
# Cilium's WireGuard always listens here; used while the device's port cannot be read (device
# absent, or peers unreadable), so the datapath never re-encrypts WireGuard's own UDP.


def node_addresses(node: NodeInfo, address_types: Iterable[str]):
    """The node's addresses of the wanted types as its CiliumNode claims them (untrusted:
    for display and for matching WireGuard peers, never for destinations)."""
    wanted = set(address_types)
    seen = []
    for kind, addr in node.addresses:
        if kind in wanted and addr not in seen:
            seen.append(addr)
    return seen


def admission_limits(settings: Settings, pools: PodPools | None = None) -> Limits:
    return limits_of(settings, effective_pools(settings, pools))


def compute_plan(
    snapshot: Mapping[str, NodeInfo],
    node_name: str,
    settings: Settings,
    underlay_networks: Iterable[IPNetwork] = (),
    policies: Iterable[ex.ExemptionPolicy] = (),
    pools: PodPools | None = None,
    kernel_prefixes: Iterable[IPNetwork] = (),
) -> Plan:
    """Decide, for the node ``node_name``, which remote prefixes are encrypted: the
    cluster-wide topology (``topology.compile_topology``) seen from that node (``localize``).
    Rejections and conflicts travel in ``Plan.rejected``."""
    return localize(
        compile_topology(snapshot, settings, pools),
        snapshot,
        node_name,
        settings,
        underlay_networks,
        policies,
        kernel_prefixes,
    )


def localize(
    topology: Topology,
    snapshot: Mapping[str, NodeInfo],
    node_name: str,
    settings: Settings,
    underlay_networks: Iterable[IPNetwork] = (),
    policies: Iterable[ex.ExemptionPolicy] = (),
    kernel_prefixes: Iterable[IPNetwork] = (),
) -> Plan:
    """The topology as the node ``node_name`` enforces it.

    The local node's own prefixes come from sources its neighbours cannot write: its v1 Node
    (addresses, spec.podCIDRs) and ``kernel_prefixes`` (what the caller read from the kernel,
    e.g. Cilium's routes to the local pod CIDR). A remote claim overlapping one of them is
    refused (``overlaps-local-node``). The local CiliumNode's own entries are as untrusted as
    any: one is treated as local only where it overlaps no remote destination (else it is
    reported, ``local-claim-conflicts``), so hostile entries there cannot remove anything.
    ``underlay_networks``: the local node's underlay subnets (their broadcast addresses are no
    node address). ``policies``: the parsed EncryptionExemptions."""
    local = snapshot.get(node_name)
    role = (
        ROLE_CONTROL_PLANE
        if local is not None and node_is_control_plane(local, settings)
        else ROLE_WORKER
    )
    remote = [
        g
        for g in (tuple(c for c in group if c.node != node_name) for group in topology.admitted)
        if g
    ]
    remote_spans = [g[0].span for g in remote]
    # A conflict with the local node's own claim is said once, as the remote claim's
    # rejection below (overlaps-local-node).
    local_claimed = {
        str(c.prefix) for group in topology.admitted for c in group if c.node == node_name
    }
    rejected: list[Rejection] = [
        r
        for r in topology.rejected
        if r.reason != "duplicate-claim" or r.value not in local_claimed
    ]

    trusted: list[IPNetwork] = []
    local_addresses: list = []
    local_pods: list[IPNetwork] = []
    untrusted: list[tuple[str, IPNetwork]] = []
    limits = topology_limits(settings, topology)
    if local is not None:
        for addr in trusted_addresses(local, settings.address_types):
            local_addresses.append(addr)
            trusted.append(ipaddress.ip_network(addr))
    # For telling the underlay apart only (it can only drop a kernel prefix), the local
    # CiliumNode's addresses count too: the Node may not be known yet.
    own_ips = [p.network_address for p in trusted] + (
        node_addresses(local, settings.address_types) if local is not None else []
    )
    for prefix in kernel_prefixes:
        # A subnet around the node's own address is the underlay's (other nodes live there);
        # a prefix broader than the pod limit is no pod CIDR: only host prefixes of such.
        if prefix.prefixlen == prefix.max_prefixlen or (
            prefix.prefixlen >= limits.min_prefix(prefix.version)
            and not any(a.version == prefix.version and a in prefix for a in own_ips)
        ):
            trusted.append(prefix)
    if local is not None:
        trusted.extend(local.node_pod_cidrs)
        local_pods.extend(local.node_pod_cidrs)
        if local.has_ciliumnode:
            untrusted += [
                (FIELD_ADDRESSES, ipaddress.ip_network(a))
                for a in node_addresses(local, settings.address_types)
            ]
            untrusted += [(FIELD_POD_CIDRS, c) for c in local.pod_cidrs]
    for field, prefix in untrusted:
        if prefix in trusted:  # the kernel or the Node shows it: local, trusted
            if field == FIELD_POD_CIDRS and prefix not in local_pods:
                local_pods.append(prefix)
            continue
        if overlapping(_span(prefix), remote_spans):
            rejected.append(
                Rejection(
                    node_name,
                    field,
                    str(prefix),
                    "the local node's CiliumNode claims it, but it overlaps "
                    "another node's destination",
                    "local-claim-conflicts",
                )
            )
            continue
        if field == FIELD_ADDRESSES:
            if local is not None and local.node_addresses is not None:
                continue  # the Node lists the local addresses; this one it does not
            local_addresses.append(prefix.network_address)
        elif pod_cidr_verdict(prefix, limits, local.node_pod_cidrs) is None:
            local_pods.append(prefix)
        trusted.append(prefix)
    trusted_spans = [_span(p) for p in trusted]
    broadcasts = {
        n.broadcast_address for n in underlay_networks if n.version == 4 and n.prefixlen <= 30
    }

    exemptions = ex.evaluate(policies, snapshot, node_name, settings)
    destinations = []
    for owners in remote:
        owner = owner_of(owners)
        if overlapping(owner.span, trusted_spans):
            rejected += [
                c.reject(
                    "overlaps-local-node", "overlaps the local node's own addresses or pod CIDRs"
                )
                for c in owners
            ]
            continue
        if owner.kind == KIND_NODE_IP and owner.prefix.network_address in broadcasts:
            rejected += [
                c.reject("broadcast", "the broadcast address of the local node's underlay subnet")
                for c in owners
            ]
            continue
        # A prefix several nodes claim stays one encrypted destination. It is exempt (a
        # control-plane node address) when a control-plane node claims it as its node
        # address: a worker claiming the same address cannot switch the bootstrap exemption
        # off. A pod CIDR counts as control-plane only when every claimant is.
        kind = owner.kind
        if kind == KIND_NODE_IP:
            control_plane = owner.control_plane
        else:
            control_plane = all(c.control_plane for c in owners)
        exempt, client_of = _exempt(owners, kind, control_plane, exemptions)
        destinations.append(
            Destination(
                prefix=owner.prefix,
                node=owner.node,
                kind=kind,
                control_plane=control_plane,
                exempt_ports=exempt,
                client_of=client_of,
            )
        )
    destinations.sort(key=Destination.sort_key)
    rejected.sort(key=lambda r: (r.obj, r.field, r.value, r.reason))
    return Plan(
        node=node_name,
        role=role,
        local_addresses=tuple(sorted(dict.fromkeys(local_addresses), key=lambda a: (a.version, a))),
        destinations=tuple(destinations),
        exempt_ports=settings.exempt_ports,
        local_known=local is not None,
        local_pod_cidrs=tuple(dict.fromkeys(local_pods)),
        rejected=tuple(rejected) + exemptions.rejected,
        serves=exemptions.serves,
        policies=tuple(p.name for p in exemptions.policies),
    )


def topology_limits(settings: Settings, topology: Topology) -> Limits:
    return limits_of(settings, topology.pools)


def _exempt(owners, kind: str, control_plane: bool, exemptions: ex.Exemptions):
    """(exempt ranges, policies the prefix's node is a client of) for one admitted prefix.

    Only node addresses are ever exempt as destinations (traffic to pods never is). The
    built-in policy follows the control-plane attribution (admission rule 4); any other
    policy applies to a prefix several nodes claim only when it applies to every claimant, so
    a node cannot gain an exemption by claiming a selected node's address. The client sets
    (replies from the local node) follow the same rule, for every kind of prefix."""
    nodes = {c.node for c in owners}
    builtin = ex.BUILTIN_NAME

    def common(per_node):
        sets = [set(per_node(n)) for n in nodes]
        return set.intersection(*sets) if sets else set()

    ranges: set = set()
    if kind == KIND_NODE_IP:
        ranges = {r for r in common(lambda n: exemptions.to_node.get(n, ())) if r.policy != builtin}
        if control_plane:
            ranges |= {r for p in exemptions.policies if p.builtin for r in ex._ranges(p)}
    client_of = common(lambda n: exemptions.clients.get(n, frozenset()))
    order = {p.name: i for i, p in enumerate(exemptions.policies)}
    ordered = tuple(
        sorted(ranges, key=lambda r: (order.get(r.policy, 99), r.protocol, r.first, r.last))
    )
    return ordered, frozenset(client_of)


def uncovered_destinations(
    destinations: Iterable[Destination], wg: WgState
) -> frozenset[IPNetwork]:
    """Destinations that no peer's allowed-IPs contain. WireGuard drops (with ICMP
    unreachable) what it cannot route to a peer, so these need the fail mode's treatment.
    Unknown peers (None) mean unknown coverage: nothing is reported uncovered."""
    if wg.peers is None:
        return frozenset()
    allowed: dict[int, set[IPNetwork]] = {4: set(), 6: set()}
    for peer in wg.peers:
        for net in peer.allowed_ips:
            allowed[net.version].add(net)
    lengths = {v: sorted({n.prefixlen for n in nets}, reverse=True) for v, nets in allowed.items()}
    uncovered = set()
    for dest in destinations:
        prefix = dest.prefix
        covered = any(
            plen <= prefix.prefixlen and prefix.supernet(new_prefix=plen) in allowed[prefix.version]
            for plen in lengths[prefix.version]
        )
        if not covered:
            uncovered.add(prefix)
    return frozenset(uncovered)


def effective_wg_payload(wg_mtu: int, underlay_mtu: int, ipv6_outer: bool) -> int:
    """Largest inner packet that leaves as one unfragmented WireGuard packet."""
    outer = WG_OVERHEAD_V6_OUTER if ipv6_outer else WG_OVERHEAD_V4_OUTER
    limit = underlay_mtu - outer - WG_PADDING_SLACK
    return max(0, min(wg_mtu, limit) if wg_mtu > 0 else limit)


def peers_use_ipv6(wg: WgState, plan: Plan) -> bool:
    endpoints = [p.endpoint for p in (wg.peers or ()) if p.endpoint]
    if endpoints:
        return any(e.startswith("[") or e.count(":") > 1 for e in endpoints)
    return bool(plan.local_addresses) and all(a.version == 6 for a in plan.local_addresses)


def wg_mark_match(fwmark: int) -> tuple[int, int]:
    """(value, mask) that identifies WireGuard's own encrypted packets. Cilium marks them
    0x1E00 (1.13-1.17) or 0x0E00 (1.18+); masking with 0x0F00 covers both. A device with
    another mark gets an exact match on that mark."""
    if fwmark == 0 or (fwmark & WG_MARK_MASK) == WG_MARK:
        return WG_MARK, WG_MARK_MASK
    return fwmark, 0xFFFFFFFF


def compute_desired(
    plan: Plan, wg: WgState, devices: Iterable[Device], settings: Settings
) -> DesiredState:
    devices = tuple(sorted(devices, key=lambda d: d.name))
    underlay_mtu = min((d.mtu for d in devices if d.mtu > 0), default=1500)
    payload = effective_wg_payload(wg.mtu, underlay_mtu, peers_use_ipv6(wg, plan))
    mark, mask = wg_mark_match(wg.fwmark)
    return DesiredState(
        plan=plan,
        wg=wg,
        devices=devices,
        fail_mode=settings.fail_mode,
        ingress_enforcement=str(settings.ingress_enforcement),
        enabled=True,
        uncovered=uncovered_destinations(plan.destinations, wg),
        mss_v4=max(0, payload - TCP_IPV4_HEADERS),
        mss_v6=max(0, payload - TCP_IPV6_HEADERS),
        max_packet_v4=payload,
        max_packet_v6=payload,
        wg_port=wg.listen_port or DEFAULT_WG_PORT,
        wg_mark=mark,
        wg_mark_mask=mask,
    )
