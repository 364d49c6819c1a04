"""Extract a NodeInfo from a CiliumNode object (as a JSON-shaped dict), entry by entry, and a
KubeNode (labels, status.addresses, spec.podCIDRs) from a v1 Node; nothing else of either.

Malformed input never raises and never discards the valid parts of an object: each invalid
entry is skipped and reported as a Rejection, which the caller logs and counts. Addresses and
pod CIDRs of a special-purpose class (loopback, link-local, ...) are rejected here too, by
``admission.special_purpose``: the reasons live in admission.py, the rules that need the rest
of the cluster in topology.py.
"""

from __future__ import annotations

import ipaddress

from nodecryptor.policy.admission import special_purpose
from nodecryptor.core.model import KubeNode, NodeInfo, Rejection

__all__ = [
    "MAX_ADDRESSES",
    "MAX_LABELS",
    "MAX_POD_CIDRS",
    "WG_PUBKEY_ANNOTATION",
    "Rejection",
    "parse_ciliumnode",
    "parse_node_roles",
]

WG_PUBKEY_ANNOTATION = "network.cilium.io/wg-pub-key"
MAX_ADDRESSES = 64
"""More addresses than this on one node is absurd; the rest are rejected."""
MAX_POD_CIDRS = 64
MAX_LABELS = 512


def _short(value: object) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_ciliumnode(obj: object) -> tuple[NodeInfo | None, list[Rejection]]:
    """Return (NodeInfo or None when the object has no usable name, rejections)."""
    rejections: list[Rejection] = []
    if not isinstance(obj, dict):
        return None, [Rejection("?", "object", _short(obj), "not a JSON object")]
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name or len(name) > 253:
        return None, [Rejection("?", "metadata.name", _short(name), "missing or not a valid name")]

    def reject(field: str, value: object, why: str, reason: str = "malformed") -> None:
        rejections.append(Rejection(name, field, _short(value), why, reason))

    labels: list[tuple[str, str]] = []
    raw_labels = meta.get("labels") or {}
    if isinstance(raw_labels, dict):
        for i, (k, v) in enumerate(raw_labels.items()):
            if i >= MAX_LABELS:
                reject("metadata.labels", len(raw_labels), f"more than {MAX_LABELS} labels")
                break
            if isinstance(k, str) and isinstance(v, str):
                labels.append((k, v))
            else:
                reject(f"metadata.labels[{k!r}]", v, "label key and value must be strings")
    else:
        reject("metadata.labels", raw_labels, "not a map")

    pubkey = None
    annotations = meta.get("annotations") or {}
    if isinstance(annotations, dict):
        raw_key = annotations.get(WG_PUBKEY_ANNOTATION)
        if isinstance(raw_key, str) and len(raw_key) == 44:
            pubkey = raw_key
        elif raw_key is not None:
            reject(
                f"metadata.annotations[{WG_PUBKEY_ANNOTATION}]",
                raw_key,
                "not a base64 WireGuard public key",
            )
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        if spec is not None:
            reject("spec", spec, "not a map")
        spec = {}

    addresses = []
    raw_addresses = spec.get("addresses") or []
    if not isinstance(raw_addresses, list):
        reject("spec.addresses", raw_addresses, "not a list")
        raw_addresses = []
    for i, entry in enumerate(raw_addresses):
        field = f"spec.addresses[{i}]"
        if i >= MAX_ADDRESSES:
            reject("spec.addresses", len(raw_addresses), f"more than {MAX_ADDRESSES} addresses")
            break
        if not isinstance(entry, dict):
            reject(field, entry, "not a map")
            continue
        ip, kind = entry.get("ip"), entry.get("type")
        if not isinstance(kind, str) or not kind:
            reject(field + ".type", kind, "missing or not a string")
            continue
        try:
            if not isinstance(ip, str):
                raise ValueError
            addr = ipaddress.ip_address(ip)
        except ValueError:
            reject(field + ".ip", ip, "not an IP address")
            continue
        special = special_purpose(ipaddress.ip_network(addr))
        if special is not None:
            reject(
                field + ".ip", ip, f"not a node address: {special[0]} ({special[1]})", special[0]
            )
            continue
        addresses.append((kind, addr))

    cidrs = []
    ipam = spec.get("ipam") or {}
    raw_cidrs = ipam.get("podCIDRs") if isinstance(ipam, dict) else None
    if raw_cidrs is None:
        raw_cidrs = []
    if not isinstance(raw_cidrs, list):
        reject("spec.ipam.podCIDRs", raw_cidrs, "not a list")
        raw_cidrs = []
    for i, text in enumerate(raw_cidrs):
        field = f"spec.ipam.podCIDRs[{i}]"
        if i >= MAX_POD_CIDRS:
            reject("spec.ipam.podCIDRs", len(raw_cidrs), f"more than {MAX_POD_CIDRS} CIDRs")
            break
        try:
            if not isinstance(text, str):
                raise ValueError
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            reject(field, text, "not a CIDR")
            continue
        special = special_purpose(net)
        if special is not None:
            reject(field, text, f"not a pod CIDR: {special[0]} ({special[1]})", special[0])
            continue
        cidrs.append(net)

    info = NodeInfo(
        name=name,
        labels=tuple(sorted(labels)),
        addresses=tuple(addresses),
        pod_cidrs=tuple(cidrs),
        wg_public_key=pubkey,
    )
    return info, rejections


