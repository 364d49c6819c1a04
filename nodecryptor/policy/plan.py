"""The pure policy: which traffic of this node is encrypted, exempt, or left alone.

``compute_plan`` turns a snapshot of the cluster (NodeInfo by name), the local node's name and
the settings into a Plan. ``compute_desired`` adds what the runtime observed (the WireGuard
device, the underlay devices) and derives the values the datapath needs: which destinations no
peer covers, the TCP MSS to clamp to, the largest packet that crosses WireGuard unfragmented.
Nothing here performs I/O; reading this module tells exactly what gets encrypted.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from nodecryptor.policy import exemptions as ex
from nodecryptor.policy.admission import FIELD_ADDRESSES, FIELD_POD_CIDRS, Claim, Limits, admit, owner_of
from nodecryptor.core.model import (DEFAULT_WG_PORT, KIND_NODE_IP, KIND_POD_CIDR,
                                    ROLE_CONTROL_PLANE, ROLE_WORKER, WG_MARK, WG_MARK_MASK,
                                    Destination, DesiredState, Device, IPNetwork, NodeInfo, Plan,
                                    WgState)
from nodecryptor.core.settings import RoleSource, Settings

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


def is_control_plane(node: NodeInfo, selector_labels: Iterable[str],
                     role_source: RoleSource = RoleSource.NODE) -> bool:
    """Control-plane when any selector label is present, whatever its value: kubeadm sets
    ``node-role.kubernetes.io/control-plane=""``, k3s sets ``"true"``.

    The labels come from the trusted source (``Settings.role_source``): by default the v1
    Node's (``node.node_labels``, None until that Node is known: a worker, so its traffic is
    encrypted); with ``ciliumnode`` the CiliumNode's own labels."""
    labels = ex.trusted_labels(node, role_source)
    return any(label in labels for label in selector_labels)


def node_is_control_plane(node: NodeInfo, settings: Settings) -> bool:
    return is_control_plane(node, settings.control_plane_labels, settings.role_source)


def node_addresses(node: NodeInfo, address_types: Iterable[str]):
    wanted = set(address_types)
    seen = []
    for kind, addr in node.addresses:
        if kind in wanted and addr not in seen:
            seen.append(addr)
    return seen


def admission_limits(settings: Settings) -> Limits:
    return Limits(min_prefix_v4=settings.pod_cidr_min_prefix_v4,
                  min_prefix_v6=settings.pod_cidr_min_prefix_v6,
                  cluster_pod_cidrs=settings.cluster_pod_cidrs)


def compute_plan(snapshot: Mapping[str, NodeInfo], node_name: str, settings: Settings,
                 underlay_networks: Iterable[IPNetwork] = (),
                 policies: Iterable[ex.ExemptionPolicy] = ()) -> Plan:
    """Decide, for the node ``node_name``, which remote prefixes are encrypted.

    Every remote address and pod CIDR is a claim that ``admission.admit`` accepts or rejects;
    the rejections (and conflicts) travel in ``Plan.rejected``. ``underlay_networks``: the
    local node's underlay subnets, when the caller knows them (their broadcast addresses are
    rejected as node addresses). ``policies``: the parsed EncryptionExemptions (the built-in
    one is added from the settings; see exemptions.py)."""
    local = snapshot.get(node_name)
    role = ROLE_WORKER
    local_addresses: tuple = ()
    if local is not None:
        if node_is_control_plane(local, settings):
            role = ROLE_CONTROL_PLANE
        local_addresses = tuple(sorted(node_addresses(local, settings.address_types),
                                       key=lambda a: (a.version, a)))
    own_prefixes: set[IPNetwork] = {ipaddress.ip_network(a) for a in local_addresses}
    if local is not None:
        own_prefixes.update(local.pod_cidrs)

    claims: list[Claim] = []
    for name in sorted(snapshot):
        if name == node_name:
            continue
        node = snapshot[name]
        cp = node_is_control_plane(node, settings)
        for addr in node_addresses(node, settings.address_types):
            claims.append(Claim(name, FIELD_ADDRESSES, KIND_NODE_IP, ipaddress.ip_network(addr),
                                cp))
        for cidr in dict.fromkeys(node.pod_cidrs):
            claims.append(Claim(name, FIELD_POD_CIDRS, KIND_POD_CIDR, cidr, cp))
    admission = admit(claims, own_prefixes, admission_limits(settings), underlay_networks)

    exemptions = ex.evaluate(policies, snapshot, node_name, settings)
    destinations = []
    for owners in admission.admitted:
        # A prefix several nodes claim stays one encrypted destination. It is exempt (a
        # control-plane node address) when a control-plane node claims it as its node
        # address: a worker claiming the same address cannot switch the bootstrap exemption
        # off. A pod CIDR counts as control-plane only when every claimant is.
        owner = owner_of(owners)
        kind = owner.kind
        if kind == KIND_NODE_IP:
            control_plane = owner.control_plane
        else:
            control_plane = all(c.control_plane for c in owners)
        exempt, client_of = _exempt(owners, kind, control_plane, exemptions)
        destinations.append(Destination(prefix=owner.prefix, node=owner.node, kind=kind,
                                        control_plane=control_plane, exempt_ports=exempt,
                                        client_of=client_of))
    destinations.sort(key=Destination.sort_key)
    return Plan(node=node_name, role=role, local_addresses=local_addresses,
                destinations=tuple(destinations), exempt_ports=settings.exempt_ports,
                local_known=local is not None,
                local_pod_cidrs=tuple(dict.fromkeys(local.pod_cidrs)) if local else (),
                rejected=admission.rejected + exemptions.rejected,
                serves=exemptions.serves,
                policies=tuple(p.name for p in exemptions.policies))


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
        ranges = {r for r in common(lambda n: exemptions.to_node.get(n, ()))
                  if r.policy != builtin}
        if control_plane:
            ranges |= {r for p in exemptions.policies if p.builtin for r in ex._ranges(p)}
    client_of = common(lambda n: exemptions.clients.get(n, frozenset()))
    order = {p.name: i for i, p in enumerate(exemptions.policies)}
    ordered = tuple(sorted(ranges, key=lambda r: (order.get(r.policy, 99), r.protocol,
                                                   r.first, r.last)))
    return ordered, frozenset(client_of)


def uncovered_destinations(destinations: Iterable[Destination],
                           wg: WgState) -> frozenset[IPNetwork]:
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
        covered = any(plen <= prefix.prefixlen and prefix.supernet(new_prefix=plen) in
                      allowed[prefix.version] for plen in lengths[prefix.version])
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


def compute_desired(plan: Plan, wg: WgState, devices: Iterable[Device],
                    settings: Settings) -> DesiredState:
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
