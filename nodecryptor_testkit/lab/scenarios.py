"""The end-to-end scenarios. Each takes an up-and-running Lab and returns a Result: a table of
(flow or check, expected, observed) rows plus measured facts (times, packet counts).

- ``matrix``: every kind of flow in both families, encrypted or exempt as the policy says.
- ``bootstrap``: the first control-plane node "reboots" (new WireGuard key); while peers hold
  the old key encrypted traffic to it fails but the API keeps working through the exemption,
  the new key is published through that API, and encryption recovers.
- ``restart``: nodecryptor is stopped (SIGTERM, then SIGKILL) and restarted on every node under
  continuous traffic; nothing non-exempt may cross in the clear meanwhile.
- ``wg-down``: cilium_wg0 disappears on one worker: cluster traffic is dropped (fail-closed),
  nothing leaks, exempt and non-cluster flows still work; when it returns, traffic is encrypted.
- ``churn``: a node joins and leaves through the API; every agent's maps or rules follow.
- ``exemption``: an EncryptionExemption exempts a port to one labelled worker: observed in the
  clear on the wire, while the same port to the other worker (and to the labelled worker's
  pod) stays encrypted; the label is removed and the flow is encrypted again. Measures
  policy change -> datapath on every other node, and label change -> datapath.
- ``peer-health``: a node reboots with a new WireGuard key and publishes it while the other
  nodes' Cilium stand-ins are paused (their peers keep the old key, cilium/cilium#25492): the
  other agents report ``key-mismatch`` and their NodeEncryptionReady says PeerKeyMismatch; the
  stand-ins resume and it returns to EncryptionReady. Then cilium_wg0 goes on one node:
  False/WireGuardDown within seconds, and True again when it is back. The PATCHes of
  nodes/status are counted from the fake API server's own count.
- ``cilium-restart``: every Cilium stand-in reloads its programs into its existing tcx links
  (BPF_LINK_UPDATE), several times, under continuous traffic: nodecryptor stays at the head of
  the chain, Cilium's links keep their ids, nothing non-exempt crosses in the clear, and
  pod-to-pod traffic (Cilium's own) is still encrypted afterwards.
- ``rogue`` (lab/rogue.py): a host impersonating a worker sends clear text to another worker:
  audited and listed in ``audit``, refused in ``enforce``; bootstrap flows work in both.
- ``forged-claims`` (lab/forged.py): forged CiliumNodes (a ghost's /32 in a worker's pod CIDR,
  hostile entries in a worker's own object, an outside host as a node address): the matrix's
  flows are unchanged on the wire.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from nodecryptor.core.settings import Settings
from .capture import Capture
from .forged import forged_claims
from .flows import (BLOCKED, CLEAR, ENCRYPTED, Flow, PortAllocator, Result, Row, leaks,
                    observe)
from .spec import (API_PORT, SERVICE_TCP_PORT, SERVICE_UDP_PORT, ciliumnode_object, node_object,
                   node_spec)
from .topology import LabError, wait_for

NAMES = ("matrix", "bootstrap", "restart", "wg-down", "churn", "exemption", "cilium-restart",
         "rogue", "peer-health", "forged-claims")
FAMILIES = (4, 6)


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
            Flow(w1, cp, fam, "tcp", API_PORT, CLEAR, "apiserver, exempt",
                 connect_only=_api_flow(fam)),
            Flow(w1, cp, fam, "tcp", 2379, CLEAR, "etcd client, exempt"),
            Flow(w1, cp, fam, "tcp", 2380, CLEAR, "etcd peer, exempt"),
            # In tunnel mode Cilium carries pod traffic to other nodes in VXLAN between node
            # addresses, which nodecryptor encrypts whatever is inside: no exemption for pods.
            Flow(f"{w1}/pod", cp, fam, "tcp", API_PORT, CLEAR, "pod to apiserver, exempt",
                 connect_only=_api_flow(fam)) if getattr(lab, "routing", "native") == "native"
            else Flow(f"{w1}/pod", cp, fam, "tcp", API_PORT, ENCRYPTED,
                      "pod to apiserver, inside Cilium's tunnel", connect_only=_api_flow(fam)),
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


def matrix(lab, ports: PortAllocator) -> Result:
    result = Result("matrix", lab.datapath)
    result.rows = observe(lab, matrix_flows(lab), ports, "matrix")
    return result


def _poll_flow(lab, flow: Flow, ports: PortAllocator, timeout: float) -> float | None:
    """Seconds until ``flow`` gets through (tried repeatedly), or None at the deadline."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        req = {"id": 0, "proto": flow.proto, "dst": lab.address_of(flow.dst, flow.family),
               "src": lab.address_of(flow.src, flow.family), "dport": flow.dport,
               "sport": ports.take(), "timeout": 0.5}
        if lab.run_flows(lab.netns_of(flow.src), [req])[0]["ok"]:
            return time.monotonic() - start
    return None


