"""Netlink operations of the ip-rule datapath, one small function each.

Routes of nodecryptor's table are handled in bulk by ``bulk``; rules, links and route queries
live here. Every function takes an open pyroute2 ``IPRoute`` (which carries the network
namespace), treats
"exists" on add and "missing" on delete as success, raises ``DatapathError`` naming the object
for anything else, and returns plain data (``spec.RuleSpec``/``RouteSpec``, dicts). Nothing
here decides what should be installed; ``spec`` does.
"""

from __future__ import annotations

import errno
import socket

from pyroute2 import IPRoute
from pyroute2.netlink import NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_GETROUTE
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from nodecryptor.core.errors import DatapathError
from nodecryptor.datapath.iprule.spec import RuleSpec

AF = {4: socket.AF_INET, 6: socket.AF_INET6}
FAMILY_OF_AF = {socket.AF_INET: 4, socket.AF_INET6: 6}
FR_ACT_TO_TBL = 1
RTN_TYPE_NAMES = {
    1: "unicast",
    2: "local",
    3: "broadcast",
    6: "blackhole",
    7: "unreachable",
    8: "prohibit",
}
# rtm_flags of a route query: report the table the fib lookup used (otherwise the kernel
# echoes the requested table, main), as iproute2's "ip route get" does.
RTM_F_LOOKUP_TABLE = 0x1000
EXISTS = (errno.EEXIST,)
MISSING = (errno.ENOENT, errno.ESRCH)


class _RouteQuery(rtmsg):
    """rtmsg with the attributes of a flow-aware route query (kernel >= 4.17), which pyroute2
    0.9's rtmsg does not list: RTA_UID (25), RTA_IP_PROTO (27), RTA_SPORT (28), RTA_DPORT (29).
    Without them a query could not tell the exemption rules apart."""

    nla_map = rtmsg.nla_map + (
        ("RTA_PAD", "hex"),
        ("RTA_UID", "uint32"),
        ("RTA_TTL_PROPAGATE", "uint8"),
        ("RTA_IP_PROTO", "uint8"),
        ("RTA_SPORT", "be16"),
        ("RTA_DPORT", "be16"),
    )
    # pyroute2 caches the compiled attribute table in class attributes that a subclass
    # inherits: once plain rtmsg is compiled, this class would silently reuse the parent's
    # table and drop the attributes above. Start uncompiled so this class compiles its own.
    _nlmsg_base__compiled_nla = False
    _nlmsg_base__t_nla_map = None
    _nlmsg_base__r_nla_map = None


def open_route(netns: str | None = None) -> IPRoute:
    """An rtnetlink handle in ``netns`` (None: the caller's namespace). Never creates one."""
    if netns is None:
        return IPRoute()
    return IPRoute(netns=netns, flags=0)


def _split(prefix: str) -> tuple[str, int]:
    addr, _, length = prefix.partition("/")
    return addr, int(length)


def _range_text(rng: tuple[int, int]) -> str:
    return f"{rng[0]}:{rng[1]}"


