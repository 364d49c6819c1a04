"""The ``churn`` scenario: a node joins and leaves through the API; every agent's maps or rules
follow, within bounds it measures."""

from __future__ import annotations

import time

from nodecryptor.core.settings import Settings
from ..flows import ENCRYPTED, Flow, PortAllocator, Result, Row, observe
from ..spec import SERVICE_TCP_PORT, ciliumnode_object, node_object, node_spec
from ..topology import LabError
from .common import cli_text, installed_text, patches, poll_flow, seconds_until, wait_condition


def _follow_time(
    lab, nodes: list[str], needles: list[str], present: bool, since: float, timeout: float = 10.0
) -> dict[str, float]:
    """For each node: seconds from ``since`` until its datapath holds all ``needles`` (or none
    of them, when ``present`` is false). Raises at the deadline."""

    def holds(name: str) -> bool:
        text = installed_text(lab, name)
        return all((n in text) == present for n in needles)

    took, missing = seconds_until(nodes, holds, since, timeout, 0.01)
    if missing:
        raise LabError(
            f"{', '.join(missing)} did not {'install' if present else 'remove'} "
            f"{', '.join(needles)} within {timeout} s"
        )
    return took


COVERAGE_LIMIT_SECONDS = 3.0
"""A 1 s re-check interval plus a pass and the probe's own polling, with head-room for a
loaded 2-core machine."""


def _follow_covered(
    lab, nodes: list[str], new, since: float, timeout: float = 45.0
) -> dict[str, float]:
    """Seconds until each agent sends the new node's IPv4 address into WireGuard (BPF: the
    destination is no longer flagged uncovered; ip rules: its route points at cilium_wg0)."""
    prefix = f"{new.ipv4}/32"

    def covered(name: str) -> bool:
        if lab.datapath == "bpf":
            from nodecryptor.datapath.bpf import inspect as bpf_inspect

            dump = bpf_inspect.dump(Settings(bpffs=lab.nodes[name].bpffs))
            return any(
                d.get("prefix") == prefix and not d.get("uncovered")
                for d in dump.get("maps", {}).get("destinations", [])
            )
        return f"{new.ipv4} dev cilium_wg0" in installed_text(lab, name)

    took, missing = seconds_until(nodes, covered, since, timeout, 0.02)
    if missing:
        raise LabError(
            f"{', '.join(missing)} still treat {new.name} as uncovered "
            f"{timeout} s after its WireGuard peer was configured"
        )
    return took


