"""Read-only questions about the ip-rule datapath, for the ``status``/``explain``/``cleanup``
commands (another process than the agent): everything is read back from the kernel.

``explain`` asks the kernel's own fib lookup (rules included) where a packet would go and maps
the answer to the verdict words both datapaths share: routed through WireGuard → encrypt; sent
to main by an exemption rule → exempt; main for anything else → pass; an ``unreachable`` route
in nodecryptor's table → drop. The band's rules are then matched in Python only to name which
rule the kernel used.
"""

from __future__ import annotations

import ipaddress

from nodecryptor.core.ports import IP_PROTOCOLS, PORTED_NUMBERS
from nodecryptor.core.settings import DatapathMode, FailMode, Settings
from nodecryptor.datapath.base import (
    VERDICT_DROP,
    VERDICT_ENCRYPT,
    VERDICT_EXEMPT,
    VERDICT_PASS,
    Explanation,
    PacketQuery,
)
from nodecryptor.datapath.iprule import kernel, noop
from nodecryptor.datapath.iprule.backend import remove_all
from nodecryptor.datapath.iprule.bulk import RouteTable
from nodecryptor.datapath.iprule.spec import (
    OFFSET_CILIUM_POD,
    OFFSET_EXEMPT_DPORT,
    OFFSET_EXEMPT_SPORT,
    OFFSET_LOOKUP,
    OFFSET_WG_MARK,
    OFFSET_WG_PORT,
    ROUTE_UNICAST,
    RouteSpec,
    RuleSpec,
    band,
    guard_table,
)

DATAPATH = DatapathMode.IPRULE
PORTED = PORTED_NUMBERS
# Protocols RTM_GETROUTE accepts in RTA_IP_PROTO; others (SCTP) are refused with EOPNOTSUPP,
# so they are looked up without protocol and ports, and the band's protocol rules are matched
# in user space (the kernel matches them on real packets).
QUERYABLE = {6, 17, 1, 58}
# Reason words as abi.REASON_NAMES spells them, so both datapaths explain alike.
REASON_BY_OFFSET = {
    OFFSET_WG_MARK: (VERDICT_PASS, "wireguard-output"),
    OFFSET_WG_PORT: (VERDICT_PASS, "wireguard-port"),
    OFFSET_EXEMPT_DPORT: (VERDICT_EXEMPT, "exempt-control-plane-port"),
    OFFSET_EXEMPT_SPORT: (VERDICT_EXEMPT, "exempt-control-plane-reply"),
    OFFSET_CILIUM_POD: (VERDICT_PASS, "cilium-pod-to-pod"),
}


def active(settings: Settings, netns: str | None = None) -> bool:
    """True when anything of the ip-rule datapath is installed: a rule in the band or a route
    in the table (also a half-removed state, which cleanup must still find)."""
    with kernel.open_route(netns) as ipr:
        if kernel.read_rules(ipr, band(settings)):
            return True
    return bool(read_routes(settings, netns))


def read_routes(settings: Settings, netns: str | None = None) -> list[RouteSpec]:
    """The routes of both of nodecryptor's tables (its own and the guard table)."""
    routes: list[RouteSpec] = []
    for number in (settings.iprule_table, guard_table(settings)):
        with RouteTable(number, netns) as table:
            routes += table.read()
    return routes


def status(settings: Settings, netns: str | None = None) -> dict:
    with kernel.open_route(netns) as ipr:
        rules = kernel.read_rules(ipr, band(settings))
        routes = read_routes(settings, netns)
        wg_index = kernel.link_index(ipr, settings.wg_interface)
        noop_present = noop.present(ipr)
    kinds: dict[str, int] = {}
    for route in routes:
        kinds[route.kind] = kinds.get(route.kind, 0) + 1
    lookup = settings.iprule_priority_base + OFFSET_LOOKUP
    families = {r.family for r in rules if r.priority == lookup}
    ready, reason = True, ""
    if not families:
        ready, reason = False, "no lookup rule in nodecryptor's band: nothing is sent to its table"
    elif not wg_index:
        ready, reason = (
            False,
            (
                f"WireGuard device {settings.wg_interface!r} absent: cluster "
                "traffic is dropped (fail-closed) or clear (fail-open)"
            ),
        )
    from nodecryptor.datapath.iprule.backend import ingress_report

    ingress = ingress_report(settings)
    return {
        "datapath": DATAPATH,
        "active": bool(families),
        "ready": ready,
        "reason": reason,
        "ingress_enforcement": {k: v for k, v in ingress.items() if k != "blocks_readiness"},
        "priority_band": [settings.iprule_priority_base, settings.iprule_priority_base + 99],
        "table": settings.iprule_table,
        "guard_table": guard_table(settings),
        "rule_count": len(rules),
        "rules": [r.describe() for r in rules],
        "route_count": len(routes),
        "routes_by_kind": kinds,
        "wireguard": {"interface": settings.wg_interface, "ifindex": wg_index},
        "noop_route": noop_present,
    }


def cleanup(settings: Settings, netns: str | None = None) -> dict:
    """Remove every rule of the band, every route of the table and the noop route."""
    with kernel.open_route(netns) as ipr:
        return remove_all(ipr, settings, netns)


def _longest_match(routes: list[RouteSpec], dst) -> RouteSpec | None:
    """The route the table would use for ``dst``: longest prefix, then lowest metric."""
    best, best_rank = None, None
    for route in routes:
        net = ipaddress.ip_network(route.dst)
        if dst.version == net.version and dst in net:
            rank = (-net.prefixlen, route.metric)
            if best_rank is None or rank < best_rank:
                best, best_rank = route, rank
    return best


