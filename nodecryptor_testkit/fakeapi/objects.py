"""CiliumNode objects shaped as Cilium writes them, Status objects, and JSON merge patch."""

from __future__ import annotations

import copy
import ipaddress
import json
import uuid


GROUP = "cilium.io"
VERSION = "v2"
PLURAL = "ciliumnodes"
KIND = "CiliumNode"
API_VERSION = f"{GROUP}/{VERSION}"
COLLECTION = f"/apis/{GROUP}/{VERSION}/{PLURAL}"
WG_PUBKEY_ANNOTATION = "network.cilium.io/wg-pub-key"
CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"
MASTER_LABEL = "node-role.kubernetes.io/master"
# Fixed namespace for uuid5 so that generated objects (and the bundled example) are stable.
_UID_NAMESPACE = uuid.UUID("6c1f4b1e-2a53-4d0c-9a43-6e6f64656372")


def make_ciliumnode(
    name: str,
    ipv4: str | None = None,
    ipv6: str | None = None,
    pod_cidrs: list[str] | tuple[str, ...] = (),
    control_plane: bool = False,
    label_style: str = "kubeadm",
    wg_pub_key: str | None = None,
) -> dict:
    """A CiliumNode shaped like the ones the Cilium agent writes for a Node.

    ``label_style`` picks how the Node marks a control-plane node, which Cilium copies:
    "kubeadm" (``node-role.kubernetes.io/control-plane: ""``), "k3s" (control-plane and master
    both ``"true"``) or "master" (old kubeadm, ``node-role.kubernetes.io/master: ""``).
    resourceVersion and creationTimestamp are filled in by the server when the object is
    stored; uid, bootid and the owner's uid are derived from the name so output is stable.
    """
    if label_style not in ("kubeadm", "k3s", "master"):
        raise ValueError(f"label_style {label_style!r}: expected kubeadm, k3s or master")
    labels = {
        "beta.kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
    }
    if control_plane:
        if label_style == "kubeadm":
            labels[CONTROL_PLANE_LABEL] = ""
            labels["node.kubernetes.io/exclude-from-external-load-balancers"] = ""
        elif label_style == "k3s":
            labels[CONTROL_PLANE_LABEL] = "true"
            labels[MASTER_LABEL] = "true"
        else:
            labels[MASTER_LABEL] = ""
    annotations = {}
    if wg_pub_key is not None:
        annotations[WG_PUBKEY_ANNOTATION] = wg_pub_key
    addresses = []
    for ip in (ipv4, ipv6):
        if ip:
            addresses.append({"type": "InternalIP", "ip": ip})
    health: dict = {}
    for cidr in pod_cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        # Cilium takes cilium_host's address (CiliumInternalIP) and the health endpoint's
        # address from the node's pod CIDR; which host numbers is the allocator's choice.
        if net.num_addresses > 4:
            addresses.append({"type": "CiliumInternalIP", "ip": str(net.network_address + 1)})
            health[f"ipv{net.version}"] = str(net.network_address + 2)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "name": name,
                    "uid": str(uuid.uuid5(_UID_NAMESPACE, "node/" + name)),
                }
            ],
            "uid": str(uuid.uuid5(_UID_NAMESPACE, "ciliumnode/" + name)),
        },
        "spec": {
            "addresses": addresses,
            "alibaba-cloud": {},
            "azure": {},
            "bootid": str(uuid.uuid5(_UID_NAMESPACE, "boot/" + name)),
            "encryption": {},
            "eni": {},
            "health": health,
            "ingress": {},
            "ipam": {"podCIDRs": list(pod_cidrs), "pools": {}},
        },
        "status": {"alibaba-cloud": {}, "azure": {}, "eni": {}, "ipam": {"operator-status": {}}},
    }


NODE_COLLECTION = "/api/v1/nodes"
EXEMPTION_COLLECTION = "/apis/nodecryptor.io/v1alpha1/encryptionexemptions"
POD_IP_POOL_COLLECTION = "/apis/cilium.io/v2alpha1/ciliumpodippools"


def make_cilium_config(ipv4: str = "", ipv6: str = "", namespace: str = "kube-system") -> dict:
    """Cilium's ``cilium-config`` ConfigMap with the cluster-pool IPAM keys (each may list
    several CIDRs separated by spaces)."""
    data = {"ipam": "cluster-pool", "enable-wireguard": "true", "routing-mode": "native"}
    if ipv4:
        data["cluster-pool-ipv4-cidr"] = ipv4
    if ipv6:
        data["cluster-pool-ipv6-cidr"] = ipv6
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "cilium-config", "namespace": namespace},
        "data": data,
    }


