"""The ``matrix`` scenario: every kind of flow in both families, encrypted or exempt as the
policy says."""

from __future__ import annotations

from ..flows import CLEAR, ENCRYPTED, Flow, PortAllocator, Result, observe
from ..spec import API_PORT, SERVICE_TCP_PORT, SERVICE_UDP_PORT
from .common import FAMILIES


def _api_flow(family: int) -> bool:
    """The fake API listens on the first control-plane node's IPv4 address and speaks HTTP,
    not echo: judge those flows on the TCP handshake."""
    return family == 4


def matrix_flows(lab) -> list[Flow]:
    spec = lab.spec
    cp = spec.control_plane[0].name
    w1, w2 = spec.workers[0].name, spec.workers[-1].name
    flows = []
    for fam in FAMILIES:
        flows += [
            Flow(w1, w2, fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "node to node"),
            Flow(w1, w2, fam, "udp", SERVICE_UDP_PORT, ENCRYPTED, "node to node"),
            Flow(w1, w2, fam, "icmp", 0, ENCRYPTED, "node to node"),
            Flow(w1, f"{w2}/pod", fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "node to remote pod"),
            Flow(f"{w1}/pod", w2, fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "pod to remote node"),
            Flow(f"{w1}/pod", f"{w2}/pod", fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "pod to pod"),
            Flow(
                w1,
                cp,
                fam,
                "tcp",
                API_PORT,
                CLEAR,
                "apiserver, exempt",
                connect_only=_api_flow(fam),
            ),
            Flow(w1, cp, fam, "tcp", 2379, CLEAR, "etcd client, exempt"),
            Flow(w1, cp, fam, "tcp", 2380, CLEAR, "etcd peer, exempt"),
            # In tunnel mode Cilium carries pod traffic to other nodes in VXLAN between node
            # addresses, which nodecryptor encrypts whatever is inside: no exemption for pods.
            Flow(
                f"{w1}/pod",
                cp,
                fam,
                "tcp",
                API_PORT,
                CLEAR,
                "pod to apiserver, exempt",
                connect_only=_api_flow(fam),
            )
            if getattr(lab, "routing", "native") == "native"
            else Flow(
                f"{w1}/pod",
                cp,
                fam,
                "tcp",
                API_PORT,
                ENCRYPTED,
                "pod to apiserver, inside Cilium's tunnel",
                connect_only=_api_flow(fam),
            ),
            Flow(w1, cp, fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "non-exempt port on cp"),
            Flow(w1, cp, fam, "udp", API_PORT, ENCRYPTED, "exemption is TCP only"),
            Flow(cp, w1, fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "cp to worker"),
            Flow(cp, w1, fam, "tcp", API_PORT, ENCRYPTED, "6443 on a worker is not exempt"),
            Flow(w1, "ext", fam, "tcp", SERVICE_TCP_PORT, CLEAR, "not a cluster address"),
        ]
        if len(spec.control_plane) > 1:
            other = spec.control_plane[1].name
            flows.append(Flow(cp, other, fam, "tcp", 2380, CLEAR, "etcd between cp nodes"))
            flows.append(Flow(other, cp, fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "cp to cp"))
    if spec.workers[0].name == spec.workers[-1].name:
        flows = [f for f in flows if f.src.split("/")[0] != f.dst.split("/")[0]]
    return flows


def run(lab, ports: PortAllocator) -> Result:
    result = Result("matrix", lab.datapath)
    result.rows = observe(lab, matrix_flows(lab), ports, "matrix")
    return result
