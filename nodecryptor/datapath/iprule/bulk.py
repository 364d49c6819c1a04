"""Bulk route operations on nodecryptor's table: many requests per send, one table per dump.

pyroute2's request machinery costs about 1.6 ms per route and 0.3 ms per dumped route on the
2-core test VM, so 10,000 destinations took ~18 s to apply and ~3.5 s to read back. The table
holds only nodecryptor's own routes of one simple shape (dst, type, oif, prefsrc), so this
module packs those messages itself, sends them in batches of ``BATCH`` with NLM_F_ACK and
collects the acknowledgements by sequence number, and dumps with NETLINK_GET_STRICT_CHK so the
kernel returns only nodecryptor's table. The socket is made in the target namespace by
pyroute2. Rules, queries and everything else stay on pyroute2 (see ``kernel``).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

from pyroute2.netns import create_socket

from nodecryptor.core.errors import DatapathError
from nodecryptor.datapath.iprule.spec import ROUTE_UNICAST, ROUTE_UNREACHABLE, RouteSpec

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK = 0x1, 0x4
NLM_F_REPLACE, NLM_F_CREATE, NLM_F_DUMP = 0x100, 0x400, 0x300
RTA_DST, RTA_OIF, RTA_PRIORITY, RTA_PREFSRC, RTA_TABLE = 1, 4, 6, 7, 15
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE = 0, 255
RTN_UNICAST, RTN_UNREACHABLE = 1, 7
TYPE_OF_KIND = {ROUTE_UNICAST: RTN_UNICAST, ROUTE_UNREACHABLE: RTN_UNREACHABLE}
KIND_OF_TYPE = {
    RTN_UNICAST: ROUTE_UNICAST,
    RTN_UNREACHABLE: ROUTE_UNREACHABLE,
    6: "blackhole",
    8: "prohibit",
}
AF = {4: socket.AF_INET, 6: socket.AF_INET6}
FAMILY_OF_AF = {socket.AF_INET: 4, socket.AF_INET6: 6}
BATCH = 512

_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")


def _attr(kind: int, payload: bytes) -> bytes:
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


def _message(msg_type: int, flags: int, seq: int, body: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), msg_type, flags, seq, 0) + body


def _route_body(route: RouteSpec, table: int, delete: bool) -> bytes:
    net = ipaddress.ip_network(route.dst)
    rtm_type = 0 if delete else TYPE_OF_KIND[route.kind]
    scope = RT_SCOPE_NOWHERE if delete else RT_SCOPE_UNIVERSE
    protocol = 0 if delete else RTPROT_STATIC
    # rtm_table is 8 bits; RTA_TABLE carries the real id (0 = RT_TABLE_UNSPEC here).
    body = _RTMSG.pack(
        AF[route.family],
        net.prefixlen,
        0,
        0,
        table if table < 256 else 0,
        protocol,
        scope,
        rtm_type,
        0,
    )
    body += _attr(RTA_TABLE, struct.pack("=I", table))
    body += _attr(RTA_DST, net.network_address.packed)
    body += _attr(RTA_PRIORITY, struct.pack("=I", route.metric))
    if not delete and route.kind == ROUTE_UNICAST:
        body += _attr(RTA_OIF, struct.pack("=I", route.oif))
        if route.prefsrc:
            body += _attr(RTA_PREFSRC, ipaddress.ip_address(route.prefsrc).packed)
    return body


class RouteTable:
    """A raw rtnetlink socket for one table of one namespace. Use as a context manager."""

    def __init__(self, table: int, netns: str | None = None):
        self.table = table
        self._seq = 0
        try:
            self._sock = create_socket(
                netns,
                family=socket.AF_NETLINK,
                socket_type=socket.SOCK_RAW,
                proto=NETLINK_ROUTE,
                flags=0,
            )
            self._sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self._sock.bind((0, 0))
        except OSError as e:
            raise DatapathError(f"cannot open a netlink socket for table {table}: {e}") from e

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "RouteTable":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _messages(self):
        """Yield (type, seq, payload) of every netlink message in one receive."""
        data = self._sock.recv(1 << 20)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, msg_type, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                break
            yield msg_type, seq, data[offset + _NLMSGHDR.size : offset + length]
            offset += (length + 3) & ~3

    def _batch(
        self, requests: list[tuple[bytes, RouteSpec]], tolerated: tuple[int, ...], what: str
    ) -> int:
        """Send requests, wait for every ack; return how many succeeded (tolerated errors are
        not counted); raise DatapathError naming the first route that failed otherwise."""
        done = 0
        for start in range(0, len(requests), BATCH):
            chunk = requests[start : start + BATCH]
            pending: dict[int, RouteSpec] = {}
            data = bytearray()
            for message, route in chunk:
                seq = self._next_seq()
                pending[seq] = route
                data += message[:8] + struct.pack("=I", seq) + message[12:]
            self._sock.sendall(bytes(data))
            failure = None
            while pending:
                for msg_type, seq, payload in self._messages():
                    if msg_type != NLMSG_ERROR or seq not in pending:
                        continue
                    route = pending.pop(seq)
                    code = -struct.unpack_from("=i", payload)[0]
                    if code == 0:
                        done += 1
                    elif code not in tolerated and failure is None:
                        failure = (route, code)
            if failure is not None:
                route, code = failure
                raise DatapathError(
                    f"cannot {what} route {route.kind} {route.dst} in table "
                    f"{self.table}: {os.strerror(code)} "
                    f"({errno.errorcode.get(code, code)})"
                )
        return done

    def set_routes(self, routes: list[RouteSpec]) -> int:
        """Create or replace each route (NLM_F_REPLACE: atomic per prefix)."""
        flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        requests = [
            (_message(RTM_NEWROUTE, flags, 0, _route_body(r, self.table, False)), r) for r in routes
        ]
        return self._batch(requests, (), "set")

    def delete_routes(self, routes: list[RouteSpec]) -> int:
        """Delete each (prefix, metric) from the table; a missing one is success."""
        flags = NLM_F_REQUEST | NLM_F_ACK
        requests = [
            (_message(RTM_DELROUTE, flags, 0, _route_body(r, self.table, True)), r) for r in routes
        ]
        return self._batch(requests, (errno.ENOENT, errno.ESRCH), "delete")

    def read(self) -> list[RouteSpec]:
        """Every route of the table, both families (the kernel filters by table)."""
        out = []
        for family in (4, 6):
            body = _RTMSG.pack(AF[family], 0, 0, 0, 0, 0, 0, 0, 0)
            body += _attr(RTA_TABLE, struct.pack("=I", self.table))
            seq = self._next_seq()
            self._sock.sendall(_message(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, seq, body))
            finished = False
            while not finished:
                for msg_type, msg_seq, payload in self._messages():
                    if msg_seq != seq:
                        continue
                    if msg_type == NLMSG_DONE:
                        finished = True
                    elif msg_type == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", payload)[0]
                        if code:
                            raise DatapathError(
                                f"cannot list table {self.table}: {os.strerror(code)}"
                            )
                        finished = True
                    elif msg_type == RTM_NEWROUTE:
                        route = self._parse(payload)
                        if route is not None:
                            out.append(route)
        return sorted(out)

    def _parse(self, payload: bytes) -> RouteSpec | None:
        family, dst_len, _s, _t, rtm_table, _p, _sc, rtm_type, _f = _RTMSG.unpack_from(payload)
        attrs: dict[int, bytes] = {}
        offset = _RTMSG.size
        while offset + _RTATTR.size <= len(payload):
            length, kind = _RTATTR.unpack_from(payload, offset)
            if length < _RTATTR.size:
                break
            attrs[kind] = payload[offset + _RTATTR.size : offset + length]
            offset += (length + 3) & ~3
        table = struct.unpack("=I", attrs[RTA_TABLE])[0] if RTA_TABLE in attrs else rtm_table
        version = FAMILY_OF_AF.get(family)
        if table != self.table or version is None:
            return None
        raw = attrs.get(RTA_DST, b"\0" * (4 if version == 4 else 16))
        dst = f"{ipaddress.ip_address(raw)}/{dst_len}"
        kind = KIND_OF_TYPE.get(rtm_type, str(rtm_type))
        metric = struct.unpack("=I", attrs[RTA_PRIORITY])[0] if RTA_PRIORITY in attrs else 0
        if kind != ROUTE_UNICAST:
            return RouteSpec(version, dst, kind, metric=metric)
        oif = struct.unpack("=I", attrs[RTA_OIF])[0] if RTA_OIF in attrs else 0
        prefsrc = str(ipaddress.ip_address(attrs[RTA_PREFSRC])) if RTA_PREFSRC in attrs else None
        return RouteSpec(version, dst, ROUTE_UNICAST, oif=oif, prefsrc=prefsrc, metric=metric)
