"""The ``forged-claims`` scenario: an attacker holding one node's Cilium service account, which
may write every CiliumNode, tries the forgeries of the trust review at once, and the flows of
the ``matrix`` scenario are checked on the underlay afterwards: nothing that should be
encrypted crosses in the clear, nothing outside the cluster is captured.

- a CiliumNode with no Node behind it and no WireGuard key claims the remote worker's pod
  address as a /32 (once, this removed the worker's whole pod CIDR from every node);
- the first worker's own CiliumNode gets hostile entries: the whole pod pool and the underlay
  subnet as pod CIDRs, the other nodes' addresses as its own (once, every remote claim then
  overlapped the "local node" and nothing was encrypted from it);
- the remote worker's CiliumNode claims the lab's external host as a node address (once, the
  first worker's traffic to it went into WireGuard instead of out in the clear).

After the attacks an honest node joins (a Node and a CiliumNode with an address no attack
touches); once every agent has installed it, the attacks before it have been seen. Then the
flows are observed and the objects put back.
"""

from __future__ import annotations

import copy
import time

from ..flows import PortAllocator, Result, Row, observe
from ..spec import UNDERLAY_V4, UNDERLAY_V6
from .churn import _follow_time
from .common import installed_text
from .matrix import matrix_flows

GHOST = "forged-ghost"
MARKER = "forged-marker"
MARKER_IP = "198.51.100.77"
"""The honest joiner's address (TEST-NET-2): outside everything the attacks claim."""


def _ciliumnode(lab, name: str) -> dict:
    for obj in lab.api().list_ciliumnodes():
        if obj["metadata"]["name"] == name:
            return obj
    raise KeyError(f"no CiliumNode {name!r} in the lab's API")


def _apply(lab, obj: dict) -> None:
    body = copy.deepcopy(obj)
    body["metadata"].pop("resourceVersion", None)
    lab.api().fake_control("apply", {"object": body})


def run(lab, ports: PortAllocator) -> Result:
    result = Result("forged-claims", lab.datapath)
    spec = lab.spec
    w1, w2 = spec.workers[0], spec.workers[-1]
    cp = spec.control_plane[0]
    originals = {n: _ciliumnode(lab, n) for n in {w1.name, w2.name}}
    victim_pod = w2.pod_address(4)
    try:
        own = copy.deepcopy(originals[w1.name])
        own["spec"]["ipam"]["podCIDRs"] += ["10.244.0.0/16", str(UNDERLAY_V4), str(UNDERLAY_V6)]
        own["spec"]["addresses"] += [{"type": "InternalIP", "ip": str(n.ipv4)} for n in (cp, w2)]
        _apply(lab, own)
        remote = copy.deepcopy(originals[w2.name])
        remote["spec"]["addresses"] += [
            {"type": "InternalIP", "ip": str(spec.external(f))} for f in (4, 6)
        ]
        _apply(lab, remote)
        ghost = {
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumNode",
            "metadata": {"name": GHOST, "labels": {}, "annotations": {}},
            "spec": {"addresses": [], "ipam": {"podCIDRs": [f"{victim_pod}/32"]}},
        }
        _apply(lab, ghost)
        since = time.monotonic()
        _apply(
            lab,
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": MARKER, "labels": {}},
                "status": {"addresses": [{"type": "InternalIP", "address": MARKER_IP}]},
            },
        )
        _apply(
            lab,
            {
                "apiVersion": "cilium.io/v2",
                "kind": "CiliumNode",
                "metadata": {"name": MARKER, "labels": {}, "annotations": {}},
                "spec": {
                    "addresses": [{"type": "InternalIP", "ip": MARKER_IP}],
                    "ipam": {"podCIDRs": []},
                },
            },
        )
        took = _follow_time(lab, [cp.name, w1.name], [MARKER_IP], True, since, timeout=30.0)
        result.facts["attacks seen by every agent"] = ", ".join(
            f"{n} {s:.2f} s" for n, s in sorted(took.items())
        )
        result.rows = observe(lab, matrix_flows(lab), ports, "forged-claims")
        ext = str(spec.external(4))
        for name in (cp.name, w1.name):
            held = ext in installed_text(lab, name)
            result.rows.append(
                Row(
                    f"{name}: external host {ext} not a destination",
                    "absent",
                    "present" if held else "absent",
                )
            )
    finally:
        for obj in originals.values():
            _apply(lab, obj)
        for name in (GHOST, MARKER):
            try:
                lab.api().delete(name)
            except Exception:
                pass
        lab.api().fake_control("delete-node", {"name": MARKER})
    return result
