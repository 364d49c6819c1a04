"""Cost of the nodecryptor tc program per packet, measured with BPF_PROG_TEST_RUN ``repeat``.

For each cluster size N (``--sizes``) the maps hold N remote nodes, each with a node address and
a pod CIDR in both families (IPv4 /32 + /24, IPv6 /128 + /64; nodes 0-2 are control-plane).
Cases, for IPv4 and IPv6:

    empty     an empty tc program (the harness floor), same frame as "miss"
    miss      a destination outside the cluster (what most traffic of a node is)
    hit-node  a redirect to a node address
    hit-pod   a redirect to an address in a pod CIDR
    exempt    TCP 6443 to a control-plane node (passes in the clear)

The empty program and nodecryptor's program are measured alternately within every round, so
drift of the machine (frequency, other load) affects both alike; the median of ``--rounds``
kernel averages over ``--repeat`` runs is reported, and the margin over "empty" of the same
size and family. Test-run does not perform the redirect, so WireGuard's own cost is not in it.
Needs root, BCC and kernel headers.

    .venv/bin/python benchmarks/bpf_cost.py [--sizes 0,100,1000,10000,50000] [--quick]
                                            [--json PATH]

``--json PATH`` writes a list of rows ``{"case", "family", "nodes", "ns"}`` (the per-packet
section of benchmarks/results/latest.json); ``machine()`` describes the machine.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import platform
import statistics
import sys
import time

from nodecryptor.datapath.bpf import program, testrun
from nodecryptor.datapath.bpf.maps import diff
from nodecryptor.policy.exemptions import BUILTIN_NAME, PolicyRange
from nodecryptor.core.model import (
    KIND_NODE_IP,
    KIND_POD_CIDR,
    ROLE_WORKER,
    DesiredState,
    Destination,
    Plan,
    WgState,
)
from nodecryptor.core.ports import parse_port_spec
from nodecryptor.core.settings import MapSizes, Settings

LOCAL = {4: "192.0.2.1", 6: "2001:db8:ffff::1"}
MISS = {4: "198.51.100.7", 6: "2001:db8:77::7"}
NODE_BASE = {
    4: int(ipaddress.IPv4Address("172.16.0.0")),
    6: int(ipaddress.IPv6Address("fd00:50::")),
}
POD_BASE = {4: int(ipaddress.IPv4Address("10.0.0.0")), 6: int(ipaddress.IPv6Address("fd00:244::"))}
CONTROL_PLANE_NODES = 3
CASES = ("empty", "miss", "hit-node", "hit-pod", "exempt")
EXPECTED_REASON = {
    "miss": "not-cluster-destination",
    "hit-node": "cluster-destination",
    "hit-pod": "cluster-destination",
    "exempt": "exempt-control-plane-port",
}
DEFAULT_SIZES = "0,100,1000,10000,50000"


def node_address(family: int, i: int):
    return ipaddress.ip_address(NODE_BASE[family] + i + 1)


def pod_cidr(family: int, i: int):
    if family == 4:
        return ipaddress.ip_network((POD_BASE[4] + (i << 8), 24))
    return ipaddress.ip_network((POD_BASE[6] + (i << 64), 64))


EXEMPT_PORTS = parse_port_spec("2379-2380,6443")
BOOTSTRAP = tuple(PolicyRange(r.protocol, r.first, r.last, BUILTIN_NAME) for r in EXEMPT_PORTS)


def synthetic_desired(nodes: int) -> DesiredState:
    """``nodes`` remote nodes, each with a node address and a pod CIDR in both families."""
    destinations = []
    for i in range(nodes):
        for family in (4, 6):
            cp = i < CONTROL_PLANE_NODES
            # A control-plane node's address carries the built-in bootstrap policy's ports,
            # as policy.compute_plan gives it (its pod CIDR never does).
            destinations.append(
                Destination(
                    ipaddress.ip_network(node_address(family, i)),
                    f"node-{i}",
                    KIND_NODE_IP,
                    cp,
                    exempt_ports=BOOTSTRAP if cp else (),
                )
            )
            destinations.append(Destination(pod_cidr(family, i), f"node-{i}", KIND_POD_CIDR, cp))
    plan = Plan(
        node="bench",
        role=ROLE_WORKER,
        local_addresses=tuple(ipaddress.ip_address(a) for a in LOCAL.values()),
        destinations=tuple(destinations),
        exempt_ports=EXEMPT_PORTS,
        policies=(BUILTIN_NAME,),
    )
    wg = WgState(
        ifname="cilium_wg0",
        ifindex=7,
        present=True,
        up=True,
        mtu=1420,
        listen_port=51871,
        peers=None,
    )
    return DesiredState(
        plan=plan,
        wg=wg,
        devices=(),
        fail_mode="closed",
        enabled=True,
        mss_v4=1380,
        mss_v6=1360,
        max_packet_v4=1420,
        max_packet_v6=1420,
    )


def frames(family: int, nodes: int) -> dict[str, bytes]:
    """The frame of every case that applies at this size (hits need at least one node)."""

    def tcp(dst, dport=8080):
        return testrun.build_frame(
            LOCAL[family], str(dst), dport=dport, tcp_flags="A", payload_len=64
        )

    out = {"empty": tcp(MISS[family], 443), "miss": tcp(MISS[family], 443)}
    if nodes:
        middle = nodes // 2
        out["hit-node"] = tcp(node_address(family, middle))
        out["hit-pod"] = tcp(pod_cidr(family, middle).network_address + 9)
        out["exempt"] = tcp(node_address(family, 0), 6443)
    return out


def machine() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "?"
            )
    except OSError:
        pass
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def machine_line(m: dict) -> str:
    return (
        f"machine: kernel {m['kernel']}, {m['cpus']} CPUs ({m['cpu']}), python "
        f"{m['python']}, load average {' '.join(map(str, m['load_average']))}"
    )


def measure(
    progs: dict[str, int], cases: dict[str, bytes], repeat: int, rounds: int
) -> dict[str, float]:
    """Median ns per case; every round runs every case once, the empty program alternating
    with nodecryptor's."""
    samples: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(rounds):
        for case, frame in cases.items():
            fd = progs["empty"] if case == "empty" else progs["nodecryptor"]
            samples[case].append(testrun.time_per_packet(fd, frame, repeat))
    return {case: statistics.median(values) for case, values in samples.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes",
        default=DEFAULT_SIZES,
        help="comma-separated cluster sizes in nodes (default: %(default)s)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer iterations (repeat 20,000, 3 rounds)"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="test-run repeat count (default 200,000; --quick 20,000)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="rounds per measurement (default 7; --quick 3)"
    )
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON to PATH")
    args = parser.parse_args(argv)
    try:
        sizes = sorted({int(x) for x in args.sizes.split(",") if x.strip()})
        if any(n < 0 for n in sizes):
            raise ValueError
    except ValueError:
        print(
            f"invalid value {args.sizes!r} for --sizes: expected comma-separated counts",
            file=sys.stderr,
        )
        return 2
    repeat = args.repeat or (20_000 if args.quick else 200_000)
    rounds = args.rounds or (3 if args.quick else 7)
    if os.geteuid() != 0:
        print("needs root (BPF_PROG_LOAD, BPF_PROG_TEST_RUN)", file=sys.stderr)
        return 1

    info = machine()
    print(machine_line(info))
    largest = 2 * max(sizes, default=0)  # destinations per family
    capacity = 1 << max(14, (largest + largest // 4).bit_length())
    settings = Settings(
        map_sizes=MapSizes(
            destinations_v4=capacity, destinations_v6=capacity, destinations_max=capacity
        )
    )
    empty = program.load_empty()
    started = time.monotonic()
    loaded = program.load(settings)
    print(
        f"compile+load: {time.monotonic() - started:.2f} s; repeat {repeat}, rounds {rounds}; "
        f"map capacity {capacity} per family"
    )
    progs = {"empty": empty.prog_fd, "nodecryptor": loaded.prog_fd}
    rows = []
    print(
        f"\n{'nodes':>7} {'family':>6} {'sync s':>7}  "
        + "  ".join(f"{c:>13}" for c in CASES)
        + "   (ns/packet, +margin over empty)"
    )
    for nodes in sizes:
        desired = synthetic_desired(nodes)
        started = time.monotonic()
        diff.sync(loaded.map_fds, desired, capacities=loaded.capacities)
        sync_s = time.monotonic() - started
        for family in (4, 6):
            cases = frames(family, nodes)
            for case, frame in cases.items():
                if case == "empty":
                    continue
                got = testrun.run(loaded.prog_fd, frame).reason_name
                if got != EXPECTED_REASON[case]:
                    raise SystemExit(
                        f"{case} IPv{family} frame at {nodes} nodes classified "
                        f"{got}, expected {EXPECTED_REASON[case]}"
                    )
            ns = measure(progs, cases, repeat, rounds)
            cells = []
            for case in CASES:
                if case not in ns:
                    cells.append(f"{'-':>13}")
                    continue
                rows.append(
                    {"case": case, "family": family, "nodes": nodes, "ns": round(ns[case], 1)}
                )
                margin = "" if case == "empty" else f" +{ns[case] - ns['empty']:.0f}"
                cells.append(f"{ns[case]:>7.1f}{margin:>6}")
            print(f"{nodes:>7} {'IPv' + str(family):>6} {sync_s:>7.2f}  " + "  ".join(cells))
    loaded.close()
    empty.close()
    if args.json:
        directory = os.path.dirname(args.json)
        if directory:
            os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
        print(f"\nwrote {len(rows)} rows to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
