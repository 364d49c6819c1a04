"""Insert tens of thousands of ip rules in seconds, for the seed layout.

``ip rule add`` asks the kernel to reject duplicates (NLM_F_EXCL), which walks the whole rule
list, and inserting after rules of equal or lower priority walks it again: building the seed's
100,000 rules for 50,000 nodes that way is quadratic and takes many minutes. Here the same
rules are sent as raw RTM_NEWRULE messages without NLM_F_EXCL, in descending priority order,
so each insertion stops after a few list entries. The resulting list, and so the per-packet
walk it causes, is what the seed builds: one rule per prefix, in the seed's order (pod CIDRs,
then node addresses), all before ``main``. Only the priority numbers differ: spread over
1..32000 instead of all 200 or 220, which does not change how a lookup walks the list.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

NETLINK_ROUTE = 0
RTM_NEWRULE = 32
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
FR_ACT_TO_TBL = 1
FRA_DST, FRA_PRIORITY, FRA_TABLE = 1, 6, 15
MAX_PRIORITY = 32000  # below main's 32766: every rule is walked before main is consulted
CHUNK = 500


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _message(seq: int, prefix, priority: int, table: int) -> bytes:
    family = socket.AF_INET if prefix.version == 4 else socket.AF_INET6
    body = struct.pack(
        "=BBBBBBBBI",
        family,
        prefix.prefixlen,
        0,
        0,
        table if table < 256 else 252,
        0,
        0,
        FR_ACT_TO_TBL,
        0,
    )
    body += _attr(FRA_DST, prefix.network_address.packed)
    body += _attr(FRA_PRIORITY, struct.pack("=I", priority))
    body += _attr(FRA_TABLE, struct.pack("=I", table))
    return (
        struct.pack(
            "=IHHII", 16 + len(body), RTM_NEWRULE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE, seq, 0
        )
        + body
    )


def priorities(count: int) -> list[int]:
    """Non-decreasing priorities for ``count`` rules in walk order, within 1..MAX_PRIORITY."""
    per = max(1, -(-count // MAX_PRIORITY))
    return [1 + j // per for j in range(count)]


def add_rules(prefixes: list[str], table: int) -> None:
    """Add one ``to PREFIX lookup TABLE`` rule per prefix, walked in the given order. Runs in
    the calling thread's network namespace."""
    nets = [ipaddress.ip_network(p) for p in prefixes]
    prios = priorities(len(nets))
    order = list(range(len(nets)))[::-1]  # highest priority number first: O(1) inserts
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((0, 0))
        for start in range(0, len(order), CHUNK):
            batch = order[start : start + CHUNK]
            sock.sendall(b"".join(_message(i + 1, nets[i], prios[i], table) for i in batch))
            acked = 0
            while acked < len(batch):
                data = sock.recv(1 << 20)
                offset = 0
                while offset < len(data):
                    length, kind = struct.unpack_from("=IH", data, offset)
                    if kind == NLMSG_ERROR:
                        (err,) = struct.unpack_from("=i", data, offset + 16)
                        if err:
                            raise OSError(-err, f"RTM_NEWRULE: {os.strerror(-err)}")
                        acked += 1
                    offset += (length + 3) & ~3
    finally:
        sock.close()