def _annotation(lab, node: str) -> str:
    for obj in lab.api().list_ciliumnodes():
        if obj["metadata"]["name"] == node:
            return (obj["metadata"].get("annotations") or {}).get(
                "network.cilium.io/wg-pub-key", "")
    return ""


def bootstrap(lab, ports: PortAllocator) -> Result:
    result = Result("bootstrap", lab.datapath)
    cp = lab.spec.control_plane[0].name
    w1 = lab.spec.workers[0].name
    old_key = lab.wg_public_key(cp)
    published_old = _annotation(lab, cp)
    t0 = time.monotonic()
    lab.signal_standin(cp, signal.SIGUSR1)
    wait_for(lambda: lab.wg_public_key(cp) not in ("", old_key), 15,
             f"{cp}'s WireGuard device to come back with a new key")
    during = [
        Flow(w1, cp, 4, "tcp", SERVICE_TCP_PORT, BLOCKED, "peers hold the old key"),
        Flow(w1, cp, 4, "tcp", API_PORT, CLEAR, "apiserver through the exemption",
             connect_only=True),
        Flow(w1, cp, 6, "tcp", 2379, CLEAR, "etcd through the exemption"),
    ]
    rows = observe(lab, during, ports, "bootstrap-during", timeout=1.0)
    still_old = _annotation(lab, cp) == published_old
    result.rows += [Row("during: " + r.label, r.expected, r.observed, r.detail) for r in rows]
    result.rows.append(Row("new key not yet published while the above ran", "yes",
                           "yes" if still_old else "no",
                           "" if still_old else "the stand-in published before it was told to"))
    # The stand-in holds the new key back until told (like a cilium-agent still starting), so
    # the checks above ran while peers held the old key however slow this machine is.
    held = time.monotonic() - t0
    lab.signal_standin(cp, signal.SIGHUP)
    new_key = wait_for(lambda: (k := _annotation(lab, cp)) not in ("", published_old) and k,
                       30, f"{cp} to publish its new key")
    t_pub = time.monotonic()
    result.rows.append(Row(f"{cp} publishes its new key through the API", "yes",
                           "yes" if new_key == lab.wg_public_key(cp) else "no"))
    recovery: dict[tuple[str, int], float | None] = {}

    def recover(src: str, fam: int) -> None:
        flow = Flow(src, cp, fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED)
        took = _poll_flow(lab, flow, ports, 30)
        recovery[(src, fam)] = None if took is None else time.monotonic() - t_pub

    threads = [threading.Thread(target=recover, args=(w.name, fam))
               for w in lab.spec.workers for fam in FAMILIES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recovered = [v for v in recovery.values() if v is not None]
    result.rows.append(Row("encrypted connectivity to cp returns", "yes",
                           "yes" if len(recovered) == len(recovery) else "no"))
    after = [Flow(w.name, cp, fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "after recovery")
             for w in lab.spec.workers for fam in FAMILIES]
    after += [Flow(cp, w.name, 4, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "after recovery")
              for w in lab.spec.workers]
    result.rows += observe(lab, after, ports, "bootstrap-after")
    if recovered:
        result.facts["new key published -> encrypted traffic to cp again (slowest flow)"] = \
            f"{max(recovered):.2f} s"
        result.facts["reboot -> encrypted again (includes the held-back publication)"] = \
            f"{t_pub - t0 + max(recovered):.2f} s"
    result.facts["key held back (simulated cilium-agent start) for"] = f"{held:.2f} s"
    return result


class Traffic:
    """Continuous flows from every node and pod to every other node and pod, in the background,
    until stopped; counts attempts and failures."""

    def __init__(self, lab, ports: PortAllocator):
        self.lab = lab
        self.ports = ports
        self.stop_event = threading.Event()
        self.attempts = 0
        self.failures = 0
        self.lock = threading.Lock()
        self.errors: dict[str, str] = {}
        """First flow that failed with each distinct error."""
        self.threads: list[threading.Thread] = []

    def _loop(self, src: str) -> None:
        lab = self.lab
        targets = [n for n in lab.nodes if n != src.split("/")[0]]
        while not self.stop_event.is_set():
            batch = []
            for i, dst in enumerate(targets):
                for fam in FAMILIES:
                    for end in (dst, f"{dst}/pod"):
                        batch.append({"id": len(batch), "proto": "tcp",
                                      "src": lab.address_of(src, fam),
                                      "dst": lab.address_of(end, fam),
                                      "dport": SERVICE_TCP_PORT, "sport": self.ports.take(),
                                      "timeout": 1.0})
            try:
                results = lab.run_flows(lab.netns_of(src), batch)
            except (LabError, OSError) as e:
                results = [{"ok": False, "error": f"{type(e).__name__}: {e}"}] * len(batch)
            with self.lock:
                self.attempts += len(results)
                for r, req in zip(results, batch):
                    if not r["ok"]:
                        self.failures += 1
                        self.errors.setdefault(r.get("error", ""), f"{src} -> {req['dst']}")
            # Pace the batches: the agents being restarted need the two CPUs too.
            self.stop_event.wait(0.2)

    def __enter__(self) -> "Traffic":
        for name in self.lab.nodes:
            for src in (name, f"{name}/pod"):
                t = threading.Thread(target=self._loop, args=(src,), daemon=True)
                t.start()
                self.threads.append(t)
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)


