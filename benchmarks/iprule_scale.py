"""Packet rate with many cluster destinations: the seed's one-rule-per-destination layout versus
nodecryptor's ip-rule datapath (a constant handful of rules plus one route per destination).

Every unconnected UDP ``sendto`` makes the kernel look up a route, walking the fib rules in
priority order. The seed added one rule per remote node address and pod CIDR, so the walk
grows with the cluster; nodecryptor keeps destinations as routes in its own table (a trie).

For each layout and 0 / 1,000 / 10,000 destinations, a fresh network namespace is set up and a
sender inside it sends 64-byte UDP datagrams for ``--seconds`` to (a) an address outside the
cluster (walks every rule, then main) and (b) the last cluster destination installed. Devices
have ARP off so no neighbour resolution is involved; packets leave through veth pairs and are
dropped by their peers.

Usage (root): .venv/bin/python benchmarks/iprule_scale.py [--seconds 2] [--sizes 0,1000,10000]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import cluster as bench_cluster
from benchlib import machine as bench_machine
from nodecryptor.core.model import NodeInfo, WgState
from nodecryptor.policy.plan import compute_desired, compute_plan
from nodecryptor.core.settings import Settings
from nodecryptor_testkit import netns

if TYPE_CHECKING:
    from nodecryptor.datapath.iprule.backend import IpRuleDatapath

LOCAL = "192.168.50.21"
OUTSIDE = "198.51.100.7"

SENDER = """
import socket, sys, time
dst, seconds = sys.argv[1], float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = b"x" * 64
sent = errors = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(1000):
        try:
            s.sendto(payload, (dst, 9))
            sent += 1
        except OSError:
            errors += 1
print(sent, errors)
"""


def destinations(count: int) -> list[str]:
    """``count`` prefixes: alternately a worker's /32 address and its /24 pod CIDR."""
    out = []
    for i in range(count):
        node = i // 2
        if i % 2 == 0:
            out.append(f"172.16.{node // 250}.{node % 250 + 1}/32")
        else:
            out.append(f"10.{100 + node // 256}.{node % 256}.0/24")
    return out


def prepare(ns: str) -> int:
    def ip(*args: str) -> None:
        netns.run("ip", *args, netns=ns)

    ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    ip("link", "add", "cilium_wg0", "type", "veth", "peer", "name", "wgpeer")
    for dev in ("eth0", "eth0p", "cilium_wg0", "wgpeer"):
        ip("link", "set", dev, "arp", "off", "up")
    ip("addr", "add", f"{LOCAL}/24", "dev", "eth0")
    ip("route", "add", "default", "via", "192.168.50.1", "dev", "eth0", "onlink")
    out = netns.run("cat", "/sys/class/net/cilium_wg0/ifindex", netns=ns).stdout
    return int(out)


def install_seed(ns: str, prefixes: list[str]) -> None:
    """The seed's layout: table 100 = default via the WireGuard device, one rule each."""
    bench_cluster.install_seed_prefixes(ns, prefixes)


def install_nodecryptor(ns: str, wg_index: int, count: int) -> IpRuleDatapath:
    settings = Settings(node_name="local")
    nodes = {"local": NodeInfo("local", addresses=(("InternalIP", ipaddress.ip_address(LOCAL)),))}
    for i in range((count + 1) // 2):
        nodes[f"w{i}"] = NodeInfo(
            f"w{i}",
            addresses=(("InternalIP", ipaddress.ip_address(f"172.16.{i // 250}.{i % 250 + 1}")),),
            pod_cidrs=(ipaddress.ip_network(f"10.{100 + i // 256}.{i % 256}.0/24"),)
            if 2 * i + 1 < count
            else (),
        )
    plan = compute_plan(nodes, "local", settings)
    wg = WgState(
        ifname="cilium_wg0",
        ifindex=wg_index,
        present=True,
        up=True,
        listen_port=51871,
        fwmark=0xE00,
    )
    return bench_cluster.install_iprule(ns, compute_desired(plan, wg, (), settings), settings)


def rate(ns: str, dst: str, seconds: float) -> tuple[float, int]:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", SENDER, dst, str(seconds)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    sent, errors = (int(x) for x in out.split())
    return sent / seconds, errors


def count_rules(ns: str) -> int:
    out = netns.run("ip", "rule", "show", netns=ns).stdout
    return len(out.splitlines())


def measure(layout: str, count: int, seconds: float) -> dict:
    ns = netns.create(f"bench-{layout}")
    try:
        wg_index = prepare(ns)
        prefixes = destinations(count)
        started = time.monotonic()
        if layout == "seed" and count:
            install_seed(ns, prefixes)
        elif layout == "nodecryptor" and count:
            install_nodecryptor(ns, wg_index, count)
        setup = time.monotonic() - started
        last = str(ipaddress.ip_network(prefixes[-1]).network_address + 1) if prefixes else None
        outside, outside_err = rate(ns, OUTSIDE, seconds)
        cluster, cluster_err = rate(ns, last, seconds) if last else (float("nan"), 0)
        return {
            "layout": layout,
            "destinations": count,
            "rules": count_rules(ns),
            "setup_s": setup,
            "outside_pps": outside,
            "cluster_pps": cluster,
            "errors": outside_err + cluster_err,
        }
    finally:
        netns.delete(ns)


def machine() -> str:
    return bench_machine.line(bench_machine.describe())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="send time per measurement")
    parser.add_argument("--sizes", default="0,1000,10000", help="destination counts")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    sizes = [int(x) for x in args.sizes.split(",")]
    print(f"machine: {machine()}")
    print(
        f"load average before: {os.getloadavg()[0]:.2f}; {args.seconds:g}s per cell; "
        f"64-byte unconnected UDP sendto from Python"
    )
    header = (
        f"{'layout':<12} {'dests':>6} {'rules':>6} {'setup s':>8} "
        f"{'outside pps':>12} {'cluster pps':>12} {'errors':>7}"
    )
    print(header)
    print("-" * len(header))
    for count in sizes:
        for layout in ("seed", "nodecryptor"):
            r = measure(layout, count, args.seconds)
            print(
                f"{r['layout']:<12} {r['destinations']:>6} {r['rules']:>6} "
                f"{r['setup_s']:>8.2f} {r['outside_pps']:>12,.0f} {r['cluster_pps']:>12,.0f} "
                f"{r['errors']:>7}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
