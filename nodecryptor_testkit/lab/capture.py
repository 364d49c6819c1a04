"""Watch the underlay: tcpdump in the bridge's namespace, and a decoder for what it wrote.

``Capture`` runs ``tcpdump -i any`` in the underlay namespace (every bridge port, so each frame
is seen on its way in and out) and, when stopped, decodes the pcap file into ``Packet`` records
(addresses, protocol, ports, ICMP type). The scenarios decide from those what crossed in the
clear; WireGuard's own UDP (port 51871 on both sides) is the encrypted traffic.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import signal
import struct
import subprocess
import time
from dataclasses import dataclass

from nodecryptor.core.ports import IP_PROTOCOLS, PORTED_NUMBERS

from .spec import VXLAN_PORT, WG_PORT

LINKTYPE_ETHERNET = 1
LINKTYPE_LINUX_SLL = 113
LINKTYPE_LINUX_SLL2 = 276
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPV6_EXT_HEADERS = {0, 43, 60}
"""Hop-by-hop, routing and destination options: skipped to reach the transport header."""
ICMPV6_ND_TYPES = range(133, 138)


@dataclass(frozen=True)
class Packet:
    src: ipaddress.IPv4Address | ipaddress.IPv6Address
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address
    proto: int
    sport: int = 0
    dport: int = 0
    icmp_type: int = -1
    fragment: bool = False
    """A non-first fragment (no transport header)."""
    frag_id: int = -1
    """The IP identification of a fragmented datagram (any of its fragments), else -1: ties a
    non-first fragment to its first one."""
    ts: float = 0.0
    """Capture time, seconds since the epoch."""
    tunnelled: bool = False
    """Decoded from inside a VXLAN packet that crossed the underlay in the clear (tunnel mode):
    the addresses are the inner ones, so a clear pod flow inside the tunnel is still seen."""

    @property
    def wireguard(self) -> bool:
        return self.proto == 17 and self.sport == WG_PORT and self.dport == WG_PORT

    @property
    def neighbour_discovery(self) -> bool:
        return self.proto == 58 and self.icmp_type in ICMPV6_ND_TYPES

    def __str__(self) -> str:
        if self.proto in (6, 17):
            name = "tcp" if self.proto == 6 else "udp"
            return f"{name} {self.src}:{self.sport} > {self.dst}:{self.dport}"
        return f"proto {self.proto} {self.src} > {self.dst}" + (
            f" type {self.icmp_type}" if self.icmp_type >= 0 else ""
        )


def _transport(
    proto: int, data: bytes, src, dst, fragment: bool, frag_id: int = -1
) -> Packet | None:
    if fragment:
        return Packet(src, dst, proto, fragment=True, frag_id=frag_id)
    packet = _first(proto, data, src, dst)
    if packet is not None and frag_id >= 0 and not packet.tunnelled:
        packet = dataclasses.replace(packet, frag_id=frag_id)
    return packet


def _first(proto: int, data: bytes, src, dst) -> Packet | None:
    if proto in PORTED_NUMBERS and len(data) >= 4:
        sport, dport = struct.unpack_from("!HH", data)
        if proto == 17 and dport == VXLAN_PORT and len(data) >= 16:
            # UDP (8) + VXLAN (8) + the inner Ethernet frame.
            inner = decode_frame(LINKTYPE_ETHERNET, data[16:])
            if inner is not None:
                return dataclasses.replace(inner, tunnelled=True)
        return Packet(src, dst, proto, sport, dport)
    if proto in (IP_PROTOCOLS["icmp"], IP_PROTOCOLS["icmpv6"]) and data:
        return Packet(src, dst, proto, icmp_type=data[0])
    return Packet(src, dst, proto)


def decode_ip(data: bytes) -> Packet | None:
    if not data:
        return None
    version = data[0] >> 4
    if version == 4 and len(data) >= 20:
        ihl = (data[0] & 0x0F) * 4
        ident, frag = struct.unpack_from("!HH", data, 4)
        src = ipaddress.IPv4Address(data[12:16])
        dst = ipaddress.IPv4Address(data[16:20])
        fragmented = (frag & 0x3FFF) != 0  # more-fragments flag or an offset
        return _transport(
            data[9],
            data[ihl:],
            src,
            dst,
            fragment=(frag & 0x1FFF) != 0,
            frag_id=ident if fragmented else -1,
        )
    if version == 6 and len(data) >= 40:
        src = ipaddress.IPv6Address(data[8:24])
        dst = ipaddress.IPv6Address(data[24:40])
        proto, offset, fragment, frag_id = data[6], 40, False, -1
        for _ in range(8):
            if proto in IPV6_EXT_HEADERS and len(data) >= offset + 2:
                proto, offset = data[offset], offset + (data[offset + 1] + 1) * 8
            elif proto == 44 and len(data) >= offset + 8:
                fragment = (struct.unpack_from("!H", data, offset + 2)[0] >> 3) != 0
                frag_id = struct.unpack_from("!I", data, offset + 4)[0]
                proto, offset = data[offset], offset + 8
            else:
                break
        return _transport(proto, data[offset:], src, dst, fragment, frag_id)
    return None


def decode_frame(linktype: int, frame: bytes) -> Packet | None:
    if linktype == LINKTYPE_ETHERNET and len(frame) >= 14:
        ethertype, payload = struct.unpack_from("!H", frame, 12)[0], frame[14:]
    elif linktype == LINKTYPE_LINUX_SLL and len(frame) >= 16:
        ethertype, payload = struct.unpack_from("!H", frame, 14)[0], frame[16:]
    elif linktype == LINKTYPE_LINUX_SLL2 and len(frame) >= 20:
        ethertype, payload = struct.unpack_from("!H", frame, 0)[0], frame[20:]
    else:
        return None
    if ethertype not in (ETH_P_IP, ETH_P_IPV6):
        return None
    return decode_ip(payload)


def read_pcap(path: str) -> list[Packet]:
    """Decode a classic pcap file (either byte order); a truncated last record is ignored."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 24:
        return []
    magic = raw[:4]
    endian = "<" if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    linktype = struct.unpack_from(endian + "I", raw, 20)[0]
    # The second magic of each pair marks nanosecond time stamps.
    scale = 1e9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1e6
    packets, offset = [], 24
    while offset + 16 <= len(raw):
        sec, frac, incl = struct.unpack_from(endian + "III", raw, offset)
        frame = raw[offset + 16 : offset + 16 + incl]
        offset += 16 + incl
        if len(frame) < incl:
            break
        pkt = decode_frame(linktype, frame)
        if pkt is not None:
            packets.append(dataclasses.replace(pkt, ts=sec + frac / scale))
    return packets


class Capture:
    """tcpdump on every interface of one namespace, writing to ``path``."""

    def __init__(self, netns: str, path: str, snaplen: int = 200):
        self.netns = netns
        self.path = path
        self.snaplen = snaplen
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> "Capture":
        if os.path.exists(self.path):
            os.unlink(self.path)
        # --immediate-mode: libpcap otherwise holds packets in a ring block until it fills or
        # a timeout passes, and a capture stopped within that time loses them (seen here: 8
        # packets "received by filter", 0 written). -U: write each packet at once.
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                "tcpdump",
                "-i",
                "any",
                "--immediate-mode",
                "-n",
                "-U",
                "-s",
                str(self.snaplen),
                "-w",
                self.path,
                "ip or ip6",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        # tcpdump says "listening on ..." once the socket is bound and the filter installed.
        line = b""
        while b"listening on" not in line:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"tcpdump in {self.netns} exited: {self.proc.returncode}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tcpdump in {self.netns} did not start within {timeout}s")
        return self

    def stop(self) -> list[Packet]:
        if self.proc is None:
            return []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()
        self.proc = None
        try:
            return read_pcap(self.path)
        except FileNotFoundError:
            return []

    def __enter__(self) -> "Capture":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
