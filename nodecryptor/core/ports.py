"""Parsing of exempt port specifications such as ``"2379-2380,6443,udp/8472"``.

Entries are TCP unless prefixed with a protocol. This is deliberately narrower than the seed,
whose ip rules matched the port numbers for every protocol: kube-apiserver and etcd speak TCP,
so a protocol-blind exemption let e.g. UDP to port 6443 leave in the clear for no reason.
"""

from __future__ import annotations

from dataclasses import dataclass

# The one table of IP protocol numbers nodecryptor names. Every layer (port specifications,
# rule specs, packet queries, the BPF test run, status output) reads it from here.
IP_PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "icmpv6": 58}
IP_PROTOCOL_NAMES = {v: k for k, v in IP_PROTOCOLS.items()}
# Protocols with ports, the ones an exemption can name.
PROTOCOLS = {name: IP_PROTOCOLS[name] for name in ("tcp", "udp", "sctp")}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
PORTED_NUMBERS = frozenset(PROTOCOLS.values())


@dataclass(frozen=True, order=True)
class PortRange:
    """An inclusive range of destination/source ports of one L4 protocol."""

    protocol: str  # "tcp" | "udp" | "sctp"
    first: int
    last: int

    @property
    def proto_number(self) -> int:
        return PROTOCOLS[self.protocol]

    def __contains__(self, port: int) -> bool:
        return self.first <= port <= self.last

    def to_json(self) -> dict[str, object]:
        return {"protocol": self.protocol, "first": self.first, "last": self.last}

    def __str__(self) -> str:
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        return ports if self.protocol == "tcp" else f"{self.protocol}/{ports}"


@dataclass(frozen=True, order=True)
class PolicyRange:
    """One exempt port range and the name of the exemption policy it comes from (the policy
    decides them, the model carries them, the datapaths tag their entries with the policy)."""

    protocol: str
    first: int
    last: int
    policy: str

    @property
    def range(self) -> PortRange:
        return PortRange(self.protocol, self.first, self.last)

    def __contains__(self, port: int) -> bool:
        return self.first <= port <= self.last

    def to_json(self) -> dict[str, object]:
        return {
            "protocol": self.protocol,
            "first": self.first,
            "last": self.last,
            "policy": self.policy,
        }


class PortSpecError(ValueError):
    """One entry of a port specification is invalid; ``entry`` is the offending text."""

    def __init__(self, entry: str, why: str):
        self.entry = entry
        self.why = why
        super().__init__(f"{entry!r}: {why}")


def _port(text: str, entry: str) -> int:
    # str.isdigit() accepts every script's digits ("٦٤٤٣", and "²", which int() rejects):
    # a port is ASCII decimal digits only.
    if not (text.isascii() and text.isdigit()):
        raise PortSpecError(entry, f"{text!r} is not a port number")
    value = int(text)
    if not 1 <= value <= 65535:
        raise PortSpecError(entry, f"port {value} is outside 1-65535")
    return value


def parse_port_spec(spec: str) -> tuple[PortRange, ...]:
    """Parse a comma-separated list of ``[proto/]port`` or ``[proto/]first-last`` entries.

    Returns the ranges sorted and merged per protocol (overlapping or adjacent ranges become one),
    so equal specifications compare equal. An empty string means no exemptions.
    """
    ranges: list[PortRange] = []
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            if spec.strip():
                raise PortSpecError(raw, "empty entry")
            continue
        protocol, sep, ports = entry.partition("/")
        if not sep:
            protocol, ports = "tcp", entry
        protocol = protocol.strip().lower()
        if protocol not in PROTOCOLS:
            raise PortSpecError(entry, f"unknown protocol {protocol!r} (tcp, udp or sctp)")
        first_text, dash, last_text = ports.strip().partition("-")
        first = _port(first_text.strip(), entry)
        last = _port(last_text.strip(), entry) if dash else first
        if last < first:
            raise PortSpecError(entry, f"range end {last} is below its start {first}")
        ranges.append(PortRange(protocol, first, last))
    return merge_ranges(ranges)


def merge_ranges(ranges: list[PortRange]) -> tuple[PortRange, ...]:
    merged: list[PortRange] = []
    for r in sorted(ranges):
        if merged and merged[-1].protocol == r.protocol and r.first <= merged[-1].last + 1:
            prev = merged[-1]
            merged[-1] = PortRange(r.protocol, prev.first, max(prev.last, r.last))
        else:
            merged.append(r)
    return tuple(merged)
