"""Cost of underlay-device detection per reconcile pass with many remote nodes: the first pass
does one route lookup per node address, later passes reuse them (devices.DeviceResolver).

Runs in a throwaway network namespace (one veth with a /16), removed at the end. Needs root.

    sudo .venv/bin/python benchmarks/device_detection.py [--nodes 10000]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nodecryptor.node.devices import DeviceResolver
from nodecryptor_testkit import netns


def measure(nodes: int) -> list[tuple[str, float, int]]:
    addrs = [ipaddress.ip_address("192.168.0.2") + i for i in range(nodes)]
    resolver = DeviceResolver(refresh_seconds=3600)
    rows = []
    for label in ("first pass", "second pass", "third pass"):
        started = time.perf_counter()
        devices, problems = resolver((), addrs, "cilium_wg0")
        rows.append((label, time.perf_counter() - started, resolver.lookups))
        assert [d.name for d in devices] == ["eth0"] and not problems, (devices, problems)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10000)
    args = parser.parse_args()
    ns = netns.create("bench")
    try:
        netns.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1", netns=ns)
        netns.run("ip", "addr", "add", "192.168.0.1/16", "dev", "eth0", netns=ns)
        netns.run("ip", "link", "set", "eth0", "up", netns=ns)
        with netns.entered(ns):
            rows = measure(args.nodes)
    finally:
        netns.delete(ns)
    print(
        f"machine: {platform.node()} kernel {platform.release()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}; {args.nodes} remote node addresses"
    )
    print(f"{'pass':<12} {'seconds':>8} {'route lookups so far':>22}")
    for label, seconds, lookups in rows:
        print(f"{label:<12} {seconds:>8.3f} {lookups:>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