def restart(lab, ports: PortAllocator) -> Result:
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
        result.rows.append(Row(f"{signal.Signals(sig).name} nodecryptor on {', '.join(names)}, "
                               f"restart", "0 clear", f"{n} clear",
                               ", ".join(str(p) for p in leaked[:3])))
        result.facts[f"{signal.Signals(sig).name}: restart to all ready"] = f"{ready:.1f} s"
        result.facts[f"{signal.Signals(sig).name}: flows that failed meanwhile"] = str(failed)
    result.rows.append(Row("whole run: non-exempt packets in the clear", "0", str(len(leaked)),
                           ", ".join(str(p) for p in leaked[:3])))
    result.facts["flows tried"] = str(traffic.attempts)
    for error, example in list(traffic.errors.items())[:3]:
        result.facts[f"failure seen ({example})"] = error
    result.facts["packets captured"] = str(len(packets))
    return result


def wg_down(lab, ports: PortAllocator) -> Result:
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
    result.rows.append(Row("down: non-exempt packets in the clear", "0", str(len(leaked)),
                           ", ".join(str(p) for p in leaked[:3])))
    lab.signal_standin(victim, signal.SIGUSR2)
    wait_for(lambda: lab.wg_public_key(victim), 10, f"cilium_wg0 to return on {victim}")
    took = _poll_flow(lab, Flow(victim, peer, 4, "tcp", SERVICE_TCP_PORT, ENCRYPTED), ports, 30)
    result.facts["device back to traffic flowing"] = f"{took:.2f} s" if took is not None else \
        "did not recover within 30 s"
    back = [Flow(victim, peer, fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "device back")
            for fam in FAMILIES]
    back += [Flow(peer, f"{victim}/pod", 4, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "device back")]
    result.rows += observe(lab, back, ports, "wg-down-back")
    return result


def _installed_text(lab, name: str) -> str:
    """What the datapath on ``name`` holds right now, as searchable text, read directly and
    cheaply (the pinned BPF maps, or nodecryptor's own route table) so a change is timed to a
    few milliseconds rather than to the start-up time of a CLI process."""
    if lab.datapath == "bpf":
        from nodecryptor.datapath.bpf import inspect as bpf_inspect
        return json.dumps(bpf_inspect.dump(Settings(bpffs=lab.nodes[name].bpffs)), default=str)
    table = str(Settings().iprule_table)
    return "\n".join(lab.run_in(name, "ip", fam, "route", "show", "table", table)
                     for fam in ("-4", "-6"))


def _cli_text(lab, name: str) -> str:
    """The same, through the operator's commands: ``bpf dump --json`` or ``status --json``
    (plus the routes of the ip-rule table, which status counts but does not list)."""
    if lab.datapath == "bpf":
        return json.dumps(lab.nodecryptor(name, "bpf", "dump"))
    return json.dumps(lab.nodecryptor(name, "status")) + _installed_text(lab, name)


