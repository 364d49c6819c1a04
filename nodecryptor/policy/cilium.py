"""What nodecryptor concludes about the Cilium it runs next to, and what follows from it. Pure.

``detect`` turns observed facts (the WireGuard device as read, which of Cilium's tunnel devices
exist, the remote node addresses and pod CIDRs of the cluster snapshot) into ``CiliumFacts``:
the routing mode, whether peers' allowed-IPs include node addresses, and WireGuard's port,
fwmark and MTU, each with where it came from. ``apply`` adjusts a DesiredState to them:

* **Cilium's own traffic.** Cilium encrypts local-pod to remote-pod traffic itself (its
  ``cil_to_netdev`` redirects it into cilium_wg0 with an identity mark). Unless
  ``Settings.take_over_pod_to_pod``, the local pod CIDRs go to the datapath so it passes that
  traffic on to Cilium untouched (reason ``cilium-pod-to-pod``).
* **Tunnel mode**, recognised by Cilium's tunnel device (``cilium_vxlan``/``cilium_geneve``;
  peers' allowed-IPs are reported as evidence but never decide alone, see ``detect``). With
  VXLAN/Geneve, peers' allowed-IPs hold node addresses only (Cilium >= 1.17): remote pod CIDRs
  are reached through the tunnel device, whose UDP goes to the remote node address and is
  encrypted as node traffic. Pod CIDRs are therefore no destinations of their own (never
  "uncovered", never dropped for it).
* **Node addresses outside allowed-IPs** (Cilium before cilium/cilium#30975): WireGuard cannot
  carry node traffic at all; the agent reports not-ready naming it (``readiness_problem``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping

from nodecryptor.policy.admission import Limits
from nodecryptor.core.model import (
    DEFAULT_WG_PORT,
    KIND_POD_CIDR,
    WG_MARK,
    CiliumFacts,
    DesiredState,
    IPAddress,
    IPNetwork,
    NodeInfo,
    Plan,
    WgState,
)

ROUTING_NATIVE = "native"
ROUTING_TUNNEL = "tunnel"
TUNNEL_DEVICES = ("cilium_vxlan", "cilium_geneve")
"""Devices Cilium creates in tunnel mode (VXLAN, Geneve)."""


def _covered(prefix: IPNetwork, allowed: Iterable[IPNetwork]) -> bool:
    return any(net.version == prefix.version and prefix.subnet_of(net) for net in allowed)


def _overlaps(prefix: IPNetwork, allowed: Iterable[IPNetwork]) -> bool:
    return any(net.version == prefix.version and net.overlaps(prefix) for net in allowed)


def _endpoint_ip(endpoint: str | None) -> IPAddress | None:
    """The address of a WireGuard endpoint ("192.0.2.1:51871" or "[2001:db8::1]:51871")."""
    if not endpoint:
        return None
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def detect(
    wg: WgState,
    tunnel_devices: Iterable[str] = (),
    node_ips: Iterable[IPAddress] | None = None,
    pod_cidrs: Iterable[IPNetwork] | None = None,
) -> CiliumFacts:
    """Facts about Cilium from what was observed. ``node_ips`` and ``pod_cidrs`` are the remote
    nodes' addresses and pod CIDRs (from CiliumNodes); None when unknown (``nodecryptor status``
    without the cluster), then peers' endpoint addresses stand for node addresses."""
    allowed = [net for peer in (wg.peers or ()) for net in peer.allowed_ips]
    name = wg.ifname
    if wg.present and wg.peers is not None:
        port, port_src = wg.listen_port, f"{name} configuration (listen port)"
        fwmark, mark_src = wg.fwmark, f"{name} configuration (fwmark)"
    else:
        port, port_src = DEFAULT_WG_PORT, f"Cilium's default: {name} configuration unreadable"
        fwmark, mark_src = WG_MARK, f"Cilium's default (1.18+): {name} configuration unreadable"
    if wg.present and wg.mtu:
        mtu, mtu_src = wg.mtu, f"{name} link MTU"
    else:
        mtu, mtu_src = 0, f"{name} absent"

    # Do peers' allowed-IPs include node addresses?
    if wg.peers is None:
        in_allowed, in_src = None, f"unknown: {name} peers unreadable"
    elif not wg.peers:
        in_allowed, in_src = None, f"unknown: {name} has no peers yet"
    else:
        if node_ips is not None:
            candidates = {ipaddress.ip_network(a) for a in node_ips}
            what = "remote CiliumNode addresses"
        else:
            candidates = {
                ipaddress.ip_network(ip)
                for ip in (_endpoint_ip(p.endpoint) for p in wg.peers)
                if ip is not None
            }
            what = "peer endpoint addresses"
        if not candidates:
            in_allowed, in_src = None, f"unknown: no {what} to compare with"
        else:
            in_allowed = any(_covered(c, allowed) for c in candidates)
            in_src = f"{name} peers' allowed-IPs compared with {what}"

    present = list(tunnel_devices)
    pods = list(pod_cidrs) if pod_cidrs is not None else None
    if not wg.peers:
        evidence = "no peers to judge allowed-IPs from"
    elif pods is not None and any(_overlaps(c, allowed) for c in pods):
        evidence = "peers' allowed-IPs include remote pod CIDRs"
    elif pods is None and any(net.prefixlen < net.max_prefixlen for net in allowed):
        evidence = "peers' allowed-IPs include prefixes wider than hosts"
    elif in_allowed:
        evidence = "peers' allowed-IPs hold node addresses only"
    else:
        evidence = "peers' allowed-IPs inconclusive"
    # The tunnel device decides. Allowed-IPs alone are not enough: with native routing, Cilium
    # versions that add pod IPs one by one leave node addresses only while no remote pod
    # exists, and taking that for tunnel mode would drop pod CIDRs from the destinations (host
    # traffic to the first new remote pod would then leave in the clear until the next pass).
    if present:
        mode, mode_src = ROUTING_TUNNEL, f"tunnel device {present[0]} present; {evidence}"
    else:
        devices = ", ".join(TUNNEL_DEVICES)
        mode, mode_src = ROUTING_NATIVE, f"no tunnel device ({devices}); {evidence}"
    return CiliumFacts(
        routing_mode=mode,
        routing_mode_source=mode_src,
        node_ips_in_allowed_ips=in_allowed,
        node_ips_source=in_src,
        wg_port=port,
        wg_port_source=port_src,
        wg_fwmark=fwmark,
        wg_fwmark_source=mark_src,
        wg_mtu=mtu,
        wg_mtu_source=mtu_src,
        tunnel_device=present[0] if present else None,
        wg_ifname=name,
    )


