"""The ``peer-health`` scenario: a node reboots with a new WireGuard key and publishes it while the
other nodes' Cilium stand-ins are paused (their peers keep the old key, cilium/cilium#25492):
the other agents report ``key-mismatch`` and their NodeEncryptionReady says PeerKeyMismatch; the
stand-ins resume and it returns to EncryptionReady. Then cilium_wg0 goes on one node:
False/WireGuardDown within seconds, and True again when it is back. The PATCHes of nodes/status
are counted from the fake API server's own count."""

from __future__ import annotations

import signal
import time

from nodecryptor.policy.peerhealth import KEY_MISMATCH_HOLD
from ...wait import wait_for
from ..flows import PortAllocator, Result, Row
from .common import annotation, condition, patches, wait_condition


def run(lab, ports: PortAllocator) -> Result:
    result = Result("peer-health", lab.datapath)
    api = lab.api()
    names = [n.name for n in lab.spec.nodes]
    victim = lab.spec.workers[-1].name
    others = [n for n in names if n != victim]
    started, patches0 = time.monotonic(), patches(api)

    def row(label: str, took: float | None, limit: float) -> None:
        result.rows.append(
            Row(
                label,
                f"<= {limit:.0f} s",
                f"<= {limit:.0f} s"
                if took is not None and took <= limit
                else "timed out"
                if took is None
                else f"{took:.1f} s",
                "" if took is None else f"{took:.1f} s",
            )
        )
        result.facts[label] = "timed out" if took is None else f"{took:.1f} s"

    took = wait_condition(api, names, lambda c: c.get("status") == "True", 60)
    row("every node: NodeEncryptionReady=True", took, 60)
    # A stale peer after a reboot: the other nodes' Cilium (stand-ins) stop following the
    # annotations, the victim reboots with a new key and publishes it.
    for n in others:
        lab.signal_standin(n, signal.SIGSTOP)
    try:
        old_key = lab.wg_public_key(victim)
        lab.signal_standin(victim, signal.SIGUSR1)
        wait_for(
            lambda: lab.wg_public_key(victim) not in ("", old_key),
            15,
            f"{victim}'s device to come back with a new key",
        )

        # SIGHUP releases the held-back key; one that lands between the new device and the
        # stand-in arming its hold is lost, so repeat it until the key is published.
        def published() -> bool:
            if annotation(lab, victim) not in ("", old_key):
                return True
            lab.signal_standin(victim, signal.SIGHUP)
            return False

        # Half a second between repeats, giving the stand-in time to act on each signal.
        wait_for(published, 15, f"{victim} to publish its new key", interval=0.5)
        limit = KEY_MISMATCH_HOLD + 30
        took = wait_condition(
            api,
            others,
            lambda c: c.get("reason") == "PeerKeyMismatch" and victim in (c.get("message") or ""),
            limit,
        )
        row(
            f"other nodes: PeerKeyMismatch naming {victim} (hold {KEY_MISMATCH_HOLD:.0f} s)",
            took,
            limit,
        )
        sample = condition(api, others[0])
        result.facts[f"{others[0]} condition during the mismatch"] = (
            f"{sample.get('status')}/{sample.get('reason')}: {sample.get('message')}"
        )
    finally:
        for n in others:
            lab.signal_standin(n, signal.SIGCONT)
    # The resumed stand-ins first re-establish their own (stopped) API watches with backoff
    # before they rewrite the stale peer; under a loaded CI machine that alone took over 60 s
    # once, so the bound is the stand-ins' recovery plus the agents' 10 s write interval.
    took = wait_condition(api, others, lambda c: c.get("reason") == "EncryptionReady", 180)
    row("stand-ins resume: other nodes back to EncryptionReady", took, 180)
    # WireGuard down on one node, then back.
    wait_condition(api, [victim], lambda c: c.get("status") == "True", 60)
    lab.signal_standin(victim, signal.SIGUSR2)
    took = wait_condition(api, [victim], lambda c: c.get("reason") == "WireGuardDown", 30)
    row(f"{victim}: cilium_wg0 removed -> False/WireGuardDown", took, 20)
    lab.signal_standin(victim, signal.SIGUSR2)
    took = wait_condition(api, [victim], lambda c: c.get("status") == "True", 60)
    row(f"{victim}: cilium_wg0 back -> True", took, 30)
    seconds = time.monotonic() - started
    count = patches(api) - patches0
    result.facts["nodes/status PATCHes during the scenario"] = (
        f"{count} in {seconds:.0f} s on {len(names)} nodes ({count / seconds:.3f}/s)"
    )
    return result
