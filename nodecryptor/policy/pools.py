"""The cluster's pod pools from Cilium's own configuration, which only administrators write.

Two sources, both read whole and merged:

- the ``cilium-config`` ConfigMap in Cilium's namespace (cluster-pool IPAM): the keys
  ``cluster-pool-ipv4-cidr`` and ``cluster-pool-ipv6-cidr``, each one CIDR or several separated
  by spaces or commas;
- CiliumPodIPPool objects (``cilium.io/v2alpha1``, multi-pool IPAM): ``spec.ipv4.cidrs`` and
  ``spec.ipv6.cidrs``.

``--cluster-pod-cidrs`` overrides both (``topology.effective_pools``). Only these fields are read;
an entry that is not a CIDR, or is special-purpose space, is skipped and reported.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nodecryptor.core.model import IPNetwork, PodPools, Rejection
from nodecryptor.policy.admission import special_purpose

CONFIGMAP_NAME = "cilium-config"
CONFIGMAP_KEYS = ("cluster-pool-ipv4-cidr", "cluster-pool-ipv6-cidr")
POOL_GROUP = "cilium.io"
POOL_VERSION = "v2alpha1"
POOL_PLURAL = "ciliumpodippools"
MAX_POOL_CIDRS = 256
"""More CIDRs than this in one object is absurd; the rest are skipped and reported."""


def _cidrs(
    texts: Iterable[object], obj: str, field: str, kind: str
) -> tuple[list[IPNetwork], list[Rejection]]:
    out: list[IPNetwork] = []
    rejected: list[Rejection] = []
    for i, text in enumerate(texts):
        if i >= MAX_POOL_CIDRS:
            rejected.append(
                Rejection(obj, field, str(i), f"more than {MAX_POOL_CIDRS} CIDRs", kind=kind)
            )
            break
        try:
            net = ipaddress.ip_network(text if isinstance(text, str) else "", strict=False)
        except ValueError:
            rejected.append(Rejection(obj, field, str(text)[:80], "not a CIDR", kind=kind))
            continue
        special = special_purpose(net)
        if special is not None:
            rejected.append(
                Rejection(
                    obj, field, str(net), f"not pod space: {special[0]}", special[0], kind=kind
                )
            )
            continue
        out.append(net)
    return out, rejected


@dataclass(frozen=True)
class NamedPool:
    """The CIDRs one object (the ConfigMap, or one CiliumPodIPPool) contributes."""

    name: str
    cidrs: tuple[IPNetwork, ...] = ()


def parse_cilium_config(obj: object) -> tuple[NamedPool, list[Rejection]]:
    """The cluster-pool CIDRs of a ``cilium-config`` ConfigMap (empty when it names none)."""
    data = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(data, dict):
        return NamedPool(CONFIGMAP_NAME), []
    found: list[IPNetwork] = []
    rejected: list[Rejection] = []
    for key in CONFIGMAP_KEYS:
        value = data.get(key)
        if not isinstance(value, str):
            continue
        nets, bad = _cidrs(
            [t for t in re.split(r"[\s,]+", value) if t],
            CONFIGMAP_NAME,
            f"data[{key}]",
            "ConfigMap",
        )
        found += nets
        rejected += bad
    return NamedPool(CONFIGMAP_NAME, tuple(dict.fromkeys(found))), rejected


def parse_pod_ip_pool(obj: object) -> tuple[NamedPool | None, list[Rejection]]:
    """(name, CIDRs) of a CiliumPodIPPool, None without a usable name."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        return None, [
            Rejection(
                "?",
                "metadata.name",
                str(name)[:80],
                "missing or not a name",
                kind="CiliumPodIPPool",
            )
        ]
    spec = obj.get("spec")
    found: list[IPNetwork] = []
    rejected: list[Rejection] = []
    for family in ("ipv4", "ipv6"):
        section = spec.get(family) if isinstance(spec, dict) else None
        texts = section.get("cidrs") if isinstance(section, dict) else None
        if isinstance(texts, list):
            nets, bad = _cidrs(texts, name, f"spec.{family}.cidrs", "CiliumPodIPPool")
            found += nets
            rejected += bad
    return NamedPool(name, tuple(dict.fromkeys(found))), rejected


def combine(
    config: tuple[IPNetwork, ...] | None, pools: Mapping[str, tuple[IPNetwork, ...]]
) -> PodPools:
    """The pools of the ConfigMap (None: the ConfigMap does not exist) and of the
    CiliumPodIPPools, as one PodPools; ``problem`` says why there is none."""
    cidrs = tuple(dict.fromkeys([*(config or ()), *(c for n in sorted(pools) for c in pools[n])]))
    if cidrs:
        return PodPools(cidrs, "cilium")
    if config is None:
        return PodPools(
            problem=f"ConfigMap {CONFIGMAP_NAME} not found and no CiliumPodIPPool: "
            "pod CIDRs are checked against the breadth limit only"
        )
    return PodPools(
        problem=f"ConfigMap {CONFIGMAP_NAME} names no cluster-pool CIDR and no "
        "CiliumPodIPPool exists: pod CIDRs are checked against the "
        "breadth limit only"
    )
