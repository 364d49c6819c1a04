"""The ``cilium-restart`` scenario: every Cilium stand-in reloads its programs into its existing
tcx links (BPF_LINK_UPDATE), several times, under continuous traffic: nodecryptor stays at the
head of the chain, Cilium's links keep their ids, nothing non-exempt crosses in the clear, and
pod-to-pod traffic (Cilium's own) is still encrypted afterwards."""

from __future__ import annotations

import os
import signal
import time

from ...wait import wait_for
from ..capture import Capture
from ..flows import ENCRYPTED, Flow, PortAllocator, Result, Row, leaks, observe
from ..spec import SERVICE_TCP_PORT
from .common import FAMILIES
from .traffic import Traffic


CILIUM_RELOADS = 3
NODECRYPTOR_PROG = "nc_egress"
CILIUM_NETDEV_PROG = "cil_to_netdev"


def _tcx_order(lab, name: str) -> list[tuple[str, int, int]]:
    """(program name, program id, link id) on eth0's tcx egress of ``name``, in order."""
    chain = lab.egress_chain(name)
    return [(e.get("name") or "?", e["prog_id"], e["link_id"]) for e in chain.get("tcx") or ()]


def run(lab, ports: PortAllocator) -> Result:
    """Reload every Cilium stand-in's programs in place, several times, under traffic."""
    result = Result("cilium-restart", lab.datapath)
    names = list(lab.nodes)
    expected_head = [NODECRYPTOR_PROG] if lab.datapath == "bpf" else []
    before = {n: _tcx_order(lab, n) for n in names}
    cilium_links = {
        n: [link for prog, _, link in chain if prog == CILIUM_NETDEV_PROG]
        for n, chain in before.items()
    }
    path = os.path.join(lab.workdir, "cilium-restart.pcap")
    reload_times = []
    with Capture(lab.underlay, path) as cap, Traffic(lab, ports) as traffic:
        time.sleep(0.5)  # traffic is flowing before the first reload
        begin = time.time()
        for _ in range(CILIUM_RELOADS):
            old = {n: _tcx_order(lab, n) for n in names}
            started = time.monotonic()
            for n in names:
                lab.signal_standin(n, signal.SIGWINCH)
            for n in names:
                old_ids = {pid for prog, pid, _ in old[n] if prog == CILIUM_NETDEV_PROG}
                wait_for(
                    lambda n=n, o=old_ids: any(
                        prog == CILIUM_NETDEV_PROG and pid not in o
                        for prog, pid, _ in _tcx_order(lab, n)
                    ),
                    30,
                    f"the Cilium stand-in on {n} to reload its programs",
                )
            reload_times.append(time.monotonic() - started)
            time.sleep(0.3)  # traffic keeps flowing between reloads
        end = time.time()
        packets = cap.stop()
    after = {n: _tcx_order(lab, n) for n in names}
    for n in names:
        order = [prog for prog, _, _ in after[n]]
        want = expected_head + [CILIUM_NETDEV_PROG]
        result.rows.append(
            Row(
                f"{n} eth0 tcx egress after {CILIUM_RELOADS} Cilium reloads",
                " -> ".join(want),
                " -> ".join(order) or "empty",
            )
        )
        links = [link for prog, _, link in after[n] if prog == CILIUM_NETDEV_PROG]
        result.rows.append(
            Row(
                f"{n}: Cilium's link updated in place (same link id)",
                "yes",
                "yes" if links == cilium_links[n] and links else "no",
                f"before {cilium_links[n]}, after {links}",
            )
        )
    leaked = leaks(packets, lab.spec)
    during = [p for p in leaked if begin - 0.05 <= p.ts <= end + 0.05]
    result.rows.append(
        Row(
            "non-exempt packets in the clear during the reloads",
            "0",
            str(len(during)),
            ", ".join(str(p) for p in during[:3]),
        )
    )
    result.rows.append(
        Row(
            "whole run: non-exempt packets in the clear",
            "0",
            str(len(leaked)),
            ", ".join(str(p) for p in leaked[:3]),
        )
    )
    w1, w2 = lab.spec.workers[0].name, lab.spec.workers[-1].name
    cp = lab.spec.control_plane[0].name
    result.rows += observe(
        lab,
        [
            Flow(
                f"{w1}/pod",
                f"{w2}/pod",
                fam,
                "tcp",
                SERVICE_TCP_PORT,
                ENCRYPTED,
                "pod to pod after the reloads (Cilium's own)",
            )
            for fam in FAMILIES
        ]
        + [
            Flow(
                w1,
                f"{cp}/pod",
                fam,
                "tcp",
                SERVICE_TCP_PORT,
                ENCRYPTED,
                "node to remote pod after the reloads",
            )
            for fam in FAMILIES
        ],
        ports,
        "cilium-restart-after",
    )
    if lab.routing == "native":
        # What the stand-in counted before its last reload (logged by standin_datapath.py):
        # pod packets it sent to eth0 with dirty cb[], and pod-to-pod packets its
        # cil_to_netdev redirected into cilium_wg0 itself.
        logged = lab.log_tail(f"{w1}-standin", 200)
        line = [x for x in logged.splitlines() if "datapath reloaded in place" in x][-1:]
        fields = dict(
            part.split("=", 1) for part in (line[0].split() if line else []) if "=" in part
        )
        for key in ("lxc_redirect", "netdev_to_wireguard"):
            result.rows.append(
                Row(
                    f"{w1}: Cilium stand-in {key} packets between reloads",
                    "> 0",
                    "> 0" if int(fields.get(key, "0")) > 0 else "0",
                    line[0] if line else "no reload logged",
                )
            )
    status = lab.nodecryptor(w1, "status")
    cil = status.get("cilium") or {}
    if lab.datapath == "bpf" and lab.routing == "native":
        counted = (status.get("counters") or {}).get("cilium-pod-to-pod", {}).get("packets", 0)
        result.rows.append(
            Row(
                f"{w1}: nodecryptor passed pod-to-pod to Cilium (cilium-pod-to-pod counter)",
                "> 0",
                "> 0" if counted else "0",
            )
        )
    result.rows.append(
        Row(
            f"{w1}: status --json cilium.routing_mode",
            lab.routing,
            str(cil.get("routing_mode")),
            cil.get("sources", {}).get("routing_mode", ""),
        )
    )
    result.facts["Cilium reloads per node"] = str(CILIUM_RELOADS)
    result.facts["signal to reloaded on every node (slowest reload)"] = (
        f"{max(reload_times):.2f} s" if reload_times else "-"
    )
    result.facts["flows tried / failed meanwhile"] = f"{traffic.attempts} / {traffic.failures}"
    for error, example in list(traffic.errors.items())[:3]:
        result.facts[f"failure seen ({example})"] = error
    return result
