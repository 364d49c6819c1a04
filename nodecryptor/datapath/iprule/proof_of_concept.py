"""The node state of the original Go proof of concept: found, and removed exactly.

The proof of concept (the Go agent that preceded nodecryptor) enforced with ip rules in the
low priorities and a routing table of its own. On a node it leaves:

=========  ===========================================================  ==========
priority   selector                                                     lookup
=========  ===========================================================  ==========
0          fwmark 0xe00 (exact, no mask)                                main
200        to <remote pod CIDR>                                         100
201        iif lo sport <exempt port or range> (control-plane nodes)    main
210        to <control-plane address> dport <exempt port or range>      main
220        to <remote node address>                                     100
=========  ===========================================================  ==========

table 100 holds one route, ``default dev cilium_wg0``; with its ``-noop-route`` flag it also
created a dummy device ``noop`` carrying one route in main.

A rule is the proof of concept's only when its priority, its complete set of selectors and its
table all match a row above; anything else at those priorities (another agent's rule, a rule
with an extra selector such as ``ipproto``) is reported as foreign and never touched. The same
holds for routes in table 100 and for the ``noop`` device (a dummy with at most one route).

Removal order keeps the node encrypting throughout when nodecryptor already enforces: first the
rules that send traffic to table 100, then the exemptions to main, then the table-100 route,
then the fwmark rule (while any rule still sends to table 100, WireGuard's own packets need it
to reach main instead of looping into the device), and the dummy device last.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nodecryptor.core.errors import DatapathError
from nodecryptor.datapath.iprule import kernel

POC_TABLE = 100
POC_WG_DEVICE = "cilium_wg0"
POC_NOOP_DEVICE = "noop"
POC_FWMARK = 0xE00
MAIN_TABLE = 254
FR_ACT_TO_TBL = 1
FIB_RULE_INVERT = 0x2
FULL_MASK = 0xFFFFFFFF
RTPROT_KERNEL = 2

# Attributes the kernel reports for every rule; they select nothing.
_NEUTRAL = {"FRA_PRIORITY", "FRA_TABLE", "FRA_PROTOCOL"}
# Attributes the kernel reports with their "unset" value on every rule.
_UNSET = {"FRA_SUPPRESS_PREFIXLEN": FULL_MASK, "FRA_SUPPRESS_IFGROUP": FULL_MASK}
# Newer kernels (6.16+) report a port mask next to every port range; pyroute2 0.9 does not
# know these attribute types (28, 29) and lists them as UNKNOWN.
_PORT_MASK_TYPES = {28: "FRA_SPORT_RANGE", 29: "FRA_DPORT_RANGE"}

# priority -> (selectors the rule must have, and no others; table it looks up)
SHAPES = {
    0: ({"FRA_FWMARK", "FRA_FWMASK"}, MAIN_TABLE),
    200: ({"FRA_DST"}, POC_TABLE),
    201: ({"FRA_IIFNAME", "FRA_SPORT_RANGE"}, MAIN_TABLE),
    210: ({"FRA_DST", "FRA_DPORT_RANGE"}, MAIN_TABLE),
    220: ({"FRA_DST"}, POC_TABLE),
}
# Removal order by priority (see the module docstring).
REMOVAL_ORDER = (200, 220, 201, 210, 0)
FAMILIES = {socket.AF_INET: 4, socket.AF_INET6: 6}


@dataclass(frozen=True)
class PocRule:
    family: int
    priority: int
    table: int
    dst: str | None = None
    fwmark: int | None = None
    iif: str | None = None
    sport: str | None = None
    dport: str | None = None

    def describe(self) -> str:
        parts = [f"{self.priority}:", "from all"]
        if self.dst:
            parts.append(f"to {self.dst}")
        if self.fwmark is not None:
            parts.append(f"fwmark {self.fwmark:#x}")
        if self.iif:
            parts.append(f"iif {self.iif}")
        if self.sport:
            parts.append(f"sport {self.sport.replace(':', '-')}")
        if self.dport:
            parts.append(f"dport {self.dport.replace(':', '-')}")
        parts.append("lookup " + ("main" if self.table == MAIN_TABLE else str(self.table)))
        return " ".join(parts) + ("" if self.family == 4 else " (IPv6)")

    def request(self) -> dict:
        """The arguments of a netlink request naming every selector of this rule."""
        kw: dict = {
            "family": kernel.AF[self.family],
            "priority": self.priority,
            "table": self.table,
            "action": FR_ACT_TO_TBL,
        }
        if self.dst:
            addr, _, length = self.dst.partition("/")
            kw["dst"], kw["dst_len"] = addr, int(length)
        if self.fwmark is not None:
            kw["fwmark"], kw["fwmask"] = self.fwmark, FULL_MASK
        if self.iif:
            kw["iifname"] = self.iif
        if self.sport:
            kw["sport_range"] = self.sport
        if self.dport:
            kw["dport_range"] = self.dport
        return kw


def _selectors(msg) -> set[str] | None:
    """The names of the selecting attributes of a rule message, or None when the rule has
    something this module does not recognise (an unknown attribute, an inverted match)."""
    names = set()
    for name, value in msg["attrs"]:
        if name in _NEUTRAL or _UNSET.get(name) == value:
            continue
        if name == "UNKNOWN":
            if _PORT_MASK_TYPES.get(value.get("header", {}).get("type")) in {
                n for n, _ in msg["attrs"]
            }:
                continue
            return None
        names.add(name)
    if msg["flags"] & FIB_RULE_INVERT or msg["tos"] or msg["src_len"]:
        return None
    return names


def _as_poc_rule(msg) -> PocRule | None:
    family = FAMILIES.get(msg["family"])
    priority = msg.get_attr("FRA_PRIORITY") or 0
    shape = SHAPES.get(priority)
    if family is None or shape is None or msg["action"] != FR_ACT_TO_TBL:
        return None
    wanted, table = shape
    if (msg.get_attr("FRA_TABLE") or msg["table"]) != table or _selectors(msg) != wanted:
        return None
    dst = msg.get_attr("FRA_DST")
    rule = PocRule(
        family=family,
        priority=priority,
        table=table,
        dst=f"{dst}/{msg['dst_len']}" if dst else None,
        fwmark=msg.get_attr("FRA_FWMARK"),
        iif=msg.get_attr("FRA_IIFNAME"),
        sport=msg.get_attr("FRA_SPORT_RANGE"),
        dport=msg.get_attr("FRA_DPORT_RANGE"),
    )
    if priority == 0 and (rule.fwmark != POC_FWMARK or msg.get_attr("FRA_FWMASK") != FULL_MASK):
        return None
    if priority == 201 and rule.iif != "lo":
        return None
    if priority in (210, 220):
        # Node addresses: host prefixes only.
        if ipaddress.ip_network(rule.dst).prefixlen != (32 if family == 4 else 128):
            return None
    return rule


def _ambiguous(rule: PocRule, earlier: list) -> bool:
    """True when a foreign rule listed before ``rule`` at its priority also matches the delete
    request for ``rule``. The kernel compares only the fields a request sets and removes the
    first rule that matches, which would be that one; ``rule`` is then left for the operator."""
    req = rule.request()
    for msg in earlier:
        if (msg.get_attr("FRA_PRIORITY") or 0) != rule.priority or FAMILIES.get(
            msg["family"]
        ) != rule.family:
            continue
        seen = {
            "table": msg.get_attr("FRA_TABLE") or msg["table"],
            "dst": msg.get_attr("FRA_DST"),
            "dst_len": msg["dst_len"],
            "iifname": msg.get_attr("FRA_IIFNAME"),
            "sport_range": msg.get_attr("FRA_SPORT_RANGE"),
            "dport_range": msg.get_attr("FRA_DPORT_RANGE"),
            "fwmark": msg.get_attr("FRA_FWMARK"),
            "fwmask": msg.get_attr("FRA_FWMASK"),
        }
        if all(seen[k] == v for k, v in req.items() if k in seen):
            return True
    return False


def _wg_default_routes(ipr: IPRoute) -> list[dict]:
    index = kernel.link_index(ipr, POC_WG_DEVICE)
    found = []
    for af, family in FAMILIES.items():
        try:
            routes = list(ipr.route("dump", family=af, table=POC_TABLE))
        except NetlinkError as e:
            raise DatapathError(f"cannot list table {POC_TABLE}: {e}") from e
        for msg in routes:
            if (
                (msg.get_attr("RTA_TABLE") or msg["table"]) != POC_TABLE
                or msg["dst_len"]
                or msg["type"] != 1
                or msg.get_attr("RTA_GATEWAY")
                or not index
                or msg.get_attr("RTA_OIF") != index
            ):
                continue
            found.append(
                {
                    "family": family,
                    "oif": index,
                    "priority": msg.get_attr("RTA_PRIORITY"),
                    "scope": msg["scope"],
                    "proto": msg["proto"],
                    "describe": f"default dev {POC_WG_DEVICE} table {POC_TABLE}"
                    + ("" if family == 4 else " (IPv6)"),
                }
            )
    return found


def _noop_device(ipr: IPRoute) -> dict | None:
    """The proof of concept's dummy device with its route, or None when there is none (or a
    device of that name that is not such a dummy)."""
    index = kernel.link_index(ipr, POC_NOOP_DEVICE)
    if not index:
        return None
    links = ipr.get_links(index)
    info = links[0].get_attr("IFLA_LINKINFO") if links else None
    if info is None or info.get_attr("IFLA_INFO_KIND") != "dummy":
        return None
    routes = [
        m
        for af in FAMILIES
        for m in ipr.route("dump", family=af, table=MAIN_TABLE)
        if m.get_attr("RTA_OIF") == index
        and m["proto"] != RTPROT_KERNEL
        and (m.get_attr("RTA_TABLE") or m["table"]) == MAIN_TABLE
    ]
    if len(routes) > 1:
        return None
    return {"name": POC_NOOP_DEVICE, "ifindex": index, "routes": len(routes)}


def find(netns: str | None = None) -> dict:
    """What of the proof of concept is installed: its rules, its table-100 route, its noop
    device, plus foreign rules at its priorities (reported, never removed)."""
    with kernel.open_route(netns) as ipr:
        return _find(ipr)


def _find(ipr: IPRoute) -> dict:
    try:
        messages = list(ipr.rule("dump"))
    except NetlinkError as e:
        raise DatapathError(f"cannot list ip rules: {e}") from e
    rules, foreign, ambiguous = [], [], []
    for i, msg in enumerate(messages):
        priority = msg.get_attr("FRA_PRIORITY") or 0
        if priority not in SHAPES or FAMILIES.get(msg["family"]) is None:
            continue
        rule = _as_poc_rule(msg)
        if rule is None:
            if priority:  # priority 0 also holds the kernel's own "lookup local" rule
                foreign.append(kernel.rule_from_msg(msg).describe())
            elif (msg.get_attr("FRA_TABLE") or msg["table"]) != 255:
                foreign.append(kernel.rule_from_msg(msg).describe())
        elif _ambiguous(rule, messages[:i]):
            ambiguous.append(rule)
        else:
            rules.append(rule)
    routes = _wg_default_routes(ipr)
    noop = _noop_device(ipr)
    return {
        "present": bool(rules or routes or noop or ambiguous),
        "rules": rules,
        "routes": routes,
        "noop_device": noop,
        "ambiguous_rules": ambiguous,
        "foreign_rules": foreign,
    }


def report(found: dict) -> dict:
    """``find``'s answer as JSON-ready data."""
    return {
        "present": found["present"],
        "rules": [r.describe() for r in found["rules"]],
        "routes": [r["describe"] for r in found["routes"]],
        "noop_device": found["noop_device"],
        "left_in_place": [r.describe() for r in found["ambiguous_rules"]],
        "foreign_rules_at_its_priorities": found["foreign_rules"],
    }