def parse_node_roles(
    obj: object, role_labels: tuple[str, ...] | None
) -> tuple[KubeNode | None, list[Rejection]]:
    """From a v1 Node (or its PartialObjectMetadata), return what the policy reads of it (None
    when it has no usable name): the labels among ``role_labels`` (None keeps every label; the
    agent's store then keeps the keys the exemption policies name), the addresses of
    ``status.addresses`` and the CIDRs of ``spec.podCIDRs``. Other label changes then never
    wake the reconcile loop. Special-purpose addresses and CIDRs are skipped and reported."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name or len(name) > 253:
        return None, [
            Rejection(
                "?", "Node metadata.name", _short(name), "missing or not a valid name", kind="Node"
            )
        ]
    rejections: list[Rejection] = []

    def reject(field: str, value: object, why: str, reason: str = "malformed") -> None:
        rejections.append(Rejection(name, field, _short(value), why, reason, kind="Node"))

    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        reject("metadata.labels", labels, "not a map")
        labels = {}
    kept = tuple(
        sorted(
            (k, v)
            for k, v in labels.items()
            if (role_labels is None or k in role_labels)
            and isinstance(k, str)
            and isinstance(v, str)
        )
    )
    status = obj.get("status")
    raw_addresses = status.get("addresses") if isinstance(status, dict) else None
    addresses = []
    for i, entry in enumerate(raw_addresses if isinstance(raw_addresses, list) else []):
        if i >= MAX_ADDRESSES:
            reject("status.addresses", len(raw_addresses), f"more than {MAX_ADDRESSES} addresses")
            break
        kind = entry.get("type") if isinstance(entry, dict) else None
        text = entry.get("address") if isinstance(entry, dict) else None
        if kind == "Hostname" or not isinstance(kind, str):
            continue  # a name, not an address
        try:
            addr = ipaddress.ip_address(text if isinstance(text, str) else "")
        except ValueError:
            reject(f"status.addresses[{i}].address", text, "not an IP address")
            continue
        special = special_purpose(ipaddress.ip_network(addr))
        if special is not None:
            reject(
                f"status.addresses[{i}].address",
                text,
                f"not a node address: {special[0]} ({special[1]})",
                special[0],
            )
            continue
        addresses.append((kind, addr))
    spec = obj.get("spec")
    raw_cidrs = spec.get("podCIDRs") if isinstance(spec, dict) else None
    cidrs = []
    for i, text in enumerate(raw_cidrs if isinstance(raw_cidrs, list) else []):
        if i >= MAX_POD_CIDRS:
            break
        try:
            net = ipaddress.ip_network(text if isinstance(text, str) else "", strict=False)
        except ValueError:
            reject(f"spec.podCIDRs[{i}]", text, "not a CIDR")
            continue
        special = special_purpose(net)
        if special is not None:
            reject(f"spec.podCIDRs[{i}]", text, f"not a pod CIDR: {special[0]}", special[0])
            continue
        cidrs.append(net)
    return KubeNode(name, kept, tuple(addresses), tuple(cidrs)), rejections
