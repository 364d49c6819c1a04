"""CiliumNode objects shaped as Cilium writes them (cilium.io/v2), for the core's table tests."""

from __future__ import annotations

import copy

CP_LABEL = "node-role.kubernetes.io/control-plane"


def ciliumnode(
    name: str,
    ipv4: str | None,
    ipv6: str | None = None,
    pod_cidrs=(),
    labels: dict | None = None,
    wg_key: str | None = None,
    cilium_internal_ip: str | None = None,
) -> dict:
    base_labels = {
        "beta.kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
    }
    base_labels.update(labels or {})
    addresses = []
    if ipv4:
        addresses.append({"ip": ipv4, "type": "InternalIP"})
    if ipv6:
        addresses.append({"ip": ipv6, "type": "InternalIP"})
    if cilium_internal_ip:
        addresses.append({"ip": cilium_internal_ip, "type": "CiliumInternalIP"})
    annotations = {}
    if wg_key:
        annotations["network.cilium.io/wg-pub-key"] = wg_key
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNode",
        "metadata": {
            "name": name,
            "labels": base_labels,
            "annotations": annotations,
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "name": name,
                    "uid": f"00000000-0000-0000-0000-{abs(hash(name)) % 10**12:012d}",
                }
            ],
            "resourceVersion": "1000",
            "uid": f"11111111-0000-0000-0000-{abs(hash(name)) % 10**12:012d}",
            "creationTimestamp": "2026-11-01T10:00:00Z",
        },
        "spec": {
            "addresses": addresses,
            "alibaba-cloud": {},
            "azure": {},
            "bootid": "6c1d4a58-0c1e-4b69-9c6c-4f1f3f0b9e1a",
            "encryption": {},
            "eni": {},
            "health": {"ipv4": cilium_internal_ip} if cilium_internal_ip else {},
            "ingress": {},
            "ipam": {"podCIDRs": list(pod_cidrs), "pools": {}},
        },
        "status": {"alibaba-cloud": {}, "azure": {}, "eni": {}, "ipam": {"operator-status": {}}},
    }


WG_KEY = "nfG2tR0xq0XW3Ad7cW/0cO3tBj4M1M8s0lW2Ev4NQ1E="

KUBEADM_CP = ciliumnode(
    "cp1",
    "192.168.50.10",
    "fd50::10",
    ["10.244.0.0/24", "fd00:10:244::/64"],
    labels={CP_LABEL: ""},
    wg_key=WG_KEY,
    cilium_internal_ip="10.244.0.5",
)
K3S_CP = ciliumnode(
    "cp2",
    "192.168.50.11",
    None,
    ["10.244.5.0/24"],
    labels={CP_LABEL: "true", "node-role.kubernetes.io/master": "true"},
)
LEGACY_MASTER = ciliumnode(
    "old-master",
    "192.168.50.12",
    None,
    ["10.244.6.0/24"],
    labels={"node-role.kubernetes.io/master": ""},
)
W1 = ciliumnode(
    "w1",
    "192.168.50.21",
    "fd50::21",
    ["10.244.1.0/24", "fd00:10:244:1::/64"],
    wg_key=WG_KEY,
    cilium_internal_ip="10.244.1.9",
)
W2 = ciliumnode(
    "w2", "192.168.50.22", "fd50::22", ["10.244.2.0/24", "fd00:10:244:2::/64"], wg_key=WG_KEY
)
NO_PODCIDRS = ciliumnode("w3", "192.168.50.23", None, [])


def copy_of(obj: dict) -> dict:
    return copy.deepcopy(obj)