def remote_inventory(
    snapshot: Mapping[str, NodeInfo], node_name: str, address_types: Iterable[str]
) -> tuple[list[IPAddress], list[IPNetwork]]:
    """(node addresses, pod CIDRs) of every node but ``node_name``."""
    types = set(address_types)
    ips, pods = [], []
    for name, node in snapshot.items():
        if name == node_name:
            continue
        ips += [a for kind, a in node.addresses if kind in types]
        pods += list(node.pod_cidrs)
    return ips, pods


def cilium_pod_cidrs(
    plan: Plan, facts: CiliumFacts, take_over: bool, limits: Limits
) -> tuple[IPNetwork, ...]:
    """Local pod CIDRs whose traffic to remote pod CIDRs stays Cilium's: none when taken over,
    and none in tunnel mode (pod CIDRs are then no destinations of nodecryptor's at all).

    The local node's CiliumNode is as untrusted as any other (every Cilium agent may write it),
    and a source range handed to Cilium is a range nodecryptor stops encrypting pod-to-pod
    traffic from. So a local pod CIDR broader than the admission limit, or one that contains
    one of the local node's own addresses (host traffic to remote pods would then pass to
    Cilium, which does not encrypt it), is never handed over: its traffic stays encrypted."""
    if take_over or facts.routing_mode == ROUTING_TUNNEL:
        return ()
    kept = [
        c
        for c in plan.local_pod_cidrs
        if c.prefixlen >= limits.min_prefix(c.version)
        and not any(a.version == c.version and a in c for a in plan.local_addresses)
    ]
    return tuple(sorted(kept, key=lambda n: (n.version, n)))


def apply(
    desired: DesiredState, facts: CiliumFacts, take_over: bool, limits: Limits
) -> DesiredState:
    """``desired`` adjusted to the detected Cilium (see the module doc)."""
    plan = desired.plan
    uncovered = desired.uncovered
    if facts.routing_mode == ROUTING_TUNNEL:
        kept = tuple(d for d in plan.destinations if d.kind != KIND_POD_CIDR)
        plan = dataclasses.replace(plan, destinations=kept)
        prefixes = {d.prefix for d in kept}
        uncovered = frozenset(p for p in uncovered if p in prefixes)
    return dataclasses.replace(
        desired,
        plan=plan,
        uncovered=uncovered,
        cilium=facts,
        cilium_pod_cidrs=cilium_pod_cidrs(plan, facts, take_over, limits),
    )


def readiness_problem(facts: CiliumFacts | None) -> str | None:
    """Why the node cannot be ready because of Cilium's configuration, or None."""
    if facts is not None and facts.node_ips_in_allowed_ips is False:
        return (
            "WireGuard peers' allowed-IPs do not include node addresses (Cilium before "
            "cilium/cilium#30975): node traffic cannot be encrypted through "
            f"{facts.wg_ifname}"
        )
    return None