def _rule_matches(
    rule: RuleSpec, family: int, dst, src, proto: int, sport: int, dport: int, mark: int
) -> bool:
    if rule.family != family:
        return False
    if rule.fwmark is not None and (mark & (rule.fwmask or 0xFFFFFFFF)) != rule.fwmark:
        return False
    if rule.dst and dst not in ipaddress.ip_network(rule.dst):
        return False
    if rule.src and (src is None or src not in ipaddress.ip_network(rule.src)):
        return False
    if rule.ip_proto is not None and rule.ip_proto != proto:
        return False
    if rule.sport and not (proto in PORTED and rule.sport[0] <= sport <= rule.sport[1]):
        return False
    if rule.dport and not (proto in PORTED and rule.dport[0] <= dport <= rule.dport[1]):
        return False
    return True


def _with_protocol_rules(
    answer: dict,
    rules: list[RuleSpec],
    base: int,
    family: int,
    dst,
    src,
    proto: int,
    q: PacketQuery,
) -> dict:
    """Complete a protocol-less kernel answer: a band rule for this protocol that matches and
    comes before the catch-all lookup sends the packet to main."""
    used = next(
        (
            r
            for r in rules
            if r.ip_proto == proto
            and r.priority < base + OFFSET_LOOKUP
            and _rule_matches(r, family, dst, src, proto, q.sport, q.dport, q.mark)
        ),
        None,
    )
    if used is None:
        return answer
    return {
        "ok": True,
        "table": used.table,
        "oif": 0,
        "type": "unicast",
        "prefsrc": None,
        "note": f"protocol {proto} matched in user space: {used.describe()}",
    }


def explain(settings: Settings, q: PacketQuery, netns: str | None = None) -> Explanation:
    """Where the kernel would send ``q``, as a verdict. A ``src`` that is not a local address
    (a pod's) is looked up as a forwarded packet arriving on ``lo`` — nodecryptor's rules never
    match on the input interface, so any interface gives the same answer. ``q.device`` and
    ``q.tcp_flags`` do not influence routing and are ignored."""
    dst = ipaddress.ip_address(q.dst)
    src = ipaddress.ip_address(q.src) if q.src else None
    family = dst.version
    proto = IP_PROTOCOLS.get(q.proto)
    if proto is None:
        raise ValueError(f"unknown protocol {q.proto!r} (tcp, udp, sctp, icmp or icmpv6)")
    base = settings.iprule_priority_base
    with kernel.open_route(netns) as ipr:
        local = {ipaddress.ip_address(a) for a in kernel.local_addresses(ipr)}
        forwarded = src is not None and src not in local
        iif = kernel.link_index(ipr, "lo") if forwarded else 0
        queryable = proto in QUERYABLE
        answer = kernel.query_route(
            ipr,
            family,
            str(dst),
            src=str(src) if src else None,
            iif=iif,
            ip_proto=proto if queryable else 0,
            sport=q.sport if queryable and proto in PORTED else 0,
            dport=q.dport if queryable and proto in PORTED else 0,
            mark=q.mark,
        )
        rules = kernel.read_rules(ipr, band(settings))
        routes = read_routes(settings, netns)
        names = kernel.link_names(ipr)
        wg_index = kernel.link_index(ipr, settings.wg_interface)
        wg_up = bool(wg_index) and any(
            msg["flags"] & 1 for msg in ipr.get_links(wg_index)
        )  # IFF_UP
    table_route = _longest_match(routes, dst)
    if not queryable:
        answer = _with_protocol_rules(answer, rules, base, family, dst, src, proto, q)
    details = {
        "kernel": answer,
        "lookup": "forwarded" if forwarded else "output",
        "table_route": (
            None
            if table_route is None
            else {"dst": table_route.dst, "kind": table_route.kind, "metric": table_route.metric}
        ),
    }
    device = names.get(answer.get("oif", 0)) if answer.get("ok") else None

    if not answer["ok"]:
        if table_route is not None and table_route.kind != ROUTE_UNICAST:
            reason = "wireguard-down-fail-closed" if not wg_up else "no-peer-covers-fail-closed"
            return Explanation(VERDICT_DROP, reason, DATAPATH, None, details)
        return Explanation(VERDICT_DROP, f"no-route ({answer['error']})", DATAPATH, None, details)
    if answer["table"] == settings.iprule_table:
        if answer["oif"] == wg_index and wg_index:
            return Explanation(VERDICT_ENCRYPT, "cluster-destination", DATAPATH, device, details)
        return Explanation(
            VERDICT_DROP, "table-route-not-through-wireguard", DATAPATH, device, details
        )
    # Rules that look up nodecryptor's own table did not decide here: the answer came from
    # elsewhere (e.g. the pod rule's suppressed lookup fell through to the next rule).
    used = next(
        (
            r
            for r in rules
            if r.priority != base + OFFSET_LOOKUP
            and r.table not in (settings.iprule_table, guard_table(settings))
            and _rule_matches(r, family, dst, src, proto, q.sport, q.dport, q.mark)
        ),
        None,
    )
    details["rule"] = used.describe() if used else None
    if used is not None and used.priority - base == OFFSET_WG_MARK:
        return Explanation(VERDICT_PASS, "wireguard-output", DATAPATH, device, details)
    if table_route is None:
        # Not in the table: not a cluster destination, or fail-open left it out.
        reason = "not-cluster-destination"
        if settings.fail_mode == FailMode.OPEN and not wg_up:
            reason = "not-cluster-destination-or-wireguard-down-fail-open"
        return Explanation(VERDICT_PASS, reason, DATAPATH, device, details)
    if used is not None:
        verdict, reason = REASON_BY_OFFSET.get(used.priority - base, (VERDICT_PASS, "band-rule"))
        return Explanation(verdict, reason, DATAPATH, device, details)
    return Explanation(VERDICT_PASS, "main-table", DATAPATH, device, details)
