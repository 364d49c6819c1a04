"""The ``restart`` scenario: nodecryptor is stopped (SIGTERM, then SIGKILL) and restarted on every
node under continuous traffic; nothing non-exempt may cross in the clear meanwhile."""

from __future__ import annotations

import os
import signal
import threading
import time

from ..capture import Capture
from ..flows import PortAllocator, Result, Row, leaks
from .traffic import Traffic


def run(lab, ports: PortAllocator) -> Result:
    """Stop nodecryptor on every node at once (SIGTERM, later SIGKILL), leave the nodes without
    an agent for a moment, start them again and wait until all are ready, all under traffic."""
    result = Result("restart", lab.datapath)
    phases = []
    path = os.path.join(lab.workdir, "restart.pcap")
    names = list(lab.nodes)
    with Capture(lab.underlay, path) as cap, Traffic(lab, ports) as traffic:
        time.sleep(0.5)  # traffic is flowing before the first stop
        for sig in (signal.SIGTERM, signal.SIGKILL):
            begin = time.time()
            failures_before = traffic.failures
            threads = [threading.Thread(target=lab.stop_agent, args=(n, sig)) for n in names]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            time.sleep(0.5)  # traffic keeps flowing while no agent runs anywhere
            restarted = time.monotonic()
            for name in names:
                lab.start_agent(name)
            for name in names:
                lab.wait_agent_ready(name)
            ready = time.monotonic() - restarted
            time.sleep(0.5)  # and after the agents took over again
            phases.append((sig, begin, time.time(), ready, traffic.failures - failures_before))
        packets = cap.stop()
    leaked = leaks(packets, lab.spec)
    for sig, begin, end, ready, failed in phases:
        n = sum(1 for p in leaked if begin - 0.05 <= p.ts <= end + 0.05)
        result.rows.append(
            Row(
                f"{signal.Signals(sig).name} nodecryptor on {', '.join(names)}, restart",
                "0 clear",
                f"{n} clear",
                ", ".join(str(p) for p in leaked[:3]),
            )
        )
        result.facts[f"{signal.Signals(sig).name}: restart to all ready"] = f"{ready:.1f} s"
        result.facts[f"{signal.Signals(sig).name}: flows that failed meanwhile"] = str(failed)
    result.rows.append(
        Row(
            "whole run: non-exempt packets in the clear",
            "0",
            str(len(leaked)),
            ", ".join(str(p) for p in leaked[:3]),
        )
    )
    result.facts["flows tried"] = str(traffic.attempts)
    for error, example in list(traffic.errors.items())[:3]:
        result.facts[f"failure seen ({example})"] = error
    result.facts["packets captured"] = str(len(packets))
    return result