def _parse_range(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    first, _, last = text.partition(":")
    return int(first), int(last)


def rule_from_msg(msg) -> RuleSpec | None:
    """A fib rule message as a RuleSpec; None for rules nodecryptor never writes (other
    actions, families), which are reported separately by ``read_band_rules``."""
    family = FAMILY_OF_AF.get(msg["family"])
    if family is None:
        return None
    table = msg.get_attr("FRA_TABLE") or msg["table"]
    dst = msg.get_attr("FRA_DST")
    src = msg.get_attr("FRA_SRC")
    fwmark = msg.get_attr("FRA_FWMARK")
    fwmask = msg.get_attr("FRA_FWMASK")
    ip_proto = msg.get_attr("FRA_IP_PROTO") or None
    suppress = msg.get_attr("FRA_SUPPRESS_PREFIXLEN")
    return RuleSpec(
        family=family,
        priority=msg.get_attr("FRA_PRIORITY") or 0,
        table=table if msg["action"] == FR_ACT_TO_TBL else -msg["action"],
        fwmark=fwmark if fwmark else None,
        fwmask=fwmask if fwmark else None,
        dst=f"{dst}/{msg['dst_len']}" if dst else None,
        src=f"{src}/{msg['src_len']}" if src else None,
        ip_proto=ip_proto,
        sport=_parse_range(msg.get_attr("FRA_SPORT_RANGE")),
        dport=_parse_range(msg.get_attr("FRA_DPORT_RANGE")),
        # The kernel reports 0xffffffff (-1) for "not set".
        suppress_prefixlen=(suppress if suppress is not None and suppress != 0xFFFFFFFF else None),
    )


def read_rules(ipr: IPRoute, priorities: range) -> list[RuleSpec]:
    """Every IPv4/IPv6 rule whose priority lies in ``priorities``; nothing outside the band."""
    out = []
    try:
        messages = list(ipr.rule("dump"))
    except NetlinkError as e:
        raise DatapathError(f"cannot list ip rules: {e}") from e
    for msg in messages:
        prio = msg.get_attr("FRA_PRIORITY") or 0
        if prio not in priorities:
            continue
        rule = rule_from_msg(msg)
        if rule is not None:
            out.append(rule)
    return sorted(out)


def _rule_args(rule: RuleSpec) -> dict:
    kw: dict = {"family": AF[rule.family], "priority": rule.priority}
    if rule.table >= 0:
        kw["table"] = rule.table
    else:
        kw["action"] = -rule.table
    if rule.fwmark is not None:
        kw["fwmark"] = rule.fwmark
        kw["fwmask"] = rule.fwmask if rule.fwmask is not None else 0xFFFFFFFF
    if rule.dst:
        kw["dst"], kw["dst_len"] = _split(rule.dst)
    if rule.src:
        kw["src"], kw["src_len"] = _split(rule.src)
    if rule.ip_proto is not None:
        kw["ip_proto"] = rule.ip_proto
    if rule.sport is not None:
        kw["sport_range"] = _range_text(rule.sport)
    if rule.dport is not None:
        kw["dport_range"] = _range_text(rule.dport)
    if rule.suppress_prefixlen is not None:
        kw["suppress_prefixlen"] = rule.suppress_prefixlen
    return kw


def add_rule(ipr: IPRoute, rule: RuleSpec) -> bool:
    """Install ``rule``; True when it was added, False when it already existed."""
    try:
        ipr.rule("add", **_rule_args(rule))
    except NetlinkError as e:
        if e.code in EXISTS:
            return False
        raise DatapathError(f"cannot add ip rule '{rule.describe()}': {e}") from e
    return True


def delete_rule(ipr: IPRoute, rule: RuleSpec) -> bool:
    """Remove exactly ``rule``; True when it was removed, False when it was already gone."""
    try:
        ipr.rule("del", **_rule_args(rule))
    except NetlinkError as e:
        if e.code in MISSING:
            return False
        raise DatapathError(f"cannot delete ip rule '{rule.describe()}': {e}") from e
    return True


def link_index(ipr: IPRoute, name: str) -> int:
    """Interface index of ``name``; 0 when there is no such interface."""
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else 0


def link_names(ipr: IPRoute) -> dict[int, str]:
    return {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in ipr.get_links()}


def local_addresses(ipr: IPRoute) -> set[str]:
    return {msg.get_attr("IFA_ADDRESS") for msg in ipr.get_addr()}


def query_route(
    ipr: IPRoute,
    family: int,
    dst: str,
    *,
    src: str | None = None,
    iif: int = 0,
    ip_proto: int = 0,
    sport: int = 0,
    dport: int = 0,
    mark: int = 0,
) -> dict:
    """Ask the kernel's own fib lookup (rules included) where a flow would go.

    ``iif`` 0 asks for an output route (a locally generated packet; ``src`` must then be a
    local address or None); otherwise the route of a packet received on ``iif`` (forwarded).
    Returns {"ok", "table", "oif", "type", "prefsrc"} or {"ok": False, "errno", "error"}.
    """
    msg = _RouteQuery()
    msg["family"] = AF[family]
    msg["dst_len"] = 32 if family == 4 else 128
    msg["flags"] = RTM_F_LOOKUP_TABLE
    attrs: list = [("RTA_DST", dst)]
    if src:
        attrs.append(("RTA_SRC", src))
        msg["src_len"] = msg["dst_len"]
    if iif:
        attrs.append(("RTA_IIF", iif))
    if mark:
        attrs.append(("RTA_MARK", mark))
    if ip_proto:
        attrs.append(("RTA_IP_PROTO", ip_proto))
        if sport:
            attrs.append(("RTA_SPORT", sport))
        if dport:
            attrs.append(("RTA_DPORT", dport))
    msg["attrs"] = attrs

    # pyroute2 0.9's synchronous nlm_request cannot be used with a custom message class;
    # the asynchronous core can, on the handle's own event loop.
    async def collect():
        return [
            reply
            async for reply in await ipr.asyncore.nlm_request(msg, RTM_GETROUTE, NLM_F_REQUEST)
        ]

    try:
        replies = ipr.asyncore.event_loop.run_until_complete(collect())
    except NetlinkError as e:
        return {"ok": False, "errno": e.code, "error": errno.errorcode.get(e.code, str(e.code))}
    reply = replies[0]
    return {
        "ok": True,
        "table": reply.get_attr("RTA_TABLE") or reply["table"],
        "oif": reply.get_attr("RTA_OIF") or 0,
        "type": RTN_TYPE_NAMES.get(reply["type"], str(reply["type"])),
        "prefsrc": reply.get_attr("RTA_PREFSRC"),
    }
