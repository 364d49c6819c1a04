"""Crafted packets through the loaded program with BPF_PROG_TEST_RUN (no bcc needed).

Packet builders produce Ethernet frames as the wire carries them — IPv4 or IPv6 (with optional
extension headers and fragments), TCP (flags, MSS option), UDP, SCTP, ICMP, ICMPv6 — with
correct checksums. ``run`` pushes one frame through the program with a ``struct __sk_buff``
context (mark, ifindex) and decodes the verdict the program recorded in ``skb->cb[]``: the
return code alone cannot tell which device a redirect targets. ``nodecryptor explain`` and the
packet-table tests share this path (the tests read frames back with tests/frames.py).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from nodecryptor.core.errors import DatapathError
from nodecryptor.core.ports import IP_PROTOCOLS
from nodecryptor.datapath.base import PacketQuery
from nodecryptor.datapath.bpf import abi, syscall

# Upper-layer protocols come from core.ports, the one table; IPv6 extension headers are only
# this module's business.
IPPROTO_ICMP = IP_PROTOCOLS["icmp"]
IPPROTO_TCP = IP_PROTOCOLS["tcp"]
IPPROTO_UDP = IP_PROTOCOLS["udp"]
IPPROTO_ICMPV6 = IP_PROTOCOLS["icmpv6"]
IPPROTO_SCTP = IP_PROTOCOLS["sctp"]
IPPROTO_HOPOPTS = 0
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_AH = 51
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60
PROTO_NUMBERS = IP_PROTOCOLS
EXT_HEADERS = {
    "hop": IPPROTO_HOPOPTS,
    "routing": IPPROTO_ROUTING,
    "dest": IPPROTO_DSTOPTS,
    "frag": IPPROTO_FRAGMENT,
    "ah": IPPROTO_AH,
}
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
TCP_FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10}
SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")

# struct __sk_buff: size and the offsets test-run lets user space set or read
# (include/uapi/linux/bpf.h; the kernel rejects non-zero bytes in other fields).
SKB_CTX_SIZE = 192
SKB_OFF_MARK = 8
SKB_OFF_IFINDEX = 40
SKB_OFF_CB = 48


# ---- checksums -----------------------------------------------------------------------------


def inet_checksum(data: bytes) -> int:
    """RFC 1071 ones' complement sum, folded and inverted."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(src, dst, proto: int, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, proto, length)
    return src.packed + dst.packed + struct.pack("!IxxxB", length, proto)


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli), the SCTP checksum."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# ---- L4 ------------------------------------------------------------------------------------


def tcp_segment(
    src,
    dst,
    sport: int,
    dport: int,
    flags: str = "S",
    mss: int | None = None,
    payload: bytes = b"",
    seq: int = 1000,
    ack: int = 0,
) -> bytes:
    """A TCP segment; with ``mss`` the options are MSS, SACK-permitted, timestamps, window
    scale — the order Linux sends on a SYN."""
    src, dst = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    bits = 0
    for letter in flags.upper():
        if letter not in TCP_FLAG_BITS:
            raise ValueError(f"unknown TCP flag {letter!r} in {flags!r} (use F S R P A)")
        bits |= TCP_FLAG_BITS[letter]
    options = b""
    if mss is not None:
        options = (
            struct.pack("!BBH", 2, 4, mss)
            + b"\x04\x02"
            + struct.pack("!BBII", 8, 10, 12345, 0)
            + b"\x01\x03\x03\x07"
        )
    doff = (20 + len(options)) // 4
    header = (
        struct.pack(
            "!HHIIBBHHH", sport, dport, seq, ack if bits & 0x10 else 0, doff << 4, bits, 64240, 0, 0
        )
        + options
    )
    segment = header + payload
    check = inet_checksum(_pseudo_header(src, dst, IPPROTO_TCP, len(segment)) + segment)
    return segment[:16] + struct.pack("!H", check) + segment[18:]


def udp_datagram(src, dst, sport: int, dport: int, payload: bytes = b"") -> bytes:
    src, dst = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    length = 8 + len(payload)
    datagram = struct.pack("!HHHH", sport, dport, length, 0) + payload
    check = inet_checksum(_pseudo_header(src, dst, IPPROTO_UDP, length) + datagram) or 0xFFFF
    return datagram[:6] + struct.pack("!H", check) + datagram[8:]


def sctp_packet(sport: int, dport: int, payload: bytes = b"") -> bytes:
    """SCTP common header plus one DATA chunk carrying ``payload``."""
    chunk_len = 16 + len(payload)
    chunk = struct.pack("!BBHIHHI", 0, 3, chunk_len, 1, 0, 0, 0) + payload
    chunk += b"\0" * (-len(chunk) % 4)
    packet = struct.pack("!HHII", sport, dport, 0x1234, 0) + chunk
    check = crc32c(packet)
    return packet[:8] + struct.pack("<I", check) + packet[12:]


