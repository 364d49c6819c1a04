"""The ``rogue`` scenario: a host on the underlay that is not a node uses a worker's
address and sends clear text to another worker. With ``--ingress-enforcement=audit`` the target
accepts it but counts it and lists it (``status --leaks``); with ``enforce`` the target refuses
it on the wire; in both modes the bootstrap flows (worker to the control plane's 6443, 2379,
2380) still work, and so does a control-plane node rebooting with a new key (the ``bootstrap``
scenario, run again under ``enforce``). Under ``enforce`` the whole ``matrix`` runs again, so
a pod's exempt connection to the control plane (whose replies arrive in the clear) is judged
on the wire too.

The rogue never answers ARP (``arp off``) and reaches the target through a static neighbour
entry, so the real worker keeps its address on the segment. With the ip-rule datapath ingress
enforcement is unsupported: the scenario checks that it says so and that the clear text still
arrives (nothing is pretended).
"""

from __future__ import annotations

import json
import socket
import time

from .. import topology as topo
from ..flows import CLEAR, Flow, PortAllocator, Result, Row, observe
from ..spec import API_PORT
from . import bootstrap
from .matrix import matrix_flows

ROGUE_PORT = 7601
"""UDP port on the target node that a socket listens on for the rogue's datagrams."""
DATAGRAMS = 5


def _restart_agents(lab, mode: str) -> None:
    lab.ingress_enforcement = mode
    for name in lab.nodes:
        lab.stop_agent(name)
        lab.start_agent(name)
    for name in lab.nodes:
        lab.wait_agent_ready(name)
    lab.warm_up()


def _listen(netns: str) -> socket.socket:
    def make():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0", ROGUE_PORT))
        s.settimeout(0.2)
        return s

    return topo.call_in_netns(netns, make)


def _received(sock: socket.socket, wait: float = 1.5) -> int:
    got, deadline = 0, time.monotonic() + wait
    while time.monotonic() < deadline and got < DATAGRAMS:
        try:
            sock.recv(2048)
            got += 1
        except socket.timeout:
            pass
    return got


def _build_rogue(lab, impersonated, target) -> str:
    ns = topo.make_netns(lab.state, "rogue")
    topo.plug(lab.underlay, ns, "n-rogue", str(impersonated.ipv4), str(impersonated.ipv6))
    topo.sh("ip", "link", "set", "eth0", "arp", "off", netns=ns)
    link = json.loads(
        topo.sh("ip", "-j", "link", "show", "eth0", netns=lab.nodes[target.name].netns).stdout
    )[0]
    topo.sh(
        "ip",
        "neigh",
        "replace",
        str(target.ipv4),
        "lladdr",
        link["address"],
        "dev",
        "eth0",
        "nud",
        "permanent",
        netns=ns,
    )
    return ns


def _send(ns: str, src: str, dst: str, tag: str) -> None:
    def send():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((src, 0))
            for i in range(DATAGRAMS):
                s.sendto(f"rogue {tag} {i}".encode(), (dst, ROGUE_PORT))
        finally:
            s.close()

    topo.call_in_netns(ns, send)


def _leak_rows(lab, target: str, src: str, mode: str) -> tuple[list[Row], int]:
    report = lab.nodecryptor(target, "status", "--leaks")
    mine = [r for r in report.get("leaks", []) if r["src"] == src and r["dport"] == ROGUE_PORT]
    packets = mine[0]["packets"] if mine else 0
    rows = [
        Row(
            f"{target}: status --leaks lists {src} udp/{ROGUE_PORT} ({mode})",
            "listed",
            "listed" if mine else "absent",
            f"{packets} packets" if mine else "",
        )
    ]
    return rows, packets


def _bootstrap_flows(lab) -> list[Flow]:
    cp = lab.spec.control_plane[0].name
    w1 = lab.spec.workers[0].name
    return [
        Flow(w1, cp, 4, "tcp", API_PORT, CLEAR, "apiserver, exempt", connect_only=True),
        Flow(w1, cp, 4, "tcp", 2379, CLEAR, "etcd client, exempt"),
        Flow(w1, cp, 6, "tcp", 2380, CLEAR, "etcd peer, exempt"),
    ]


