"""Plain, immutable data passed between the layers: what the Kubernetes sync extracted from
CiliumNodes, what the policy decided, and what the runtime observed about WireGuard. No I/O."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Union

from nodecryptor.core.ports import PolicyRange, PortRange
from nodecryptor.core.settings import DEFAULT_WG_INTERFACE, FailMode

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

ROLE_WORKER = "worker"
ROLE_CONTROL_PLANE = "control-plane"
KIND_NODE_IP = "node-ip"
KIND_POD_CIDR = "pod-cidr"
DEFAULT_WG_PORT = 51871
"""Cilium's WireGuard listen port, used when the device's own cannot be read."""
WG_MARK = 0x0E00
"""The fwmark Cilium (1.18+) gives WireGuard's own encrypted output; 1.13-1.17 use 0x1E00."""
WG_MARK_MASK = 0x0F00
"""Under this mask both of Cilium's WireGuard marks read as WG_MARK."""


@dataclass(frozen=True)
class Rejection:
    """One entry of one object that nodecryptor does not use, or a conflict it reports.

    ``reason`` is one of ``admission.REASONS`` (a small fixed set: the metric label);
    ``why`` is the human-readable detail."""

    obj: str
    field: str
    value: str
    why: str
    reason: str = "malformed"
    kind: str = "CiliumNode"
    """The kind of object: CiliumNode, or EncryptionExemption (exemptions.py)."""

    def __str__(self) -> str:
        return f"{self.kind} {self.obj!r} {self.field}: {self.why} (value {self.value})"

    def to_json(self) -> dict[str, object]:
        if self.kind != "CiliumNode":
            # Not a node: the object's name under "name" (today's CiliumNode entries keep
            # their fields unchanged).
            return {
                "kind": self.kind,
                "name": self.obj,
                "field": self.field,
                "value": self.value,
                "reason": self.reason,
                "detail": self.why,
            }
        return {
            "node": self.obj,
            "field": self.field,
            "value": self.value,
            "reason": self.reason,
            "detail": self.why,
        }


