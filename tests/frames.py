"""Reading frames back in tests: the program's output of a BPF_PROG_TEST_RUN parsed down to its
L4 bytes, and the TCP MSS option it carries (the agent never parses frames; only tests grade
what the program wrote)."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from nodecryptor.datapath.bpf import testrun


_EXTENSION_HEADERS = (
    testrun.IPPROTO_HOPOPTS,
    testrun.IPPROTO_ROUTING,
    testrun.IPPROTO_DSTOPTS,
    testrun.IPPROTO_FRAGMENT,
    testrun.IPPROTO_AH,
)


@dataclass(frozen=True)
class ParsedFrame:
    family: int
    src: str
    dst: str
    proto: int
    l4: bytes
    ipv4_header_ok: bool


def parse_frame(frame: bytes) -> ParsedFrame:
    """Ethernet (optional 802.1Q tag) → IP (IPv6 extension headers skipped) → L4 bytes."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    off = 14
    if ethertype == testrun.ETH_P_8021Q:
        ethertype = struct.unpack_from("!H", frame, 16)[0]
        off = 18
    if ethertype == testrun.ETH_P_IP:
        ihl = (frame[off] & 0x0F) * 4
        header = frame[off : off + ihl]
        src = ipaddress.IPv4Address(header[12:16])
        dst = ipaddress.IPv4Address(header[16:20])
        total = struct.unpack_from("!H", header, 2)[0]
        return ParsedFrame(
            4,
            str(src),
            str(dst),
            header[9],
            frame[off + ihl : off + total],
            testrun.inet_checksum(header) == 0,
        )
    if ethertype == testrun.ETH_P_IPV6:
        nh = frame[off + 6]
        src = ipaddress.IPv6Address(frame[off + 8 : off + 24])
        dst = ipaddress.IPv6Address(frame[off + 24 : off + 40])
        end = off + 40 + struct.unpack_from("!H", frame, off + 4)[0]
        pos = off + 40
        while nh in _EXTENSION_HEADERS:
            nxt, hlen = frame[pos], frame[pos + 1]
            if nh == testrun.IPPROTO_FRAGMENT:
                pos += 8
            elif nh == testrun.IPPROTO_AH:
                pos += (hlen + 2) * 4
            else:
                pos += (hlen + 1) * 8
            nh = nxt
        return ParsedFrame(6, str(src), str(dst), nh, frame[pos:end], True)
    raise ValueError(f"not an IP frame (EtherType {ethertype:#06x})")


def tcp_mss(frame: bytes) -> int | None:
    """The MSS option of a frame's TCP header, None when absent."""
    p = parse_frame(frame)
    if p.proto != testrun.IPPROTO_TCP:
        return None
    doff = (p.l4[12] >> 4) * 4
    options = p.l4[20:doff]
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        length = options[i + 1] if i + 1 < len(options) else 0
        if kind == 2 and length == 4:
            return struct.unpack_from("!H", options, i + 2)[0]
        if length < 2:
            break
        i += length
    return None
