"""The lab's address plan, as plain data: node names, roles, addresses and pod CIDRs.

Pure functions only, so the plan can be printed, tested and turned into CiliumNode objects
without touching the kernel. All addresses are private and exist only inside the lab's
network namespaces.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

UNDERLAY_V4 = ipaddress.ip_network("192.168.50.0/24")
UNDERLAY_V6 = ipaddress.ip_network("fd50::/64")
UNDERLAY_MTU = 1500
WG_PORT = 51871
WG_FWMARK = 0x0E00
# Cilium sizes cilium_wg0 as the underlay MTU minus 95 (cilium/cilium#45940; minus 80 before).
WG_MTU = UNDERLAY_MTU - 95
VXLAN_PORT = 8472
"""Cilium's VXLAN port in tunnel mode (the lab's stand-in encapsulates pod traffic on it)."""
ROUTING_MODES = ("native", "tunnel")
API_PORT = 6443
EXEMPT_TCP_PORTS = (2379, 2380, 6443)
SERVICE_TCP_PORT = 8080
"""A non-exempt port every node and pod serves (stands for kubelet, a host-network app...)."""
SERVICE_UDP_PORT = 5353
EXTERNAL_HOST_INDEX = 250
"""Host part of a machine on the underlay that is not a cluster node (a router, a NAS)."""


@dataclass(frozen=True)
class NodeSpec:
    name: str
    index: int
    """1-based; drives every address of the node."""
    control_plane: bool
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address
    pod_cidr_v4: ipaddress.IPv4Network
    pod_cidr_v6: ipaddress.IPv6Network

    @property
    def pod_gateway_v4(self) -> ipaddress.IPv4Address:
        return self.pod_cidr_v4.network_address + 1

    @property
    def pod_gateway_v6(self) -> ipaddress.IPv6Address:
        return self.pod_cidr_v6.network_address + 1

    @property
    def pod_ipv4(self) -> ipaddress.IPv4Address:
        return self.pod_cidr_v4.network_address + 10

    @property
    def pod_ipv6(self) -> ipaddress.IPv6Address:
        return self.pod_cidr_v6.network_address + 10

    def address(self, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return self.ipv4 if family == 4 else self.ipv6

    def pod_address(self, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        return self.pod_ipv4 if family == 4 else self.pod_ipv6


@dataclass(frozen=True)
class LabSpec:
    nodes: tuple[NodeSpec, ...]
    external_v4: ipaddress.IPv4Address = field(
        default=UNDERLAY_V4.network_address + EXTERNAL_HOST_INDEX
    )
    external_v6: ipaddress.IPv6Address = field(
        default=UNDERLAY_V6.network_address + EXTERNAL_HOST_INDEX
    )

    @property
    def control_plane(self) -> tuple[NodeSpec, ...]:
        return tuple(n for n in self.nodes if n.control_plane)

    @property
    def workers(self) -> tuple[NodeSpec, ...]:
        return tuple(n for n in self.nodes if not n.control_plane)

    def node(self, name: str) -> NodeSpec:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(f"no lab node named {name!r}")

    def external(self, family: int):
        return self.external_v4 if family == 4 else self.external_v6


def node_spec(name: str, index: int, control_plane: bool) -> NodeSpec:
    return NodeSpec(
        name=name,
        index=index,
        control_plane=control_plane,
        ipv4=UNDERLAY_V4.network_address + 10 + index,
        ipv6=UNDERLAY_V6.network_address + 0x10 + index,
        pod_cidr_v4=ipaddress.ip_network(f"10.244.{index}.0/24"),
        pod_cidr_v6=ipaddress.ip_network(f"fd44:0:0:{index:x}::/64"),
    )


def make_spec(nodes: int = 3, control_planes: int = 1) -> LabSpec:
    """``nodes`` in total, the first ``control_planes`` of them control-plane (cp1, cp2...),
    the rest workers (w1, w2...)."""
    if control_planes < 1:
        raise ValueError(
            f"control_planes={control_planes}: the lab needs at least one "
            "control-plane node (it hosts the API server)"
        )
    if nodes < control_planes + 1:
        raise ValueError(
            f"nodes={nodes}: needs at least {control_planes + 1} "
            f"(control-plane nodes plus one worker)"
        )
    if nodes > 200:
        raise ValueError(f"nodes={nodes}: the address plan supports at most 200 nodes")
    specs = []
    for i in range(1, nodes + 1):
        cp = i <= control_planes
        name = f"cp{i}" if cp else f"w{i - control_planes}"
        specs.append(node_spec(name, i, cp))
    return LabSpec(nodes=tuple(specs))


def node_object(node: NodeSpec) -> dict:
    """The v1 Node as a kubelet registers it and kubeadm labels it: nodecryptor reads the
    control-plane role from these labels (NodeRestriction keeps kubelets from setting them)."""
    labels = {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux"}
    if node.control_plane:
        labels["node-role.kubernetes.io/control-plane"] = ""  # kubeadm: empty value
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node.name, "labels": labels},
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": str(node.ipv4)},
                {"type": "InternalIP", "address": str(node.ipv6)},
            ]
        },
    }


def cilium_config_object() -> dict:
    """Cilium's cilium-config ConfigMap naming the lab's pod pools (cluster-pool IPAM)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cilium-config", "namespace": "kube-system"},
        "data": {
            "ipam": "cluster-pool",
            "cluster-pool-ipv4-cidr": "10.244.0.0/16",
            "cluster-pool-ipv6-cidr": "fd44::/56",
        },
    }


def ciliumnode_object(node: NodeSpec, wg_pub_key: str | None = None) -> dict:
    """The CiliumNode as Cilium (and kubeadm's labels) would shape it."""
    labels = {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux"}
    if node.control_plane:
        labels["node-role.kubernetes.io/control-plane"] = ""  # kubeadm: empty value
    annotations = {}
    if wg_pub_key:
        annotations["network.cilium.io/wg-pub-key"] = wg_pub_key
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNode",
        "metadata": {"name": node.name, "labels": labels, "annotations": annotations},
        "spec": {
            "addresses": [
                {"type": "InternalIP", "ip": str(node.ipv4)},
                {"type": "InternalIP", "ip": str(node.ipv6)},
            ],
            "ipam": {"podCIDRs": [str(node.pod_cidr_v4), str(node.pod_cidr_v6)]},
        },
    }