@dataclass(frozen=True)
class NodeInfo:
    """The part of a CiliumNode the policy needs; never the whole object."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()
    """The CiliumNode's labels: any Cilium agent can write them (untrusted)."""
    addresses: tuple[tuple[str, IPAddress], ...] = ()
    """(type, address) pairs from spec.addresses, e.g. ("InternalIP", 192.168.50.21)."""
    pod_cidrs: tuple[IPNetwork, ...] = ()
    wg_public_key: str | None = None
    node_labels: tuple[tuple[str, str], ...] | None = None
    """Role labels of the v1 Node of the same name, which the NodeRestriction admission plugin
    protects from kubelets; None while that Node is not known. Merged in by the Store."""
    node_addresses: tuple[tuple[str, IPAddress], ...] | None = None
    """(type, address) pairs of the v1 Node's status.addresses, which only that node's kubelet
    may write (NodeRestriction); None while that Node is not known. The only source of node
    addresses the policy trusts. Merged in by the Store."""
    node_pod_cidrs: tuple[IPNetwork, ...] = ()
    """The v1 Node's spec.podCIDRs (Kubernetes IPAM: set by the controller manager, immutable
    once set); empty when Kubernetes does not allocate them."""
    has_ciliumnode: bool = True
    """False for a v1 Node whose CiliumNode is absent (deleted, or not written yet): the node
    still has the addresses and pod CIDRs its Node lists."""

    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class KubeNode:
    """What nodecryptor reads of one v1 Node: its labels (those the policy needs), the
    addresses its kubelet reports, and the pod CIDRs Kubernetes allocated to it."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()
    addresses: tuple[tuple[str, IPAddress], ...] = ()
    pod_cidrs: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class PodPools:
    """The cluster's pod address space, from sources only administrators write: Cilium's
    ``cilium-config`` ConfigMap (cluster-pool IPAM) and CiliumPodIPPool objects (multi-pool),
    or ``--cluster-pod-cidrs``, which overrides both."""

    cidrs: tuple[IPNetwork, ...] = ()
    source: str = "none"
    """"flag", "cilium" (ConfigMap and/or CiliumPodIPPools) or "none"."""
    problem: str = ""
    """Why no pool is known, when none is (reported by status, logs and a metric)."""

    def to_json(self) -> dict[str, object]:
        return {
            "cidrs": [str(c) for c in self.cidrs],
            "source": self.source,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class Destination:
    """A remote prefix whose traffic is encrypted."""

    prefix: IPNetwork
    node: str
    kind: str  # KIND_NODE_IP | KIND_POD_CIDR
    control_plane: bool
    exempt_ports: tuple[PolicyRange, ...] = ()
    """Destination ports that stay in the clear towards this prefix (node addresses only; the
    built-in policy's for a control-plane node included)."""
    client_of: frozenset[str] = frozenset()
    """Names of the policies the local node serves that this prefix's node is a client of:
    replies from the local node's addresses on their ports stay in the clear."""

    def sort_key(self) -> tuple[int, IPAddress, int, str, str]:
        return (
            self.prefix.version,
            self.prefix.network_address,
            self.prefix.prefixlen,
            self.node,
            self.kind,
        )

    def to_json(self) -> dict[str, object]:
        return {
            "prefix": str(self.prefix),
            "node": self.node,
            "kind": self.kind,
            "control_plane": self.control_plane,
            "exempt_ports": [r.to_json() for r in self.exempt_ports],
        }


@dataclass(frozen=True)
class Plan:
    """Cluster-level decision for one node: what to encrypt and what to exempt."""

    node: str
    role: str
    local_addresses: tuple[IPAddress, ...]
    destinations: tuple[Destination, ...]
    exempt_ports: tuple[PortRange, ...]
    local_known: bool = True
    """False when the local node's CiliumNode is not (yet) in the snapshot."""
    local_pod_cidrs: tuple[IPNetwork, ...] = ()
    """The local node's own pod CIDRs (never destinations)."""
    rejected: tuple[Rejection, ...] = field(default=(), compare=False)
    """Claims admission rejected, and conflicts (see admission.py). Not compared: the
    destinations already say everything the datapath needs."""
    serves: tuple[PolicyRange, ...] = ()
    """Ranges the local node serves (source-port exemptions)."""
    policies: tuple[str, ...] = ()
    """Names of the exemption policies in force, in datapath bit order (bit i = policies[i])."""

    def to_json(self) -> dict[str, object]:
        return {
            "node": self.node,
            "role": self.role,
            "local_addresses": [str(a) for a in self.local_addresses],
            "destinations": [d.to_json() for d in self.destinations],
            "exempt_ports": [p.to_json() for p in self.exempt_ports],
            "serves": [r.to_json() for r in self.serves],
            "rejected": [r.to_json() for r in self.rejected],
        }


@dataclass(frozen=True)
class WgPeer:
    public_key: str
    allowed_ips: tuple[IPNetwork, ...] = ()
    endpoint: str | None = None
    last_handshake: float | None = field(default=None, compare=False)
    """Seconds since the epoch, None when there never was a handshake. Not compared: it
    changes every few minutes per peer and means nothing to the datapath, so it must not make
    two otherwise equal states differ (the reconcile loop skips passes on equal inputs)."""
    rx_bytes: int = field(default=0, compare=False)
    """Bytes received from this peer since the device was configured (not compared, as
    ``last_handshake``: traffic counters change constantly and mean nothing to the datapath)."""
    tx_bytes: int = field(default=0, compare=False)
    """Bytes sent to this peer; peer health (nodecryptor.policy.peerhealth) watches it grow."""


@dataclass(frozen=True)
class WgState:
    """What nodecryptor saw of the WireGuard device."""

    ifname: str
    ifindex: int = 0
    present: bool = False
    up: bool = False
    mtu: int = 0
    listen_port: int = 0
    fwmark: int = 0
    peers: tuple[WgPeer, ...] | None = None
    """None when the peers could not be read (coverage is then unknown, not empty)."""
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.present and self.up and self.ifindex > 0


@dataclass(frozen=True)
class Device:
    """An underlay device nodecryptor attaches to."""

    name: str
    ifindex: int
    mtu: int
    networks: tuple[IPNetwork, ...] = ()
    """The subnets of the device's own addresses (admission rejects their broadcast address
    as another node's address)."""


@dataclass(frozen=True)
class CiliumFacts:
    """What nodecryptor learnt about the Cilium it runs next to, each fact with where it came
    from (derived by policy.cilium)."""

    routing_mode: str
    routing_mode_source: str
    node_ips_in_allowed_ips: bool | None
    """None when it cannot be told (peers unreadable, or no peer yet)."""
    node_ips_source: str
    wg_port: int
    wg_port_source: str
    wg_fwmark: int
    wg_fwmark_source: str
    wg_mtu: int
    wg_mtu_source: str
    tunnel_device: str | None = None
    wg_ifname: str = DEFAULT_WG_INTERFACE

    def to_json(self) -> dict[str, object]:
        return {
            "routing_mode": self.routing_mode,
            "wg_port": self.wg_port,
            "wg_fwmark": f"0x{self.wg_fwmark:x}",
            "wg_mtu": self.wg_mtu,
            "node_ips_in_allowed_ips": bool(self.node_ips_in_allowed_ips),
            "node_ips_in_allowed_ips_known": self.node_ips_in_allowed_ips is not None,
            "tunnel_device": self.tunnel_device,
            "sources": {
                "routing_mode": self.routing_mode_source,
                "wg_port": self.wg_port_source,
                "wg_fwmark": self.wg_fwmark_source,
                "wg_mtu": self.wg_mtu_source,
                "node_ips_in_allowed_ips": self.node_ips_source,
            },
        }


@dataclass(frozen=True)
class DesiredState:
    """Everything a datapath backend needs to realise, derived purely from a Plan plus runtime
    facts. Backends must make the kernel match this exactly (update, then prune)."""

    plan: Plan
    wg: WgState
    devices: tuple[Device, ...]
    fail_mode: FailMode
    enabled: bool
    uncovered: frozenset[IPNetwork] = frozenset()
    """Destinations no WireGuard peer's allowed-IPs cover."""
    mss_v4: int = 0
    mss_v6: int = 0
    max_packet_v4: int = 0
    """Largest inner IPv4 packet that crosses WireGuard without outer fragmentation."""
    max_packet_v6: int = 0
    wg_port: int = 0
    """UDP port WireGuard's own traffic uses at both ends; never re-encrypted. Resolved by the
    policy (the device's listen port, else Cilium's fixed 51871), so both backends exempt the
    same port."""
    wg_mark: int = WG_MARK
    wg_mark_mask: int = WG_MARK_MASK
    cilium_pod_cidrs: tuple[IPNetwork, ...] = ()
    """Local pod CIDRs whose traffic to remote pod CIDRs is left to Cilium (policy/cilium.py);
    empty when nodecryptor takes that traffic over or Cilium runs in tunnel mode."""
    cilium: CiliumFacts | None = field(default=None, compare=False, hash=False)
    """The Cilium facts the desired state was derived with (None: not detected)."""
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)
    ingress_enforcement: str = "audit"
    """settings.IngressEnforcement value: what nc_ingress does with clear text from peers."""

    @property
    def destinations(self) -> tuple[Destination, ...]:
        return self.plan.destinations
