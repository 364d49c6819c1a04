"""Flows, what is expected of them, and what the underlay showed: the scenarios' vocabulary.

A ``Flow`` is one attempt from an endpoint (``w1``, ``w1/pod``, ``ext``) to another, with a
source port of its own. ``observe`` runs a batch of flows while tcpdump watches the underlay and
turns each into a ``Row``: did it get through, and did any of its packets cross in the clear.
``leaks`` finds every packet between cluster addresses that crossed in the clear without being
an exempt control-plane flow, whichever flow it belonged to.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import threading
from collections import defaultdict
from dataclasses import dataclass, field

from nodecryptor.core.ports import IP_PROTOCOLS

from .capture import Capture, Packet
from .spec import EXEMPT_TCP_PORTS, LabSpec

ENCRYPTED = "encrypted"
"""Got through, and nothing of it crossed the underlay in the clear."""
CLEAR = "clear"
"""Got through in the clear (exempt, or not cluster traffic)."""
BLOCKED = "blocked"
"""Did not get through, and nothing of it crossed in the clear (fail-closed)."""
LEAKED = "leaked"
"""Did not get through, but some of it crossed in the clear."""

PROTO_NUMBERS = {name: IP_PROTOCOLS[name] for name in ("tcp", "udp")}  # what the lab sends


@dataclass(frozen=True)
class Flow:
    src: str
    dst: str
    family: int
    proto: str
    dport: int
    expect: str
    note: str = ""
    connect_only: bool = False
    """Judge a TCP flow on the handshake alone (the fake API answers HTTP, not an echo)."""

    @property
    def label(self) -> str:
        port = "" if self.proto == "icmp" else f"/{self.dport}"
        note = f" ({self.note})" if self.note else ""
        return f"{self.src} -> {self.dst} {self.proto}{port} IPv{self.family}{note}"


@dataclass
class Row:
    label: str
    expected: str
    observed: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.expected == self.observed


@dataclass
class Result:
    scenario: str
    datapath: str
    rows: list[Row] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.rows) and all(r.ok for r in self.rows)


class PortAllocator:
    """Unique client source ports, so every flow's packets can be told apart in a capture and a
    connection never meets the TIME_WAIT of an earlier one."""

    def __init__(self, first: int = 20000, last: int = 32000):
        self._ports = itertools.cycle(range(first, last))
        self._lock = threading.Lock()

    def take(self) -> int:
        with self._lock:
            return next(self._ports)


def not_wireguard_or_nd(packets: list[Packet]) -> list[Packet]:
    """``packets`` less WireGuard's own UDP and IPv6 neighbour discovery. The later fragments
    of a WireGuard datagram (fragmented on the underlay, e.g. a TCP segment that did not fit
    after encryption) carry no UDP header: they are tied to their first fragment, which does,
    by addresses and IP id. They are encrypted, not clear text."""
    wireguard_datagrams = {
        (p.src, p.dst, p.proto, p.frag_id) for p in packets if p.wireguard and p.frag_id >= 0
    }
    return [
        p
        for p in packets
        if not (
            p.wireguard
            or p.neighbour_discovery
            or (p.fragment and (p.src, p.dst, p.proto, p.frag_id) in wireguard_datagrams)
        )
    ]


def _packets_of(
    flow_src: str, flow_dst: str, proto: str, sport: int, dport: int, packets: list[Packet]
) -> list[Packet]:
    src, dst = ipaddress.ip_address(flow_src), ipaddress.ip_address(flow_dst)
    out = []
    for p in not_wireguard_or_nd(packets):
        if {p.src, p.dst} != {src, dst}:
            continue
        if proto == "icmp":
            if p.proto in (1, 58):
                out.append(p)
        elif p.proto == PROTO_NUMBERS[proto] and (
            (p.src == src and p.sport == sport and p.dport == dport)
            or (p.dst == src and p.dport == sport and p.sport == dport)
        ):
            out.append(p)
    return out


def classify(got_through: bool, clear_packets: int) -> str:
    if got_through:
        return CLEAR if clear_packets else ENCRYPTED
    return LEAKED if clear_packets else BLOCKED


def observe(
    lab, flows: list[Flow], ports: PortAllocator, capture_name: str = "flows", timeout: float = 1.5
) -> list[Row]:
    """Try ``flows`` (grouped by source namespace, groups in parallel) under tcpdump."""
    requests = []
    for i, flow in enumerate(flows):
        req = {
            "id": i,
            "proto": flow.proto,
            "dst": lab.address_of(flow.dst, flow.family),
            "src": lab.address_of(flow.src, flow.family),
            "dport": flow.dport,
            "sport": ports.take(),
            "timeout": timeout,
            "connect_only": flow.connect_only,
        }
        requests.append((lab.netns_of(flow.src), req))
    by_netns: dict[str, list[dict]] = defaultdict(list)
    for netns, req in requests:
        by_netns[netns].append(req)
    results: dict[int, dict] = {}
    errors: list[str] = []

    def run(netns: str, batch: list[dict]) -> None:
        try:
            for res in lab.run_flows(netns, batch):
                results[res["id"]] = res
        except Exception as e:  # any failure: reported as the rows' detail below
            errors.append(str(e))

    path = os.path.join(lab.workdir, f"{capture_name}.pcap")
    with Capture(lab.underlay, path) as cap:
        threads = [threading.Thread(target=run, args=item) for item in by_netns.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        packets = cap.stop()
    rows = []
    for i, flow in enumerate(flows):
        req = requests[i][1]
        res = results.get(i, {"ok": False, "error": "; ".join(errors) or "no result"})
        clear = _packets_of(req["src"], req["dst"], flow.proto, req["sport"], flow.dport, packets)
        observed = classify(res["ok"], len(clear))
        detail = f"{len(clear)} clear packets" if clear else ""
        if not res["ok"]:
            detail = (detail + "; " if detail else "") + res.get("error", "")
        rows.append(Row(flow.label, flow.expect, observed, detail))
    return rows


def cluster_networks(spec: LabSpec) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for node in spec.nodes:
        nets += [
            ipaddress.ip_network(node.ipv4),
            ipaddress.ip_network(node.ipv6),
            node.pod_cidr_v4,
            node.pod_cidr_v6,
        ]
    return nets


def leaks(
    packets: list[Packet], spec: LabSpec, exempt_ports: tuple[int, ...] = EXEMPT_TCP_PORTS
) -> list[Packet]:
    """Packets between cluster addresses that crossed in the clear and are not an exempt
    control-plane flow (TCP to an exempt port of a control-plane node address, or its reply
    from that address). WireGuard's own UDP and IPv6 neighbour discovery are not leaks."""
    nets = cluster_networks(spec)
    cp_addrs = {a for n in spec.control_plane for a in (n.ipv4, n.ipv6)}

    def in_cluster(addr) -> bool:
        return any(addr in n for n in nets if n.version == addr.version)

    out = []
    for p in not_wireguard_or_nd(packets):
        if not (in_cluster(p.src) and in_cluster(p.dst)):
            continue
        if p.proto == 6 and (
            (p.dst in cp_addrs and p.dport in exempt_ports)
            or (p.src in cp_addrs and p.sport in exempt_ports)
        ):
            continue
        out.append(p)
    return out
