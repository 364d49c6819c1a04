"""The ``alerts`` scenario: a real Prometheus (lab/prometheus.py) scrapes every agent with the
shipped alerting rules (lab variant: short holds and windows). WireGuard is broken on one
worker and a rogue host on the underlay sends clear text to another worker using the first
one's address; through Prometheus's HTTP API the scenario checks that the right alerts fire
for the right node and none for the others, that everything resolves after the repair, and
that `promtool check metrics` accepts a real agent's /metrics. The alert timeline is part of
the result.

With the ip-rule datapath nothing classifies clear text on ingress (no counters): the clear
text half is not run and the result says so."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time

from nodecryptor_testkit.wait import wait_for

from ..flows import PortAllocator, Result, Row
from ..prometheus import LabPrometheus, Timeline
from ..topology import LabError, sh
from .rogue import _build_rogue, _send

FIRE_SECONDS = 90.0
"""Bound on alert firing: a scrape, the lab's 3 s hold and evaluation, on a loaded machine."""
RESOLVE_SECONDS = 120.0
"""Bound on resolving: the lab's 15 s windows must empty, and the agent must notice the repair."""


def _row(result: Result, label: str, took: float | None, limit: float) -> None:
    result.rows.append(
        Row(
            label,
            f"<= {limit:.0f} s",
            f"<= {limit:.0f} s" if took is not None else "timed out",
            "" if took is None else f"{took:.1f} s",
        )
    )
    result.facts[label] = "timed out" if took is None else f"{took:.1f} s"


def _promtool_row(result: Result, prom: LabPrometheus, node: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        result.rows.append(Row(f"{node}: promtool check metrics", "clean", "promtool missing"))
        return
    out = subprocess.run(
        [promtool, "check", "metrics"],
        input=prom.scrape(node),
        capture_output=True,
        text=True,
        timeout=60,
    )
    text = (out.stdout + out.stderr).strip()
    result.rows.append(
        Row(
            f"{node}: promtool check metrics on the agent's /metrics",
            "clean",
            "clean" if out.returncode == 0 and not text else "problems",
            text,
        )
    )


class _Sender:
    """Sends the rogue's datagrams every half second until stopped, so the clear-text rate
    stays above zero for as long as the scenario waits."""

    def __init__(self, ns: str, src: str, dst: str):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ns, src, dst), daemon=True)
        self.thread.start()

    def _run(self, ns, src, dst):
        while not self.stop.wait(0.5):
            try:
                _send(ns, src, dst, "alerts")
            except OSError:
                pass  # the namespace may be going away

    def close(self):
        self.stop.set()
        self.thread.join(5)


def run(lab, ports: PortAllocator) -> Result:
    result = Result("alerts", lab.datapath)
    workers = lab.spec.workers
    if len(workers) < 2:
        result.error = "needs two workers (--nodes 3 or more)"
        return result
    victim, target = workers[-1], workers[0]
    others = [n for n in lab.nodes if n != victim.name]
    cleartext = lab.datapath == "bpf"
    prom = LabPrometheus(lab)
    timeline = Timeline(prom)
    rogue_ns, sender = None, None
    try:
        prom.start()
        timeline.started = time.monotonic()
        quiet = timeline.wait(lambda firing: not firing, 60, "no alert firing at the start")
        _row(result, "baseline: no alert firing", quiet, 60)
        _promtool_row(result, prom, target.name)

        lab.signal_standin(victim.name, signal.SIGUSR2)
        wait_for(
            lambda: not lab.wg_public_key(victim.name), 10, f"cilium_wg0 to go on {victim.name}"
        )
        want = {("NodecryptorWireGuardDown", victim.name)}
        if cleartext:
            rogue_ns = _build_rogue(lab, victim, target)
            sender = _Sender(rogue_ns, str(victim.ipv4), str(target.ipv4))
            want.add(("NodecryptorCleartextAccepted", target.name))
        else:
            result.facts["clear text half"] = (
                "not run: the ip-rule datapath does not classify ingress clear text (no counters)"
            )
        took = timeline.wait(lambda firing: want <= firing, FIRE_SECONDS, "the alerts to fire")
        _row(
            result,
            "fire: " + ", ".join(f"{a}{{node={n}}}" for a, n in sorted(want)),
            took,
            FIRE_SECONDS,
        )
        firing = timeline.poll()
        wrong = sorted(
            f"{a}{{node={n}}}"
            for a, n in firing
            if (a == "NodecryptorWireGuardDown" and n != victim.name)
            or (a == "NodecryptorCleartextAccepted" and n != target.name)
        )
        result.rows.append(Row("those alerts on no other node", "none", ", ".join(wrong) or "none"))
        if cleartext:
            _promtool_row(result, prom, target.name)  # with the leak counters non-zero

        if sender is not None:
            sender.close()
            sender = None
        lab.signal_standin(victim.name, signal.SIGUSR2)
        wait_for(
            lambda: lab.wg_public_key(victim.name), 10, f"cilium_wg0 to return on {victim.name}"
        )
        took = timeline.wait(lambda firing: not firing, RESOLVE_SECONDS, "every alert to resolve")
        _row(result, "repair: every alert resolved", took, RESOLVE_SECONDS)
        leftover = sorted(f"{a}{{node={n}}}" for a, n in timeline.current)
        if leftover:
            result.facts["still firing"] = ", ".join(leftover)
        result.facts["other nodes"] = ", ".join(others)
    except LabError as e:
        result.error = str(e)
    finally:
        if sender is not None:
            sender.close()
        if rogue_ns is not None:
            sh("ip", "netns", "del", rogue_ns, check=False)
        if not lab.wg_public_key(victim.name):
            lab.signal_standin(victim.name, signal.SIGUSR2)
        prom.stop()
    for i, line in enumerate(timeline.lines(), start=1):
        result.facts[f"alert timeline {i:02d}"] = line
    return result