def run(lab, ports: PortAllocator) -> Result:
    result = Result("rogue", lab.datapath)
    workers = lab.spec.workers
    if len(workers) < 2:
        result.error = "needs two workers (--nodes 3 or more)"
        return result
    target, impersonated = workers[0], workers[-1]
    rogue_ns = _build_rogue(lab, impersonated, target)
    sock = _listen(lab.nodes[target.name].netns)
    src, dst = str(impersonated.ipv4), str(target.ipv4)
    try:
        modes = ("audit", "enforce") if lab.datapath == "bpf" else ("audit",)
        before = 0
        for mode in modes:
            _restart_agents(lab, mode)
            _send(rogue_ns, src, dst, mode)
            got = _received(sock)
            if lab.datapath != "bpf":
                result.rows.append(
                    Row(
                        f"rogue {src} -> {dst} udp/{ROGUE_PORT} ({mode}, unsupported)",
                        "arrives",
                        "arrives" if got else "refused",
                        f"{got}/{DATAGRAMS} datagrams received",
                    )
                )
                status = lab.nodecryptor(target.name, "status")
                ingress = status.get("ingress_enforcement", {})
                result.rows.append(
                    Row(
                        f"{target.name}: status ingress_enforcement.supported",
                        "False",
                        str(ingress.get("supported")),
                        ingress.get("reason", ""),
                    )
                )
                leaks = lab.nodecryptor(target.name, "status", "--leaks")
                result.rows.append(
                    Row(
                        f"{target.name}: status --leaks",
                        "not available",
                        "not available" if not leaks["supported"] else "listed",
                    )
                )
                result.facts["enforce with ip rules"] = (
                    "not run: the node would not become ready (ingress unsupported)"
                )
                continue
            expected = "arrives" if mode == "audit" else "refused"
            result.rows.append(
                Row(
                    f"rogue {src} -> {dst} udp/{ROGUE_PORT} ({mode})",
                    expected,
                    "arrives" if got else "refused",
                    f"{got}/{DATAGRAMS} datagrams received",
                )
            )
            rows, packets = _leak_rows(lab, target.name, src, mode)
            result.rows += rows
            result.rows.append(
                Row(
                    f"{target.name}: leak counter grew ({mode})",
                    "yes",
                    "yes" if packets >= before + DATAGRAMS else "no",
                    f"{before} -> {packets}",
                )
            )
            before = packets
            explain = lab.nodecryptor(
                target.name,
                "explain",
                "--direction",
                "ingress",
                "--src",
                src,
                "--dst",
                dst,
                "--proto",
                "udp",
                "--dport",
                str(ROGUE_PORT),
            )
            want = "pass" if mode == "audit" else "drop"
            result.rows.append(
                Row(
                    f"{target.name}: explain --direction ingress ({mode})",
                    want,
                    explain["verdict"],
                    explain["reason"],
                )
            )
            if mode == "enforce":
                # Every flow of the matrix with every node enforcing: the exempt flows a pod
                # opens to the control plane (its replies come back in the clear) included.
                result.rows += [
                    Row(f"enforce: {r.label}", r.expected, r.observed, r.detail)
                    for r in observe(lab, matrix_flows(lab), ports, "rogue-matrix")
                ]
            else:
                result.rows += observe(lab, _bootstrap_flows(lab), ports, f"rogue-{mode}")
        if lab.datapath == "bpf":
            # A control-plane node rebooting with a new key, with every node enforcing.
            boot = bootstrap.run(lab, ports)
            result.rows += [
                Row(f"bootstrap under enforce: {r.label}", r.expected, r.observed, r.detail)
                for r in boot.rows
            ]
            if boot.error:
                result.error = f"bootstrap under enforce: {boot.error}"
    finally:
        sock.close()
        topo.sh("ip", "netns", "del", rogue_ns, check=False)
        _restart_agents(lab, None)
    return result