def icmp_message(icmp_type: int, code: int = 0, payload: bytes = b"") -> bytes:
    msg = struct.pack("!BBHHH", icmp_type, code, 0, 0x77, 1) + payload
    return msg[:2] + struct.pack("!H", inet_checksum(msg)) + msg[4:]


def icmpv6_message(src, dst, icmp_type: int, code: int = 0, payload: bytes = b"") -> bytes:
    src, dst = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    msg = struct.pack("!BBHI", icmp_type, code, 0, 0) + payload
    check = inet_checksum(_pseudo_header(src, dst, IPPROTO_ICMPV6, len(msg)) + msg)
    return msg[:2] + struct.pack("!H", check) + msg[4:]


# ---- L3, L2 --------------------------------------------------------------------------------


def ipv4_packet(
    src,
    dst,
    proto: int,
    payload: bytes,
    ident: int = 0x4242,
    frag_offset: int = 0,
    more_fragments: bool = False,
    ttl: int = 64,
    total_length: int | None = None,
) -> bytes:
    if frag_offset % 8:
        raise ValueError(f"fragment offset {frag_offset} is not a multiple of 8")
    src, dst = ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst)
    frag = (frag_offset // 8) | (0x2000 if more_fragments else 0)
    length = total_length if total_length is not None else 20 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, length, ident, frag, ttl, proto, 0, src.packed, dst.packed
    )
    header = header[:10] + struct.pack("!H", inet_checksum(header)) + header[12:]
    return header + payload


def ipv6_ext_header(name: str, next_header: int, frag: dict | None = None) -> bytes:
    """One extension header of 8 bytes (hop/dest/routing/frag) or 24 bytes (AH)."""
    if name in ("hop", "dest"):
        return struct.pack("!BB", next_header, 0) + b"\x01\x04\0\0\0\0"  # PadN option
    if name == "routing":
        return struct.pack("!BBBB", next_header, 0, 0, 0) + b"\0" * 4  # type 0, segments 0
    if name == "ah":
        return struct.pack("!BBHII", next_header, 4, 0, 0x100, 1) + b"\0" * 12
    if name == "frag":
        frag = frag or {}
        offset = frag.get("offset", 0)
        if offset % 8:
            raise ValueError(f"fragment offset {offset} is not a multiple of 8")
        field = offset | (1 if frag.get("more") else 0)
        return struct.pack("!BBHI", next_header, 0, field, frag.get("id", 0x42))
    raise ValueError(f"unknown IPv6 extension header {name!r} (one of {sorted(EXT_HEADERS)})")


def ipv6_packet(
    src,
    dst,
    proto: int,
    payload: bytes,
    ext: tuple[str, ...] = (),
    frag: dict | None = None,
    hop_limit: int = 64,
) -> bytes:
    src, dst = ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst)
    headers = b""
    next_header = proto
    for name in reversed(ext):
        headers = ipv6_ext_header(name, next_header, frag) + headers
        next_header = EXT_HEADERS[name]
    body = headers + payload
    fixed = struct.pack(
        "!IHBB16s16s", 6 << 28, len(body), next_header, hop_limit, src.packed, dst.packed
    )
    return fixed + body


def ethernet(ethertype: int, payload: bytes, vlan: int | None = None) -> bytes:
    tag = struct.pack("!HH", ETH_P_8021Q, vlan & 0x0FFF) if vlan is not None else b""
    return DST_MAC + SRC_MAC + tag + struct.pack("!H", ethertype) + payload


# ---- whole frames --------------------------------------------------------------------------


def l4_payload(
    src,
    dst,
    proto: str,
    sport: int = 40000,
    dport: int = 80,
    tcp_flags: str = "S",
    tcp_mss: int | None = None,
    icmp_type: int = 8,
    payload: bytes = b"",
) -> tuple[int, bytes]:
    """(protocol number, L4 bytes with a valid checksum)."""
    if proto == "tcp":
        return IPPROTO_TCP, tcp_segment(src, dst, sport, dport, tcp_flags, tcp_mss, payload)
    if proto == "udp":
        return IPPROTO_UDP, udp_datagram(src, dst, sport, dport, payload)
    if proto == "sctp":
        return IPPROTO_SCTP, sctp_packet(sport, dport, payload)
    if proto == "icmp":
        return IPPROTO_ICMP, icmp_message(icmp_type, 0, payload)
    if proto == "icmpv6":
        return IPPROTO_ICMPV6, icmpv6_message(src, dst, icmp_type, 0, payload)
    raise ValueError(f"unknown protocol {proto!r} (one of {sorted(PROTO_NUMBERS)})")


