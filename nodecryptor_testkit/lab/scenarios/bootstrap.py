"""The ``bootstrap`` scenario: the first control-plane node "reboots" (new WireGuard key); while
peers hold the old key encrypted traffic to it fails but the API keeps working through the
exemption, the new key is published through that API, and encryption recovers."""

from __future__ import annotations

import signal
import threading
import time

from ...wait import wait_for
from ..flows import BLOCKED, CLEAR, ENCRYPTED, Flow, PortAllocator, Result, Row, observe
from ..spec import API_PORT, SERVICE_TCP_PORT
from .common import FAMILIES, annotation, poll_flow


def run(lab, ports: PortAllocator) -> Result:
    result = Result("bootstrap", lab.datapath)
    cp = lab.spec.control_plane[0].name
    w1 = lab.spec.workers[0].name
    old_key = lab.wg_public_key(cp)
    published_old = annotation(lab, cp)
    t0 = time.monotonic()
    lab.signal_standin(cp, signal.SIGUSR1)
    wait_for(
        lambda: lab.wg_public_key(cp) not in ("", old_key),
        15,
        f"{cp}'s WireGuard device to come back with a new key",
    )
    during = [
        Flow(w1, cp, 4, "tcp", SERVICE_TCP_PORT, BLOCKED, "peers hold the old key"),
        Flow(
            w1, cp, 4, "tcp", API_PORT, CLEAR, "apiserver through the exemption", connect_only=True
        ),
        Flow(w1, cp, 6, "tcp", 2379, CLEAR, "etcd through the exemption"),
    ]
    rows = observe(lab, during, ports, "bootstrap-during", timeout=1.0)
    still_old = annotation(lab, cp) == published_old
    result.rows += [Row("during: " + r.label, r.expected, r.observed, r.detail) for r in rows]
    result.rows.append(
        Row(
            "new key not yet published while the above ran",
            "yes",
            "yes" if still_old else "no",
            "" if still_old else "the stand-in published before it was told to",
        )
    )
    # The stand-in holds the new key back until told (like a cilium-agent still starting), so
    # the checks above ran while peers held the old key however slow this machine is.
    held = time.monotonic() - t0
    lab.signal_standin(cp, signal.SIGHUP)
    new_key = wait_for(
        lambda: (k := annotation(lab, cp)) not in ("", published_old) and k,
        30,
        f"{cp} to publish its new key",
    )
    t_pub = time.monotonic()
    result.rows.append(
        Row(
            f"{cp} publishes its new key through the API",
            "yes",
            "yes" if new_key == lab.wg_public_key(cp) else "no",
        )
    )
    recovery: dict[tuple[str, int], float | None] = {}

    def recover(src: str, fam: int) -> None:
        flow = Flow(src, cp, fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED)
        took = poll_flow(lab, flow, ports, 30)
        recovery[(src, fam)] = None if took is None else time.monotonic() - t_pub

    threads = [
        threading.Thread(target=recover, args=(w.name, fam))
        for w in lab.spec.workers
        for fam in FAMILIES
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recovered = [v for v in recovery.values() if v is not None]
    result.rows.append(
        Row(
            "encrypted connectivity to cp returns",
            "yes",
            "yes" if len(recovered) == len(recovery) else "no",
        )
    )
    after = [
        Flow(w.name, cp, fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "after recovery")
        for w in lab.spec.workers
        for fam in FAMILIES
    ]
    after += [
        Flow(cp, w.name, 4, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "after recovery")
        for w in lab.spec.workers
    ]
    result.rows += observe(lab, after, ports, "bootstrap-after")
    if recovered:
        result.facts["new key published -> encrypted traffic to cp again (slowest flow)"] = (
            f"{max(recovered):.2f} s"
        )
        result.facts["reboot -> encrypted again (includes the held-back publication)"] = (
            f"{t_pub - t0 + max(recovered):.2f} s"
        )
    result.facts["key held back (simulated cilium-agent start) for"] = f"{held:.2f} s"
    return result
