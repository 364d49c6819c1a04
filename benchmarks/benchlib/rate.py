"""Datapath packet rate: the same synthetic cluster put into four sender nodes (baseline, BPF,
ip rules, seed), measured side by side, alternating, and reported as ratios to the baseline.

One set of namespaces per configuration:

    pod ns  --veth-->  node ns (the configuration under test)  --veth eth0-->  receiver ns
                       cilium_wg0: a veth stand-in (the redirect and route target),
                       its peer in the receiver ns

The node's ``eth0`` has ARP off (no neighbour resolution in the measurement; frames carry the
sender's own MAC as destination) and a default route to the receiver, whose IP layer drops
every frame at once as addressed to another host (its veth counts the frame first).

Traffic: IPv4 UDP with an 18-byte payload from the compiled sender on an unconnected socket
(one route lookup per datagram). The rate reported is packets per second of the sender's CPU
time (user + system): the whole path runs in the sending process's context (the syscall,
routing, the tc egress program, the veth transfer and, on a kernel without
CONFIG_IRQ_TIME_ACCOUNTING, the softirq that forwards and drops the packet), so this is the
rate one dedicated core reaches, and it does not move when the machine's other load preempts
the sender. Wall-clock rates are kept in the notes.

* ``non-cluster``: from the node to 198.51.100.7 (what every node carries);
* ``forwarded``: from the pod namespace to 198.51.100.7, routed by the node (its one route
  lookup per packet is what the configurations change);
* ``cluster``: from the node to the last remote node address; baseline sends it out eth0,
  the others into the ``cilium_wg0`` stand-in (a veth, so WireGuard's own cost is not in
  the number).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from dataclasses import dataclass, field

from nodecryptor_testkit import netns

from . import cluster, dropprog
from .sender import Sender

CONFIGS = ("baseline", "bpf", "iprule", "seed")
TRAFFIC = ("non-cluster", "forwarded", "cluster")
RECEIVER_V4 = "192.168.50.1"
POD_GW = "10.250.0.1"
POD_V4 = "10.250.0.5"
SINK_DST = "203.0.113.7"


def _ip(ns: str, *args: str) -> None:
    netns.run("ip", *args, netns=ns)


def _sysctl(ns: str, *pairs: str) -> None:
    netns.run("sysctl", "-qw", *pairs, netns=ns)


def _counter(ns: str, dev: str, which: str) -> int:
    out = subprocess.run(
        ["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    stats = json.loads(out)[0]["stats64"]
    return int(stats[which]["packets"])


@dataclass
class Node:
    """The namespaces of one configuration."""

    config: str
    node: str
    receiver: str
    pod: str
    setup_s: float = 0.0
    bpf: object = None

    def delivered(self) -> int:
        """Packets that reached the receiver or the redirect/route target."""
        return _counter(self.receiver, "eth0", "rx") + _counter(self.receiver, "wgpeer", "rx")


def build_node(config: str, tag: str) -> Node:
    node = netns.create(f"bench-{tag}-{config}-node")
    receiver = netns.create(f"bench-{tag}-{config}-rcv")
    pod = netns.create(f"bench-{tag}-{config}-pod")
    n = Node(config, node, receiver, pod)
    try:
        _ip(node, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", receiver)
        _ip(node, "link", "set", "eth0", "arp", "off", "up")
        _ip(node, "addr", "add", f"{cluster.LOCAL_V4}/24", "dev", "eth0")
        _ip(node, "-6", "addr", "add", f"{cluster.LOCAL_V6}/64", "dev", "eth0", "nodad")
        _ip(node, "route", "add", "default", "via", RECEIVER_V4, "dev", "eth0", "onlink")
        # No dummy driver on every kernel: the stand-in is a veth whose peer drops in the
        # receiver namespace (a peer in the node namespace would route the packet again).
        _ip(
            node,
            "link",
            "add",
            cluster.WG_IFNAME,
            "mtu",
            "1420",
            "type",
            "veth",
            "peer",
            "name",
            "wgpeer",
            "netns",
            receiver,
        )
        _ip(node, "link", "set", cluster.WG_IFNAME, "arp", "off", "up")
        _ip(node, "link", "add", "pod0", "type", "veth", "peer", "name", "eth0", "netns", pod)
        _ip(node, "addr", "add", f"{POD_GW}/24", "dev", "pod0")
        _ip(node, "link", "set", "pod0", "up")
        _sysctl(
            node,
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        )
        _ip(pod, "addr", "add", f"{POD_V4}/24", "dev", "eth0")
        _ip(pod, "link", "set", "eth0", "up")
        _ip(pod, "route", "add", "default", "via", POD_GW)
        _ip(receiver, "addr", "add", f"{RECEIVER_V4}/24", "dev", "eth0")
        _ip(receiver, "link", "set", "eth0", "up")
        _ip(receiver, "link", "set", "wgpeer", "up")
    except BaseException:
        destroy(n)
        raise
    return n


def install(n: Node, nodes: int, bpffs: str) -> None:
    started = time.monotonic()
    if n.config == "seed" and nodes:
        cluster.install_seed(n.node, nodes)
    elif n.config == "iprule":
        settings = cluster.settings_for(nodes)
        ifindex = int(
            netns.run("cat", f"/sys/class/net/{cluster.WG_IFNAME}/ifindex", netns=n.node).stdout
        )
        desired = cluster.desired_state(nodes, settings, ifindex, None)
        cluster.install_iprule(n.node, desired, settings)
    elif n.config == "bpf":
        n.bpf = cluster.install_bpf(n.node, nodes, cluster.settings_for(nodes, bpffs))
    n.setup_s = time.monotonic() - started


def destroy(n: Node) -> None:
    if n.bpf is not None:
        try:
            n.bpf.remove()
        except Exception:  # the namespace goes next, which detaches the link anyway
            pass
    for ns in (n.pod, n.receiver, n.node):
        netns.delete(ns)


def _bpffs(path: str) -> None:
    import os

    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", path], check=True)


@dataclass
class SizeResult:
    nodes: int
    rows: list = field(default_factory=list)
    setup_s: dict = field(default_factory=dict)
    delivery: dict = field(default_factory=dict)
    errors: dict = field(default_factory=dict)
    spread: dict = field(default_factory=dict)
    """Lowest and highest per-round ratio to the baseline: how noisy the median is."""
    wall_pps: dict = field(default_factory=dict)
    """Median wall-clock packets/s (moves with the machine's other load)."""


def measure_size(
    sender: Sender, nodes: int, seconds: float, rounds: int, tmpdir: str, log=print
) -> SizeResult:
    """All four configurations for one cluster size, alternating: in every round each traffic
    kind is sent through every configuration in turn (the order rotates each round); the
    ratio to the baseline is taken within a round, then the median over rounds."""
    import os

    bpffs = os.path.join(tmpdir, f"bpffs-{nodes}")
    _bpffs(bpffs)
    built: list[Node] = []
    result = SizeResult(nodes)
    try:
        for config in CONFIGS:
            n = build_node(config, str(nodes))
            built.append(n)
            install(n, nodes, bpffs)
            result.setup_s[config] = round(n.setup_s, 2)
            log(f"  {nodes} nodes: {config} installed in {n.setup_s:.1f} s")
        by_config = {n.config: n for n in built}
        dst = {
            "non-cluster": cluster.NON_CLUSTER_V4,
            "forwarded": cluster.NON_CLUSTER_V4,
            "cluster": cluster.last_node_v4(nodes) if nodes else None,
        }
        pps: dict = {(c, t): [] for c in CONFIGS for t in TRAFFIC}
        wall: dict = {(c, t): [] for c in CONFIGS for t in TRAFFIC}
        sent_total: dict = {(c, t): 0 for c in CONFIGS for t in TRAFFIC}
        delivered_total: dict = {(c, t): 0 for c in CONFIGS for t in TRAFFIC}
        err_total: dict = {(c, t): 0 for c in CONFIGS for t in TRAFFIC}
        for r in range(rounds):
            order = CONFIGS[r % len(CONFIGS) :] + CONFIGS[: r % len(CONFIGS)]
            for traffic in TRAFFIC:
                if dst[traffic] is None:
                    continue
                for config in order:
                    n = by_config[config]
                    before = n.delivered()
                    ns = n.pod if traffic == "forwarded" else n.node
                    sent = sender.run(ns, dst[traffic], seconds)
                    delivered_total[(config, traffic)] += n.delivered() - before
                    sent_total[(config, traffic)] += sent.sent
                    err_total[(config, traffic)] += sent.errors
                    pps[(config, traffic)].append(sent.pps_cpu)
                    wall[(config, traffic)].append(sent.pps)
        for traffic in TRAFFIC:
            if dst[traffic] is None:
                continue
            base = pps[("baseline", traffic)]
            for config in CONFIGS:
                series = pps[(config, traffic)]
                ratios = [x / b for x, b in zip(series, base) if b > 0]
                ratio = statistics.median(ratios)
                result.rows.append(
                    {
                        "config": config,
                        "traffic": traffic,
                        "nodes": nodes,
                        "pps": round(statistics.median(series), 1),
                        "ratio_to_baseline": round(ratio, 4),
                    }
                )
                key = f"{config}/{traffic}"
                result.spread[key] = [round(min(ratios), 3), round(max(ratios), 3)]
                result.wall_pps[key] = round(statistics.median(wall[(config, traffic)]), 1)
                sent_n = sent_total[(config, traffic)]
                result.delivery[key] = (
                    round(delivered_total[(config, traffic)] / sent_n, 4) if sent_n else 0.0
                )
                if err_total[(config, traffic)]:
                    result.errors[key] = err_total[(config, traffic)]
    finally:
        for n in reversed(built):
            destroy(n)
        subprocess.run(["umount", bpffs], check=False)
    return result


def sender_ceiling(sender: Sender, seconds: float, rounds: int) -> dict:
    """How fast the sender alone goes: the same datagrams routed (no rules, no program) to a
    device that drops them at tc egress, before any transfer to a peer or receiver. Measured
    rates well below it come from the path under test, not from the sender."""
    ns = netns.create("bench-sink")
    try:
        _ip(ns, "link", "add", "sink0", "type", "veth", "peer", "name", "sink1")
        for dev in ("sink0", "sink1"):
            _ip(ns, "link", "set", dev, "arp", "off", "up")
        _ip(ns, "route", "add", "203.0.113.0/24", "dev", "sink0")
        fds = netns.call_in(ns, dropprog.attach_drop, "sink0")
        try:
            runs = [sender.run(ns, SINK_DST, seconds) for _ in range(rounds)]
        finally:
            prog, link = fds
            link.close()
            os.close(prog)
    finally:
        netns.delete(ns)
    return {
        "pps": round(statistics.median(r.pps_cpu for r in runs), 1),
        "wall_pps": round(statistics.median(r.pps for r in runs), 1),
        "what": "sender to a device dropping at tc egress: no rules, no program, no receiver",
    }