def build_frame(
    src: str,
    dst: str,
    proto: str = "tcp",
    sport: int = 40000,
    dport: int = 80,
    tcp_flags: str = "S",
    tcp_mss: int | None = None,
    icmp_type: int = 8,
    payload_len: int = 16,
    ipv6_ext: tuple[str, ...] = (),
    frag: dict | None = None,
    truncate_l4: bool = False,
    vlan: int | None = None,
) -> bytes:
    """An Ethernet frame carrying one IP packet.

    ``frag`` (offset, more, id) makes it a fragment of a datagram whose L4 part is built
    whole and then cut: offset 0 carries the L4 header, later offsets carry payload bytes.
    ``truncate_l4`` keeps only the first 4 bytes of the L4 header (ports, no more).
    """
    src_ip, dst_ip = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if src_ip.version != dst_ip.version:
        raise ValueError(f"source {src} and destination {dst} are of different families")
    payload = bytes(i % 256 for i in range(payload_len))
    number, l4 = l4_payload(src, dst, proto, sport, dport, tcp_flags, tcp_mss, icmp_type, payload)
    if truncate_l4:
        l4 = l4[:4]
    if frag is not None:
        offset = frag.get("offset", 0)
        # A later fragment carries the datagram's bytes from ``offset``; pad the datagram
        # so the fragment is not empty.
        whole = l4 + b"\xab" * max(0, offset + 64 - len(l4))
        l4 = whole[offset : offset + 64] if offset else whole[: max(len(l4), 8)]
    if dst_ip.version == 4:
        if frag is not None:
            packet = ipv4_packet(
                src,
                dst,
                number,
                l4,
                ident=frag.get("id", 0x4242) & 0xFFFF,
                frag_offset=frag.get("offset", 0),
                more_fragments=bool(frag.get("more")),
            )
        else:
            packet = ipv4_packet(src, dst, number, l4)
        return ethernet(ETH_P_IP, packet, vlan)
    ext = tuple(ipv6_ext)
    if frag is not None and "frag" not in ext:
        ext = ext + ("frag",)
    return ethernet(ETH_P_IPV6, ipv6_packet(src, dst, number, l4, ext, frag), vlan)


def packet_for_query(q: PacketQuery, src: str) -> bytes:
    """The frame ``nodecryptor explain`` sends for a query (``src`` already resolved)."""
    return build_frame(
        src,
        q.dst,
        proto=q.proto,
        sport=q.sport,
        dport=q.dport,
        tcp_flags=q.tcp_flags,
        icmp_type=q.icmp_type,
    )


# ---- running -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    retval: int
    reason: abi.Reason
    verdict: str
    target: int
    """Redirect ifindex recorded by the program (0 when not redirected)."""
    data_out: bytes

    @property
    def reason_name(self) -> str:
        return abi.REASON_NAMES[self.reason]


SKB_CB_WORDS = 5  # cb[0..4], the part of skb->cb[] a tc program sees


def skb_context(mark: int = 0, ifindex: int = 0, cb: tuple[int, ...] = ()) -> bytes:
    """``cb``: initial skb->cb[] words, as an earlier program on the hook may have left them."""
    if len(cb) > SKB_CB_WORDS:
        raise ValueError(f"cb has {SKB_CB_WORDS} words, got {len(cb)}")
    ctx = bytearray(SKB_CTX_SIZE)
    struct.pack_into("<I", ctx, SKB_OFF_MARK, mark & 0xFFFFFFFF)
    struct.pack_into("<I", ctx, SKB_OFF_IFINDEX, ifindex)
    for i, word in enumerate(cb):
        struct.pack_into("<I", ctx, SKB_OFF_CB + 4 * i, word & 0xFFFFFFFF)
    return bytes(ctx)


def run(
    prog_fd: syscall.Fd, packet: bytes, mark: int = 0, ifindex: int = 0, cb: tuple[int, ...] = ()
) -> Result:
    """Run ``packet`` through the program once. ``ifindex`` must name an existing device of
    the caller's network namespace (0: loopback). ``cb`` pre-fills skb->cb[] (the program
    must not care). The attached entry point (nc_egress) updates counters and the fragment LRU
    like for a real packet; the explain entry point (nc_explain) changes no state.
    Raises DatapathError when the program recorded no verdict."""
    try:
        retval, data_out, ctx_out, _ = syscall.prog_test_run(
            prog_fd, packet, ctx_in=skb_context(mark, ifindex, cb), ctx_out_size=SKB_CTX_SIZE
        )
    except OSError as e:
        raise DatapathError(f"BPF_PROG_TEST_RUN failed: {e.strerror}") from e
    cb0, cb1 = struct.unpack_from("<II", ctx_out, SKB_OFF_CB + 4 * abi.CB_REASON)
    if cb0 & 0xFFFF0000 != abi.CB_MAGIC or (cb0 & 0xFFFF) not in abi.REASON_VALUES:
        raise DatapathError(f"program recorded no verdict (cb[0]={cb0:#x}, retval {retval})")
    reason = abi.Reason(cb0 & 0xFFFF)
    return Result(
        retval=retval,
        reason=reason,
        verdict=abi.REASON_VERDICTS[reason],
        target=cb1,
        data_out=data_out,
    )


def time_per_packet(prog_fd: syscall.Fd, packet: bytes, repeat: int = 100_000) -> float:
    """Average ns per run as the kernel measures it (BPF_PROG_TEST_RUN ``repeat``)."""
    _, _, _, duration = syscall.prog_test_run(prog_fd, packet, repeat=repeat)
    return float(duration)