def make_pod_ip_pool(name: str, ipv4: list | tuple = (), ipv6: list | tuple = ()) -> dict:
    """A CiliumPodIPPool (cilium.io/v2alpha1, multi-pool IPAM)."""
    spec: dict = {}
    if ipv4:
        spec["ipv4"] = {"cidrs": list(ipv4), "maskSize": 24}
    if ipv6:
        spec["ipv6"] = {"cidrs": list(ipv6), "maskSize": 64}
    return {
        "apiVersion": "cilium.io/v2alpha1",
        "kind": "CiliumPodIPPool",
        "metadata": {"name": name},
        "spec": spec,
    }


def make_exemption(
    name: str,
    node_selector: dict | None = None,
    ports: list | None = None,
    client_selector: dict | None = None,
) -> dict:
    """An EncryptionExemption (nodecryptor.io/v1alpha1)."""
    spec: dict = {
        "nodeSelector": node_selector if node_selector is not None else {},
        "ports": ports if ports is not None else [{"port": 9345}],
    }
    if client_selector is not None:
        spec["clientNodeSelector"] = client_selector
    return {
        "apiVersion": "nodecryptor.io/v1alpha1",
        "kind": "EncryptionExemption",
        "metadata": {"name": name},
        "spec": spec,
    }


META_API_VERSION = "meta.k8s.io/v1"


def make_node(
    name: str,
    control_plane: bool = False,
    label_style: str = "kubeadm",
    ipv4: str | None = None,
    ipv6: str | None = None,
    pod_cidrs: list | tuple = (),
) -> dict:
    """A v1 Node shaped like the ones a kubelet registers (and kubeadm labels). Its
    ``node-role.kubernetes.io/*`` labels are what NodeRestriction keeps kubelets from setting;
    nodecryptor reads the control-plane role from them, and the node addresses from
    ``status.addresses``. ``label_style`` as in make_ciliumnode. ``pod_cidrs``: the
    ``spec.podCIDRs`` Kubernetes IPAM allocates (none: Cilium's own IPAM)."""
    if label_style not in ("kubeadm", "k3s", "master"):
        raise ValueError(f"label_style {label_style!r}: expected kubeadm, k3s or master")
    labels = {
        "beta.kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
    }
    if control_plane:
        if label_style == "kubeadm":
            labels[CONTROL_PLANE_LABEL] = ""
            labels["node.kubernetes.io/exclude-from-external-load-balancers"] = ""
        elif label_style == "k3s":
            labels[CONTROL_PLANE_LABEL] = "true"
            labels[MASTER_LABEL] = "true"
        else:
            labels[MASTER_LABEL] = ""
    addresses = [{"type": "InternalIP", "address": ip} for ip in (ipv4, ipv6) if ip]
    addresses.append({"type": "Hostname", "address": name})
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
            "uid": str(uuid.uuid5(_UID_NAMESPACE, "node/" + name)),
        },
        "spec": {
            **(
                {
                    "taints": [
                        {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
                    ]
                }
                if control_plane
                else {}
            ),
            **({"podCIDR": pod_cidrs[0], "podCIDRs": list(pod_cidrs)} if pod_cidrs else {}),
        },
        "status": {
            "addresses": addresses,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "nodeInfo": {"kubeletVersion": "v1.33.0", "architecture": "amd64"},
        },
    }


def partial_object_metadata(obj: dict) -> dict:
    """The metadata-only form of ``obj``, as the API server sends it to a client that asked
    for ``as=PartialObjectMetadata``: no spec, no status."""
    return {
        "apiVersion": META_API_VERSION,
        "kind": "PartialObjectMetadata",
        "metadata": obj.get("metadata", {}),
    }


def status_object(code: int, reason: str, message: str, name: str | None = None) -> dict:
    """A metav1.Status, the body of every error the API server returns."""
    out = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if name is not None:
        out["details"] = {"name": name, "group": GROUP, "kind": PLURAL}
    return out


def merge_patch(target: object, patch: object) -> object:
    """JSON merge patch (RFC 7386): null deletes, objects merge, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def load_objects(path: str) -> list[dict]:
    """A JSON list of objects, or a CiliumNodeList (``{"items": [...]}``)."""
    with open(path) as f:
        data = json.load(f)
    items = data.get("items") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of CiliumNodes or an object with items")
    return items