def remove(netns: str | None = None) -> dict:
    """Remove exactly the proof of concept's state, in the order the module docstring gives;
    idempotent. Returns what was removed and what was left in place."""
    removed: dict = {"rules": [], "routes": [], "noop_device": None}
    with kernel.open_route(netns) as ipr:
        found = _find(ipr)
        by_priority = sorted(found["rules"], key=lambda r: REMOVAL_ORDER.index(r.priority))
        for rule in by_priority:
            if rule.priority == 0 and found["ambiguous_rules"]:
                # Some rule to table 100 stays: WireGuard's own packets still need this one.
                continue
            try:
                ipr.rule("del", **rule.request())
            except NetlinkError as e:
                if e.code not in kernel.MISSING:
                    raise DatapathError(f"cannot delete ip rule '{rule.describe()}': {e}") from e
                continue
            removed["rules"].append(rule.describe())
        for route in found["routes"]:
            # Every field as dumped: the kernel then deletes this route and no other.
            kw = {
                "family": kernel.AF[route["family"]],
                "table": POC_TABLE,
                "dst_len": 0,
                "oif": route["oif"],
                "type": "unicast",
                "scope": route["scope"],
                "proto": route["proto"],
            }
            if route["priority"] is not None:
                kw["priority"] = route["priority"]
            try:
                ipr.route("del", **kw)
            except NetlinkError as e:
                if e.code not in kernel.MISSING:
                    raise DatapathError(f"cannot delete '{route['describe']}': {e}") from e
                continue
            removed["routes"].append(route["describe"])
        noop = found["noop_device"]
        if noop is not None:
            try:
                ipr.link("del", index=noop["ifindex"])  # takes its route with it
                removed["noop_device"] = noop["name"]
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise DatapathError(f"cannot delete device {noop['name']}: {e}") from e
        after = _find(ipr)
    removed["left_in_place"] = [r.describe() for r in after["ambiguous_rules"] + after["rules"]]
    removed["foreign_rules_at_its_priorities"] = after["foreign_rules"]
    return removed