def _seconds_until(nodes: list[str], check, since: float, timeout: float,
                   interval: float) -> tuple[dict[str, float], list[str]]:
    """Poll ``check(node)`` for every node in parallel; return the seconds from ``since`` until
    it first held, per node, and the nodes for which it never did within ``timeout``."""
    took: dict[str, float] = {}

    def poll(name: str) -> None:
        while time.monotonic() - since < timeout:
            if check(name):
                took[name] = time.monotonic() - since
                return
            time.sleep(interval)

    threads = [threading.Thread(target=poll, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return took, sorted(set(nodes) - took.keys())


def _follow_time(lab, nodes: list[str], needles: list[str], present: bool,
                 since: float, timeout: float = 10.0) -> dict[str, float]:
    """For each node: seconds from ``since`` until its datapath holds all ``needles`` (or none
    of them, when ``present`` is false). Raises at the deadline."""
    def holds(name: str) -> bool:
        text = _installed_text(lab, name)
        return all((n in text) == present for n in needles)

    took, missing = _seconds_until(nodes, holds, since, timeout, 0.01)
    if missing:
        raise LabError(f"{', '.join(missing)} did not {'install' if present else 'remove'} "
                       f"{', '.join(needles)} within {timeout} s")
    return took


COVERAGE_LIMIT_SECONDS = 3.0
"""A 1 s re-check interval plus a pass and the probe's own polling, with head-room for a
loaded 2-core machine."""


def _follow_covered(lab, nodes: list[str], new, since: float,
                    timeout: float = 45.0) -> dict[str, float]:
    """Seconds until each agent sends the new node's IPv4 address into WireGuard (BPF: the
    destination is no longer flagged uncovered; ip rules: its route points at cilium_wg0)."""
    prefix = f"{new.ipv4}/32"

    def covered(name: str) -> bool:
        if lab.datapath == "bpf":
            from nodecryptor.datapath.bpf import inspect as bpf_inspect
            dump = bpf_inspect.dump(Settings(bpffs=lab.nodes[name].bpffs))
            return any(d.get("prefix") == prefix and not d.get("uncovered")
                       for d in dump.get("maps", {}).get("destinations", []))
        return f"{new.ipv4} dev cilium_wg0" in _installed_text(lab, name)

    took, missing = _seconds_until(nodes, covered, since, timeout, 0.02)
    if missing:
        raise LabError(f"{', '.join(missing)} still treat {new.name} as uncovered "
                       f"{timeout} s after its WireGuard peer was configured")
    return took


def churn(lab, ports: PortAllocator) -> Result:
    result = Result("churn", lab.datapath)
    # Count only what the churn causes: first let every agent make its start-up write.
    _wait_condition(lab.api(), [n.name for n in lab.spec.nodes], bool, 30)
    churn_started, patches0 = time.monotonic(), _patches(lab.api())
    index = max(n.index for n in lab.spec.nodes) + 1
    new = node_spec(f"w{index - len(lab.spec.control_plane)}", index, control_plane=False)
    existing = list(lab.nodes)
    needles = [str(new.ipv4), str(new.ipv6), str(new.pod_cidr_v4), str(new.pod_cidr_v6)]
    if getattr(lab, "routing", "native") == "tunnel":
        # Pod CIDRs are no destinations of nodecryptor's in tunnel mode (nodecryptor/policy/cilium.py).
        needles = needles[:2]
    lab.add_node(new)
    lab.start_echo(new.name)
    api = lab.api()
    since = time.monotonic()
    api.put_node(node_object(new))  # its kubelet registers the Node: the trusted addresses
    api.create(ciliumnode_object(new))
    joined = _follow_time(lab, existing, needles, True, since)
    worst = max(joined.values())
    result.rows.append(Row(f"join {new.name}: every agent installs its addresses and pod CIDRs",
                           "<= 1.0 s", "<= 1.0 s" if worst <= 1.0 else f"{worst:.2f} s",
                           f"{worst:.2f} s"))
    result.facts[f"join {new.name}: API create to installed on every node"] = \
        ", ".join(f"{n} {t * 1000:.0f} ms" for n, t in sorted(joined.items()))
    cli = "bpf dump --json" if lab.datapath == "bpf" else "status --json"
    listed = [n for n in existing if needles[-1] in _cli_text(lab, n)]
    result.rows.append(Row(f"nodecryptor {cli} lists {new.name} on every node", "yes",
                           "yes" if len(listed) == len(existing) else "no"))
    lab.start_standin(new.name)
    lab.wait_peers()
    # Until Cilium (the stand-in) has a WireGuard peer for the new node, the agents must treat
    # its prefixes as uncovered (fail-closed drop); once the peer exists they must route them
    # into WireGuard. Peer changes raise no event; the agents re-check every second while a
    # destination is uncovered (Settings.coverage_recheck_seconds).
    since = time.monotonic()
    covered = _follow_covered(lab, existing, new, since)
    slowest = max(covered.values())
    result.rows.append(Row(f"{new.name}'s WireGuard peer configured: every agent routes it into "
                           "WireGuard", f"<= {COVERAGE_LIMIT_SECONDS:.0f} s",
                           f"<= {COVERAGE_LIMIT_SECONDS:.0f} s"
                           if slowest <= COVERAGE_LIMIT_SECONDS else f"{slowest:.2f} s",
                           f"{slowest:.2f} s"))
    result.facts[f"{new.name}'s WireGuard peer configured -> agents route it into WireGuard"] = \
        ", ".join(f"{n} {t * 1000:.0f} ms" for n, t in sorted(covered.items()))
    lab.start_agent(new.name)
    lab.wait_agent_ready(new.name)
    peer = existing[-1]
    # First contact needs a WireGuard handshake. When both sides start one at the same moment
    # (two parallel flows in opposite directions) wireguard-go was seen to lose the first
    # packets until its 5 s handshake retry, so make first contact one flow at a time, with a
    # deadline, and report how long it took after the agent said it was ready.
    ready_at = time.monotonic()
    for flow in (Flow(new.name, peer, 4, "tcp", SERVICE_TCP_PORT, ENCRYPTED),
                 Flow(peer, f"{new.name}/pod", 6, "tcp", SERVICE_TCP_PORT, ENCRYPTED)):
        _poll_flow(lab, flow, ports, 20)
    result.facts[f"{new.name}'s agent ready -> traffic flows both ways"] = \
        f"{time.monotonic() - ready_at:.2f} s"
    result.rows += observe(lab, [
        Flow(new.name, peer, 4, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "new node"),
        Flow(peer, f"{new.name}/pod", 6, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "new node's pod"),
    ], ports, "churn")
    since = time.monotonic()
    api.delete(new.name)
    api.fake_control("delete-node", {"name": new.name})  # the Node leaves with it
    gone = _follow_time(lab, existing, needles, False, since)
    worst = max(gone.values())
    result.rows.append(Row(f"leave {new.name}: every agent removes it", "<= 1.0 s",
                           "<= 1.0 s" if worst <= 1.0 else f"{worst:.2f} s", f"{worst:.2f} s"))
    result.facts[f"leave {new.name}: API delete to removed on every node"] = \
        ", ".join(f"{n} {t * 1000:.0f} ms" for n, t in sorted(gone.items()))
    lab.remove_node(new.name)
    seconds = time.monotonic() - churn_started
    count = _patches(lab.api()) - patches0
    result.facts["NodeEncryptionReady writes (nodes/status PATCHes) during churn"] = \
        f"{count} in {seconds:.1f} s on {len(existing)} nodes with a Node object " \
        f"({count / seconds:.3f}/s; {new.name} has no Node object in the lab, its agent's " \
        f"writes are refused with 404 and retried with backoff)"
    return result


EXEMPTION_LABEL = "example.com/lab-storage"
EXEMPTION_POLICY = "lab-storage"
EXEMPTION_LIMIT_SECONDS = 1.0
"""Policy or label change to datapath, as for a CiliumNode (the churn scenario's bound)."""


def _exempts_to(lab, name: str, target) -> bool:
    """Whether the datapath of ``name`` exempts SERVICE_TCP_PORT towards ``target``'s IPv4
    node address: BPF, the destination entry carries a policy in its ``serves`` mask (the
    target is a worker, so no built-in bit); ip rules, the dport rule exists."""
    if lab.datapath == "bpf":
        from nodecryptor.datapath.bpf import inspect as bpf_inspect
        dump = bpf_inspect.dump(Settings(bpffs=lab.nodes[name].bpffs))
        return any(d.get("prefix") == f"{target.ipv4}/32" and d.get("serves_mask")
                   for d in dump.get("maps", {}).get("destinations", []))
    rules = lab.run_in(name, "ip", "-4", "rule", "show")
    return f"to {target.ipv4} ipproto tcp dport {SERVICE_TCP_PORT} lookup main" in rules


def _relabel(api, name: str, value: str | None) -> None:
    node = api.get_node(name)
    labels = node["metadata"].setdefault("labels", {})
    if value is None:
        labels.pop(EXEMPTION_LABEL, None)
    else:
        labels[EXEMPTION_LABEL] = value
    node["metadata"].pop("resourceVersion", None)
    api.put_node(node)


def _timed_row(result: Result, what: str, took: dict[str, float]) -> None:
    worst = max(took.values())
    limit = f"<= {EXEMPTION_LIMIT_SECONDS:.1f} s"
    result.rows.append(Row(what, limit, limit if worst <= EXEMPTION_LIMIT_SECONDS
                           else f"{worst:.2f} s", f"{worst:.2f} s"))
    result.facts[what] = ", ".join(f"{n} {t * 1000:.0f} ms" for n, t in sorted(took.items()))


def exemption(lab, ports: PortAllocator) -> Result:
    result = Result("exemption", lab.datapath)
    spec = lab.spec
    if len(spec.workers) < 2:
        raise LabError("the exemption scenario needs two workers (--nodes 3 or more)")
    cp, w1, w2 = spec.control_plane[0], spec.workers[0], spec.workers[1]
    others = [n for n in lab.nodes if n != w2.name]
    api = lab.api()
    policy = {"apiVersion": "nodecryptor.io/v1alpha1", "kind": "EncryptionExemption",
              "metadata": {"name": EXEMPTION_POLICY},
              "spec": {"nodeSelector": {"matchLabels": {EXEMPTION_LABEL: "yes"}},
                       "ports": [{"port": SERVICE_TCP_PORT}]}}
    try:
        _relabel(api, w2.name, "yes")
        since = time.monotonic()
        api.create_exemption(policy)
        took, missing = _seconds_until(others, lambda n: _exempts_to(lab, n, w2), since,
                                       10.0, 0.01)
        if missing:
            raise LabError(f"{', '.join(missing)} did not exempt {w2.name} within 10 s")
        _timed_row(result, f"policy created: every other agent exempts {w2.name}", took)
        flows = []
        for fam in FAMILIES:
            flows += [
                Flow(w1.name, w2.name, fam, "tcp", SERVICE_TCP_PORT, CLEAR,
                     "policy: labelled worker"),
                Flow(cp.name, w2.name, fam, "tcp", SERVICE_TCP_PORT, CLEAR,
                     "policy: labelled worker"),
                Flow(cp.name, w1.name, fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED,
                     "same port, unlabelled worker"),
                Flow(w2.name, w1.name, fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED,
                     "same port, unlabelled worker"),
                Flow(w1.name, f"{w2.name}/pod", fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED,
                     "labelled worker's pod"),
                Flow(w1.name, w2.name, fam, "udp", SERVICE_UDP_PORT, ENCRYPTED,
                     "another port of the labelled worker"),
            ]
        result.rows += observe(lab, flows, ports, "exemption-on")
        # The operator's view: explain names the policy behind the exempt verdict.
        got = lab.nodecryptor(w1.name, "explain", "--dst", str(w2.ipv4), "--src", str(w1.ipv4),
                              "--dport", str(SERVICE_TCP_PORT))
        result.rows.append(Row(f"nodecryptor explain on {w1.name}: {w2.name} tcp/"
                               f"{SERVICE_TCP_PORT}", f"exempt by {EXEMPTION_POLICY}",
                               f"{got.get('verdict')} by {got.get('policy')}"))
        since = time.monotonic()
        _relabel(api, w2.name, None)
        took, missing = _seconds_until(others, lambda n: not _exempts_to(lab, n, w2), since,
                                       10.0, 0.01)
        if missing:
            raise LabError(f"{', '.join(missing)} still exempt {w2.name} 10 s after its "
                           f"label was removed")
        _timed_row(result, f"label removed: every other agent encrypts {w2.name} again", took)
        result.rows += observe(lab, [
            Flow(w1.name, w2.name, fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "label removed")
            for fam in FAMILIES], ports, "exemption-off")
    finally:
        try:
            api.delete_exemption(EXEMPTION_POLICY)
        except Exception:  # noqa: BLE001 - cleanup of a scenario that failed before creating it
            pass
        try:
            _relabel(api, w2.name, None)
        except Exception:  # noqa: BLE001
            pass
    return result


CILIUM_RELOADS = 3
NODECRYPTOR_PROG = "nc_egress"
CILIUM_NETDEV_PROG = "cil_to_netdev"


def _tcx_order(lab, name: str) -> list[tuple[str, int, int]]:
    """(program name, program id, link id) on eth0's tcx egress of ``name``, in order."""
    chain = lab.egress_chain(name)
    return [(e.get("name") or "?", e["prog_id"], e["link_id"]) for e in chain.get("tcx") or ()]


def cilium_restart(lab, ports: PortAllocator) -> Result:
    """Reload every Cilium stand-in's programs in place, several times, under traffic."""
    result = Result("cilium-restart", lab.datapath)
    names = list(lab.nodes)
    expected_head = [NODECRYPTOR_PROG] if lab.datapath == "bpf" else []
    before = {n: _tcx_order(lab, n) for n in names}
    cilium_links = {n: [link for prog, _, link in chain if prog == CILIUM_NETDEV_PROG]
                    for n, chain in before.items()}
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
                wait_for(lambda n=n, o=old_ids: any(
                    prog == CILIUM_NETDEV_PROG and pid not in o
                    for prog, pid, _ in _tcx_order(lab, n)), 30,
                    f"the Cilium stand-in on {n} to reload its programs")
            reload_times.append(time.monotonic() - started)
            time.sleep(0.3)  # traffic keeps flowing between reloads
        end = time.time()
        packets = cap.stop()
    after = {n: _tcx_order(lab, n) for n in names}
    for n in names:
        order = [prog for prog, _, _ in after[n]]
        want = expected_head + [CILIUM_NETDEV_PROG]
        result.rows.append(Row(f"{n} eth0 tcx egress after {CILIUM_RELOADS} Cilium reloads",
                               " -> ".join(want), " -> ".join(order) or "empty"))
        links = [link for prog, _, link in after[n] if prog == CILIUM_NETDEV_PROG]
        result.rows.append(Row(f"{n}: Cilium's link updated in place (same link id)", "yes",
                               "yes" if links == cilium_links[n] and links else "no",
                               f"before {cilium_links[n]}, after {links}"))
    leaked = leaks(packets, lab.spec)
    during = [p for p in leaked if begin - 0.05 <= p.ts <= end + 0.05]
    result.rows.append(Row("non-exempt packets in the clear during the reloads", "0",
                           str(len(during)), ", ".join(str(p) for p in during[:3])))
    result.rows.append(Row("whole run: non-exempt packets in the clear", "0", str(len(leaked)),
                           ", ".join(str(p) for p in leaked[:3])))
    w1, w2 = lab.spec.workers[0].name, lab.spec.workers[-1].name
    cp = lab.spec.control_plane[0].name
    result.rows += observe(lab, [
        Flow(f"{w1}/pod", f"{w2}/pod", fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED,
             "pod to pod after the reloads (Cilium's own)") for fam in FAMILIES] + [
        Flow(w1, f"{cp}/pod", fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED,
             "node to remote pod after the reloads") for fam in FAMILIES], ports,
        "cilium-restart-after")
    if lab.routing == "native":
        # What the stand-in counted before its last reload (logged by standin_datapath.py):
        # pod packets it sent to eth0 with dirty cb[], and pod-to-pod packets its
        # cil_to_netdev redirected into cilium_wg0 itself.
        logged = lab.log_tail(f"{w1}-standin", 200)
        line = [x for x in logged.splitlines() if "datapath reloaded in place" in x][-1:]
        fields = dict(part.split("=", 1) for part in (line[0].split() if line else [])
                      if "=" in part)
        for key in ("lxc_redirect", "netdev_to_wireguard"):
            result.rows.append(Row(f"{w1}: Cilium stand-in {key} packets between reloads",
                                   "> 0", "> 0" if int(fields.get(key, "0")) > 0 else "0",
                                   line[0] if line else "no reload logged"))
    status = lab.nodecryptor(w1, "status")
    cil = status.get("cilium") or {}
    if lab.datapath == "bpf" and lab.routing == "native":
        counted = (status.get("counters") or {}).get("cilium-pod-to-pod", {}).get("packets", 0)
        result.rows.append(Row(f"{w1}: nodecryptor passed pod-to-pod to Cilium "
                               "(cilium-pod-to-pod counter)", "> 0",
                               "> 0" if counted else "0"))
    result.rows.append(Row(f"{w1}: status --json cilium.routing_mode", lab.routing,
                           str(cil.get("routing_mode")), cil.get("sources", {}).get(
                               "routing_mode", "")))
    result.facts["Cilium reloads per node"] = str(CILIUM_RELOADS)
    result.facts["signal to reloaded on every node (slowest reload)"] = \
        f"{max(reload_times):.2f} s" if reload_times else "-"
    result.facts["flows tried / failed meanwhile"] = f"{traffic.attempts} / {traffic.failures}"
    for error, example in list(traffic.errors.items())[:3]:
        result.facts[f"failure seen ({example})"] = error
    return result


def _rogue(lab, ports: PortAllocator) -> Result:
    from .rogue import rogue  # its own module; it reuses bootstrap() above

    return rogue(lab, ports)


def _alerts(lab, ports: PortAllocator) -> Result:
    from .alerts import alerts  # its own module: a real Prometheus reads the agents

    return alerts(lab, ports)


def _condition(api, name: str) -> dict:
    node = api.get_node(name)
    for c in (node.get("status") or {}).get("conditions") or []:
        if c.get("type") == "NodeEncryptionReady":
            return c
    return {}


def _patches(api) -> int:
    return int(api.fake_control("status-patches")["patches"])


def _wait_condition(api, nodes: list[str], want, timeout: float) -> float | None:
    """Seconds until every node's condition satisfies ``want``; None on timeout."""
    start = time.monotonic()
    try:
        wait_for(lambda: all(want(_condition(api, n)) for n in nodes), timeout,
                 "NodeEncryptionReady", interval=0.2)
    except LabError:
        return None
    return time.monotonic() - start


def peer_health(lab, ports: PortAllocator) -> Result:
    from nodecryptor.policy.peerhealth import KEY_MISMATCH_HOLD

    result = Result("peer-health", lab.datapath)
    api = lab.api()
    names = [n.name for n in lab.spec.nodes]
    victim = lab.spec.workers[-1].name
    others = [n for n in names if n != victim]
    started, patches0 = time.monotonic(), _patches(api)

    def row(label: str, took: float | None, limit: float) -> None:
        result.rows.append(Row(label, f"<= {limit:.0f} s",
                               f"<= {limit:.0f} s" if took is not None and took <= limit
                               else "timed out" if took is None else f"{took:.1f} s",
                               "" if took is None else f"{took:.1f} s"))
        result.facts[label] = "timed out" if took is None else f"{took:.1f} s"

    took = _wait_condition(api, names, lambda c: c.get("status") == "True", 60)
    row("every node: NodeEncryptionReady=True", took, 60)
    # A stale peer after a reboot: the other nodes' Cilium (stand-ins) stop following the
    # annotations, the victim reboots with a new key and publishes it.
    for n in others:
        lab.signal_standin(n, signal.SIGSTOP)
    try:
        old_key = lab.wg_public_key(victim)
        lab.signal_standin(victim, signal.SIGUSR1)
        wait_for(lambda: lab.wg_public_key(victim) not in ("", old_key), 15,
                 f"{victim}'s device to come back with a new key")
        # SIGHUP releases the held-back key; one that lands between the new device and the
        # stand-in arming its hold is lost, so repeat it until the key is published.
        def published() -> bool:
            if _annotation(lab, victim) not in ("", old_key):
                return True
            lab.signal_standin(victim, signal.SIGHUP)
            time.sleep(0.5)
            return False

        wait_for(published, 15, f"{victim} to publish its new key")
        limit = KEY_MISMATCH_HOLD + 30
        took = _wait_condition(api, others, lambda c: c.get("reason") == "PeerKeyMismatch"
                               and victim in (c.get("message") or ""), limit)
        row(f"other nodes: PeerKeyMismatch naming {victim} (hold {KEY_MISMATCH_HOLD:.0f} s)",
            took, limit)
        sample = _condition(api, others[0])
        result.facts[f"{others[0]} condition during the mismatch"] = \
            f"{sample.get('status')}/{sample.get('reason')}: {sample.get('message')}"
    finally:
        for n in others:
            lab.signal_standin(n, signal.SIGCONT)
    # The resumed stand-ins first re-establish their own (stopped) API watches with backoff
    # before they rewrite the stale peer; under a loaded CI machine that alone took over 60 s
    # once, so the bound is the stand-ins' recovery plus the agents' 10 s write interval.
    took = _wait_condition(api, others, lambda c: c.get("reason") == "EncryptionReady", 180)
    row("stand-ins resume: other nodes back to EncryptionReady", took, 180)
    # WireGuard down on one node, then back.
    _wait_condition(api, [victim], lambda c: c.get("status") == "True", 60)
    lab.signal_standin(victim, signal.SIGUSR2)
    took = _wait_condition(api, [victim], lambda c: c.get("reason") == "WireGuardDown", 30)
    row(f"{victim}: cilium_wg0 removed -> False/WireGuardDown", took, 20)
    lab.signal_standin(victim, signal.SIGUSR2)
    took = _wait_condition(api, [victim], lambda c: c.get("status") == "True", 60)
    row(f"{victim}: cilium_wg0 back -> True", took, 30)
    seconds = time.monotonic() - started
    count = _patches(api) - patches0
    result.facts["nodes/status PATCHes during the scenario"] = \
        f"{count} in {seconds:.0f} s on {len(names)} nodes ({count / seconds:.3f}/s)"
    return result


SCENARIOS = {"matrix": matrix, "bootstrap": bootstrap, "restart": restart, "wg-down": wg_down,
             "exemption": exemption, "churn": churn, "cilium-restart": cilium_restart,
             "rogue": _rogue, "peer-health": peer_health, "alerts": _alerts,
             "forged-claims": forged_claims}


def run_scenario(lab, name: str, ports: PortAllocator) -> Result:
    """Run one scenario; an exception becomes a failed Result instead of ending the demo."""
    start = time.monotonic()
    try:
        result = SCENARIOS[name](lab, ports)
    except (LabError, OSError, RuntimeError, ValueError, KeyError) as e:
        result = Result(name, lab.datapath, error=f"{type(e).__name__}: {e}")
    result.seconds = time.monotonic() - start
    return result