def run(lab, ports: PortAllocator) -> Result:
    result = Result("churn", lab.datapath)
    # Count only what the churn causes: first let every agent make its start-up write.
    wait_condition(lab.api(), [n.name for n in lab.spec.nodes], bool, 30)
    churn_started, patches0 = time.monotonic(), patches(lab.api())
    index = max(n.index for n in lab.spec.nodes) + 1
    new = node_spec(f"w{index - len(lab.spec.control_plane)}", index, control_plane=False)
    existing = list(lab.nodes)
    needles = [str(new.ipv4), str(new.ipv6), str(new.pod_cidr_v4), str(new.pod_cidr_v6)]
    if getattr(lab, "routing", "native") == "tunnel":
        # Pod CIDRs are no destinations of nodecryptor's in tunnel mode
        # (nodecryptor/policy/cilium.py).
        needles = needles[:2]
    lab.add_node(new)
    lab.start_echo(new.name)
    api = lab.api()
    since = time.monotonic()
    api.put_node(node_object(new))  # its kubelet registers the Node: the trusted addresses
    api.create(ciliumnode_object(new))
    joined = _follow_time(lab, existing, needles, True, since)
    worst = max(joined.values())
    result.rows.append(
        Row(
            f"join {new.name}: every agent installs its addresses and pod CIDRs",
            "<= 1.0 s",
            "<= 1.0 s" if worst <= 1.0 else f"{worst:.2f} s",
            f"{worst:.2f} s",
        )
    )
    result.facts[f"join {new.name}: API create to installed on every node"] = ", ".join(
        f"{n} {t * 1000:.0f} ms" for n, t in sorted(joined.items())
    )
    cli = "bpf dump --json" if lab.datapath == "bpf" else "status --json"
    listed = [n for n in existing if needles[-1] in cli_text(lab, n)]
    result.rows.append(
        Row(
            f"nodecryptor {cli} lists {new.name} on every node",
            "yes",
            "yes" if len(listed) == len(existing) else "no",
        )
    )
    lab.start_standin(new.name)
    lab.wait_peers()
    # Until Cilium (the stand-in) has a WireGuard peer for the new node, the agents must treat
    # its prefixes as uncovered (fail-closed drop); once the peer exists they must route them
    # into WireGuard. Peer changes raise no event; the agents re-check every second while a
    # destination is uncovered (Settings.coverage_recheck_seconds).
    since = time.monotonic()
    covered = _follow_covered(lab, existing, new, since)
    slowest = max(covered.values())
    result.rows.append(
        Row(
            f"{new.name}'s WireGuard peer configured: every agent routes it into WireGuard",
            f"<= {COVERAGE_LIMIT_SECONDS:.0f} s",
            f"<= {COVERAGE_LIMIT_SECONDS:.0f} s"
            if slowest <= COVERAGE_LIMIT_SECONDS
            else f"{slowest:.2f} s",
            f"{slowest:.2f} s",
        )
    )
    result.facts[f"{new.name}'s WireGuard peer configured -> agents route it into WireGuard"] = (
        ", ".join(f"{n} {t * 1000:.0f} ms" for n, t in sorted(covered.items()))
    )
    lab.start_agent(new.name)
    lab.wait_agent_ready(new.name)
    peer = existing[-1]
    # First contact needs a WireGuard handshake. When both sides start one at the same moment
    # (two parallel flows in opposite directions) wireguard-go was seen to lose the first
    # packets until its 5 s handshake retry, so make first contact one flow at a time, with a
    # deadline, and report how long it took after the agent said it was ready.
    ready_at = time.monotonic()
    for flow in (
        Flow(new.name, peer, 4, "tcp", SERVICE_TCP_PORT, ENCRYPTED),
        Flow(peer, f"{new.name}/pod", 6, "tcp", SERVICE_TCP_PORT, ENCRYPTED),
    ):
        poll_flow(lab, flow, ports, 20)
    result.facts[f"{new.name}'s agent ready -> traffic flows both ways"] = (
        f"{time.monotonic() - ready_at:.2f} s"
    )
    result.rows += observe(
        lab,
        [
            Flow(new.name, peer, 4, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "new node"),
            Flow(peer, f"{new.name}/pod", 6, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "new node's pod"),
        ],
        ports,
        "churn",
    )
    since = time.monotonic()
    api.delete(new.name)
    api.fake_control("delete-node", {"name": new.name})  # the Node leaves with it
    gone = _follow_time(lab, existing, needles, False, since)
    worst = max(gone.values())
    result.rows.append(
        Row(
            f"leave {new.name}: every agent removes it",
            "<= 1.0 s",
            "<= 1.0 s" if worst <= 1.0 else f"{worst:.2f} s",
            f"{worst:.2f} s",
        )
    )
    result.facts[f"leave {new.name}: API delete to removed on every node"] = ", ".join(
        f"{n} {t * 1000:.0f} ms" for n, t in sorted(gone.items())
    )
    lab.remove_node(new.name)
    seconds = time.monotonic() - churn_started
    count = patches(lab.api()) - patches0
    result.facts["NodeEncryptionReady writes (nodes/status PATCHes) during churn"] = (
        f"{count} in {seconds:.1f} s on {len(existing)} nodes with a Node object "
        f"({count / seconds:.3f}/s; {new.name} has no Node object in the lab, its agent's "
        f"writes are refused with 404 and retried with backoff)"
    )
    return result
