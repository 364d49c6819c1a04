"""The ``wg-down`` scenario: cilium_wg0 disappears on one worker: cluster traffic is dropped
(fail-closed), nothing leaks, exempt and non-cluster flows still work; when it returns, traffic
is encrypted."""

from __future__ import annotations

import os
import signal

from ...wait import wait_for
from ..capture import Capture
from ..flows import BLOCKED, CLEAR, ENCRYPTED, Flow, PortAllocator, Result, Row, leaks, observe
from ..spec import API_PORT, SERVICE_TCP_PORT
from .common import FAMILIES, poll_flow


def run(lab, ports: PortAllocator) -> Result:
    result = Result("wg-down", lab.datapath)
    victim = lab.spec.workers[-1].name
    other = lab.spec.workers[0].name if len(lab.spec.workers) > 1 else None
    cp = lab.spec.control_plane[0].name
    peer = other or cp
    path = os.path.join(lab.workdir, "wg-down.pcap")
    with Capture(lab.underlay, path) as cap:
        lab.signal_standin(victim, signal.SIGUSR2)
        wait_for(lambda: not lab.wg_public_key(victim), 10, f"cilium_wg0 to go on {victim}")
        down = [
            Flow(victim, peer, 4, "tcp", SERVICE_TCP_PORT, BLOCKED, "cilium_wg0 gone"),
            Flow(victim, peer, 6, "tcp", SERVICE_TCP_PORT, BLOCKED, "cilium_wg0 gone"),
            Flow(f"{victim}/pod", peer, 4, "tcp", SERVICE_TCP_PORT, BLOCKED, "cilium_wg0 gone"),
            Flow(victim, f"{peer}/pod", 6, "tcp", SERVICE_TCP_PORT, BLOCKED, "cilium_wg0 gone"),
            Flow(peer, victim, 4, "tcp", SERVICE_TCP_PORT, BLOCKED, "towards the node"),
            Flow(victim, cp, 4, "tcp", API_PORT, CLEAR, "apiserver, exempt", connect_only=True),
            Flow(victim, cp, 6, "tcp", 2380, CLEAR, "etcd, exempt"),
            Flow(victim, "ext", 4, "tcp", SERVICE_TCP_PORT, CLEAR, "not a cluster address"),
        ]
        rows = observe(lab, down, ports, "wg-down-flows")
        packets_down = cap.stop()
    leaked = leaks(packets_down, lab.spec)
    result.rows += [Row("down: " + r.label, r.expected, r.observed, r.detail) for r in rows]
    result.rows.append(
        Row(
            "down: non-exempt packets in the clear",
            "0",
            str(len(leaked)),
            ", ".join(str(p) for p in leaked[:3]),
        )
    )
    lab.signal_standin(victim, signal.SIGUSR2)
    wait_for(lambda: lab.wg_public_key(victim), 10, f"cilium_wg0 to return on {victim}")
    took = poll_flow(lab, Flow(victim, peer, 4, "tcp", SERVICE_TCP_PORT, ENCRYPTED), ports, 30)
    result.facts["device back to traffic flowing"] = (
        f"{took:.2f} s" if took is not None else "did not recover within 30 s"
    )
    back = [
        Flow(victim, peer, fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "device back")
        for fam in FAMILIES
    ]
    back += [Flow(peer, f"{victim}/pod", 4, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "device back")]
    result.rows += observe(lab, back, ports, "wg-down-back")
    return result
