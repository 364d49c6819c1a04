"""Cost of the nodecryptor tc program per packet, measured with BPF_PROG_TEST_RUN ``repeat``.

Compares an empty program (the harness floor) with nodecryptor's program holding 100, 10,000
and 50,000 destinations (half /32 node addresses, half /24 pod CIDRs), for a packet that hits
a node address, one that hits a pod CIDR, and one that misses (not a cluster destination).
Also reports how long compile+load and a full maps.sync take. Needs root, BCC and headers.

    sudo .venv/bin/python benchmarks/bpf_cost.py [--repeat 200000] [--rounds 5]

The numbers are the kernel's own average over ``repeat`` runs; the median of ``rounds`` is
printed. Test-run does not perform the redirect, so the cost of WireGuard itself is not in it.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import platform
import resource
import statistics
import sys
import time

from nodecryptor.datapath.bpf import maps, program, testrun
from nodecryptor.model import (KIND_NODE_IP, KIND_POD_CIDR, ROLE_WORKER, DesiredState,
                               Destination, Plan, WgState)
from nodecryptor.ports import parse_port_spec
from nodecryptor.settings import Settings

LOCAL_V4 = "192.0.2.1"
MISS_V4 = "198.51.100.7"
SIZES = (100, 10_000, 50_000)


def synthetic_desired(count: int) -> DesiredState:
    """``count`` destinations: node i has 172.16.0.0/12 + i as /32 and 10.(i)/24 as pod CIDR."""
    nodes = count // 2
    node_base = int(ipaddress.IPv4Address("172.16.0.1"))
    pod_base = int(ipaddress.IPv4Address("10.0.0.0"))
    destinations = []
    for i in range(nodes):
        name = f"node-{i}"
        destinations.append(Destination(
            prefix=ipaddress.ip_network(ipaddress.IPv4Address(node_base + i)), node=name,
            kind=KIND_NODE_IP, control_plane=i < 3))
        destinations.append(Destination(
            prefix=ipaddress.ip_network((pod_base + (i << 8), 24)), node=name,
            kind=KIND_POD_CIDR, control_plane=i < 3))
    plan = Plan(node="bench", role=ROLE_WORKER,
                local_addresses=(ipaddress.ip_address(LOCAL_V4),),
                destinations=tuple(destinations), exempt_ports=parse_port_spec("2379-2380,6443"))
    wg = WgState(ifname="cilium_wg0", ifindex=7, present=True, up=True, mtu=1420,
                 listen_port=51871, peers=None)
    return DesiredState(plan=plan, wg=wg, devices=(), fail_mode="closed", enabled=True,
                        mss_v4=1380, mss_v6=1360, max_packet_v4=1420, max_packet_v6=1420)


def per_packet_ns(prog_fd: int, frame: bytes, repeat: int, rounds: int) -> float:
    return statistics.median(testrun.time_per_packet(prog_fd, frame, repeat)
                             for _ in range(rounds))


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "?")
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"kernel {platform.release()}, {os.cpu_count()} CPUs ({cpu}), "
            f"python {platform.python_version()}, load average {load}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=200_000, help="test-run repeat count")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per measurement")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (BPF_PROG_LOAD, BPF_PROG_TEST_RUN)", file=sys.stderr)
        return 1

    print(f"machine: {machine()}")
    empty = program.load_empty()
    started = time.monotonic()
    loaded = program.load(Settings())
    load_s = time.monotonic() - started
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"compile+load: {load_s:.2f} s, peak RSS of this process {rss_mb:.0f} MB")

    hit_node = testrun.build_frame(LOCAL_V4, "172.16.0.2", dport=8080, tcp_flags="A",
                                   payload_len=64)
    hit_pod = testrun.build_frame(LOCAL_V4, "10.0.1.9", dport=8080, tcp_flags="A",
                                  payload_len=64)
    miss = testrun.build_frame(LOCAL_V4, MISS_V4, dport=443, tcp_flags="A", payload_len=64)
    floor = per_packet_ns(empty.prog_fd, hit_node, args.repeat, args.rounds)
    print(f"empty program (harness floor): {floor:.1f} ns/packet")
    print()
    print(f"{'destinations':>12} {'sync s':>8} {'hit /32 ns':>11} {'hit /24 ns':>11} "
          f"{'miss ns':>8}   (ns above the floor: /32, /24, miss)")
    for count in SIZES:
        desired = synthetic_desired(count)
        started = time.monotonic()
        maps.sync(loaded.map_fds, desired)
        sync_s = time.monotonic() - started
        for frame, want in ((hit_node, "cluster-destination"),
                            (hit_pod, "cluster-destination"),
                            (miss, "not-cluster-destination")):
            got = testrun.run(loaded.prog_fd, frame).reason_name
            if got != want:
                raise SystemExit(f"benchmark frame classified {got}, expected {want}")
        node_ns = per_packet_ns(loaded.prog_fd, hit_node, args.repeat, args.rounds)
        pod_ns = per_packet_ns(loaded.prog_fd, hit_pod, args.repeat, args.rounds)
        miss_ns = per_packet_ns(loaded.prog_fd, miss, args.repeat, args.rounds)
        print(f"{count:>12} {sync_s:>8.2f} {node_ns:>11.1f} {pod_ns:>11.1f} {miss_ns:>8.1f}"
              f"   (+{node_ns - floor:.0f}, +{pod_ns - floor:.0f}, +{miss_ns - floor:.0f})")
    loaded.close()
    empty.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
