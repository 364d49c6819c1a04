"""Reads the scenario's tcpdump captures in-process.

Under TCG every process start costs a good part of a second, so instead of one ``tcpdump -r
<filter>`` per question the scenario parses each pcap file once into ``Packet`` records and
counts with Python predicates. Only what the checks need is decoded: IPv4 header (addresses,
protocol, fragment bits), TCP/UDP ports, TCP flags, payload length and the MSS option.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

# pcap link types tcpdump writes for the devices of the lab
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101  # cilium_wg0: bare IP packets
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276
ETH_P_IP = 0x0800
IP_MF = 0x2000
IP_OFFSET_MASK = 0x1FFF
TCP_SYN = 0x02
TCPOPT_END, TCPOPT_NOP, TCPOPT_MSS = 0, 1, 2


@dataclass(frozen=True)
class Packet:
    src: str
    dst: str
    proto: int
    length: int  # IP total length
    more_fragments: bool
    frag_offset: int
    sport: int = 0
    dport: int = 0
    tcp_flags: int = 0
    payload: int = 0  # TCP/UDP payload bytes (first fragment: what the IP length implies)
    mss: int = 0

    @property
    def fragment(self) -> bool:
        """Any piece of a fragmented packet."""
        return self.more_fragments or self.frag_offset > 0

    @property
    def first_fragment(self) -> bool:
        return self.more_fragments and self.frag_offset == 0

    def has_port(self, port: int) -> bool:
        return port in (self.sport, self.dport)

    def between(self, host: str) -> bool:
        return host in (self.src, self.dst)


def _ip_offset(linktype: int, frame: bytes) -> int | None:
    if linktype == LINKTYPE_ETHERNET:
        return 14 if struct.unpack_from("!H", frame, 12)[0] == ETH_P_IP else None
    if linktype == LINKTYPE_RAW:
        return 0 if frame and frame[0] >> 4 == 4 else None
    if linktype == LINKTYPE_LINUX_SLL:
        return 16 if struct.unpack_from("!H", frame, 14)[0] == ETH_P_IP else None
    if linktype == LINKTYPE_LINUX_SLL2:
        return 20 if struct.unpack_from("!H", frame, 0)[0] == ETH_P_IP else None
    raise ValueError(f"pcap link type {linktype} not handled")


def _mss(options: bytes) -> int:
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == TCPOPT_END:
            break
        if kind == TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2:
            break
        if kind == TCPOPT_MSS and options[i + 1] == 4 and i + 4 <= len(options):
            return struct.unpack_from("!H", options, i + 2)[0]
        i += options[i + 1]
    return 0


def _decode(ip: bytes) -> Packet | None:
    if len(ip) < 20 or ip[0] >> 4 != 4:
        return None
    ihl = (ip[0] & 0x0F) * 4
    total, frag = struct.unpack_from("!H2xH", ip, 2)
    proto = ip[9]
    fields = dict(
        src=str(ipaddress.IPv4Address(ip[12:16])),
        dst=str(ipaddress.IPv4Address(ip[16:20])),
        proto=proto,
        length=total,
        more_fragments=bool(frag & IP_MF),
        frag_offset=frag & IP_OFFSET_MASK,
    )
    l4 = ip[ihl:]
    if fields["frag_offset"] == 0 and proto in (6, 17) and len(l4) >= 4:
        fields["sport"], fields["dport"] = struct.unpack_from("!HH", l4, 0)
        if proto == 17:
            fields["payload"] = total - ihl - 8
        elif len(l4) >= 14:
            doff = (l4[12] >> 4) * 4
            fields["tcp_flags"] = l4[13]
            fields["payload"] = total - ihl - doff
            fields["mss"] = _mss(l4[20:doff]) if l4[13] & TCP_SYN else 0
    return Packet(**fields)


def read(path: str) -> list[Packet]:
    """IPv4 packets of a pcap file (other frames are skipped)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        return []
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a pcap file (magic {magic.hex()})")
    linktype = struct.unpack_from(endian + "I", data, 20)[0] & 0x0FFFFFFF
    packets, pos = [], 24
    while pos + 16 <= len(data):
        caplen = struct.unpack_from(endian + "I", data, pos + 8)[0]
        frame = data[pos + 16 : pos + 16 + caplen]
        pos += 16 + caplen
        offset = _ip_offset(linktype, frame)
        if offset is not None:
            packet = _decode(frame[offset:])
            if packet is not None:
                packets.append(packet)
    return packets
