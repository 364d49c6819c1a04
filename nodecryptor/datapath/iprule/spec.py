"""What the ip-rule datapath must install, derived purely from a DesiredState.

No netlink here: ``desired_rules`` and ``desired_routes`` return plain, hashable specs that the
kernel module compares with what it reads back, so the reconcile is a set difference.

Layout of the priority band (``settings.iprule_priority_base`` = B, nodecryptor owns B..B+99):

=========  ===============================================================  ==========
priority   match                                                            lookup
=========  ===============================================================  ==========
B + 0      fwmark wg_mark/wg_mark_mask (WireGuard's own encrypted output)   main
B + 5      ipproto udp sport P dport P, P = desired.wg_port                  main
B + 10     to <serving node address> ipproto X dport <exempt range>         main
           (exemption policies, the built-in control-plane one included)
B + 20     from <local node address> [to <client prefix>] ipproto X sport   main
           <exempt range> (serving nodes only: replies of the exempt services;
           "to" only for policies with a client selector leaving some out)
B + 30     from <local pod CIDR>, routes of prefix length < 32 (128)        own table
           suppressed (suppress_prefixlength 31/127): pods' traffic to remote
           node addresses is encrypted
B + 31     from <local pod CIDR>: everything else, incl. remote pod CIDRs   main
           (Cilium encrypts pod-to-pod itself; absent with
           --take-over-pod-to-pod and in tunnel mode)
B + 90     everything else                                                   own table
B + 91     everything else (reached only when the own table has no route)    guard table
B + 99     reserved for the start-up probe, never left installed
=========  ===============================================================  ==========

The guard table (``settings.iprule_table`` + 1) holds only the fail-closed guards of remote pod
CIDRs. In the own table they would answer the pods' rule (B + 30) with an error, which
``suppress_prefixlength`` cannot skip (the kernel suppresses successful lookups only), and
pod-to-pod traffic that is Cilium's would be dropped while WireGuard is down; from the guard
table they still catch the node's own traffic to remote pods (B + 91) once the WireGuard routes
are gone.

Rules exist per family. Their number grows with serving node addresses × exempt ranges (and,
on a serving node, client prefixes × ranges of policies restricted to some clients) only;
remote workers live as routes in the table. A lookup in the table that finds no route falls
through to the next rule (main), which is what lets non-cluster traffic pass untouched.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field, fields

from nodecryptor.core.model import KIND_NODE_IP, DesiredState
from nodecryptor.core.ports import PROTOCOL_NAMES, PROTOCOLS
from nodecryptor.core.settings import FailMode, Settings

MAIN_TABLE = 254
OFFSET_WG_MARK = 0
OFFSET_WG_PORT = 5
OFFSET_EXEMPT_DPORT = 10
OFFSET_EXEMPT_SPORT = 20
OFFSET_CILIUM_NODES = 30
OFFSET_CILIUM_POD = 31
OFFSET_LOOKUP = 90
OFFSET_GUARDS = 91
OFFSET_PROBE = 99
BAND_WIDTH = 100

ROUTE_UNICAST = "unicast"
ROUTE_UNREACHABLE = "unreachable"
# Route metrics in the table. In fail-closed mode every prefix also gets an ``unreachable``
# guard with a worse metric: when WireGuard goes down the kernel flushes the routes through it
# at once, and the guard takes over before the agent has even noticed; without it the lookup
# would fall through to main and the traffic would leave in the clear until the next apply.
METRIC_WIREGUARD = 100
METRIC_GUARD = 200

UDP = 17
FAMILIES = (4, 6)


def _total_key(spec) -> tuple:
    """A sort key defined for every spec: each optional field becomes (0,) when unset and
    (1, value) when set, so an unset field never meets a value in a comparison (Python
    refuses ``None < "10.0.0.0/8"``, and two valid policies produce exactly that pair)."""
    out = []
    for f in fields(spec):
        if not f.compare:
            continue
        value = getattr(spec, f.name)
        out.append((0,) if value is None else (1, value))
    return tuple(out)


@functools.total_ordering
class _TotalOrder:
    """Ordering by ``_total_key`` (dataclass ``order=True`` compares field tuples as they are,
    which raises on None against a value)."""

    def __lt__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return _total_key(self) < _total_key(other)


@dataclass(frozen=True)
class RuleSpec(_TotalOrder):
    """One fib rule, in the fields nodecryptor uses. ``purpose`` is for humans and is ignored
    when comparing with what the kernel reports."""

    family: int
    priority: int
    table: int
    """Table to look up; a negative value -N stands for a rule with fib action N (blackhole,
    unreachable, ...), which nodecryptor never writes but must be able to remove from its band."""
    fwmark: int | None = None
    fwmask: int | None = None
    dst: str | None = None
    """Prefix text such as "192.168.50.10/32", or None for any destination."""
    src: str | None = None
    ip_proto: int | None = None
    sport: tuple[int, int] | None = None
    dport: tuple[int, int] | None = None
    suppress_prefixlen: int | None = None
    """Routes of this prefix length or shorter found by the lookup are ignored."""
    purpose: str = field(default="", compare=False)

    def describe(self) -> str:
        """ip-rule(8)-like text, for status output and logs."""
        parts = [f"{self.priority}:", "from", self.src or "all"]
        if self.dst:
            parts += ["to", self.dst]
        if self.fwmark is not None:
            parts += ["fwmark", f"{self.fwmark:#x}/{(self.fwmask or 0xFFFFFFFF):#x}"]
        if self.ip_proto is not None:
            parts += ["ipproto", PROTOCOL_NAMES.get(self.ip_proto, str(self.ip_proto))]
        for name, rng in (("sport", self.sport), ("dport", self.dport)):
            if rng is not None:
                parts += [name, str(rng[0]) if rng[0] == rng[1] else f"{rng[0]}-{rng[1]}"]
        parts += ["lookup", "main" if self.table == MAIN_TABLE else str(self.table)]
        if self.suppress_prefixlen is not None:
            parts += ["suppress_prefixlength", str(self.suppress_prefixlen)]
        return " ".join(parts)


@dataclass(frozen=True)
class RouteSpec(_TotalOrder):
    """One route in nodecryptor's table. ``oif`` and ``prefsrc`` only for unicast routes."""

    family: int
    dst: str
    kind: str = ROUTE_UNICAST  # ROUTE_UNICAST | ROUTE_UNREACHABLE
    oif: int = 0
    prefsrc: str | None = None
    metric: int = METRIC_WIREGUARD

    @property
    def key(self) -> tuple[int, str, int]:
        """Identity in the table: one route per prefix and metric."""
        return (self.family, self.dst, self.metric)


def guard_table(settings: Settings) -> int:
    """The table of the remote pod CIDRs' fail-closed guards (see the module docstring)."""
    return settings.iprule_table + 1


def band(settings: Settings) -> range:
    return range(settings.iprule_priority_base, settings.iprule_priority_base + BAND_WIDTH)


def _host_prefix(addr) -> str:
    return f"{addr}/{32 if addr.version == 4 else 128}"


def desired_rules(desired: DesiredState, settings: Settings) -> list[RuleSpec]:
    """The complete rule set of the band for ``desired`` (empty when disabled)."""
    if not desired.enabled:
        return []
    base = settings.iprule_priority_base
    rules: list[RuleSpec] = []
    for family in FAMILIES:
        # WireGuard's encrypted UDP must reach the underlay through main; without this it
        # would be routed back into the WireGuard device. The mask covers Cilium's 0x1E00
        # (<= 1.17) and 0x0E00 (>= 1.18) marks; the seed's exact match broke <= 1.17.
        rules.append(
            RuleSpec(
                family,
                base + OFFSET_WG_MARK,
                MAIN_TABLE,
                fwmark=desired.wg_mark,
                fwmask=desired.wg_mark_mask,
                purpose="wireguard-output",
            )
        )
        port = desired.wg_port
        if port:
            # Mirrors the BPF program: WireGuard-to-WireGuard UDP without a mark (e.g. a
            # userspace implementation that does not set one) is never re-encrypted.
            rules.append(
                RuleSpec(
                    family,
                    base + OFFSET_WG_PORT,
                    MAIN_TABLE,
                    ip_proto=UDP,
                    sport=(port, port),
                    dport=(port, port),
                    purpose="wireguard-port",
                )
            )
        rules.append(
            RuleSpec(
                family, base + OFFSET_LOOKUP, settings.iprule_table, purpose="cluster-destinations"
            )
        )
        rules.append(
            RuleSpec(family, base + OFFSET_GUARDS, guard_table(settings), purpose="pod-cidr-guards")
        )
    rules += exemption_rules(desired, settings)
    rules += cilium_pod_rules(desired, settings)
    return sorted(set(rules))


def _ranges(exempt) -> list[tuple[int, int, int]]:
    """(protocol number, first, last) of policy ranges, without duplicates (overlapping
    policies: one rule per range is enough)."""
    return sorted({(PROTOCOLS[r.protocol], r.first, r.last) for r in exempt})


def exemption_rules(desired: DesiredState, settings: Settings) -> list[RuleSpec]:
    """The policies' exemptions (exemptions.py), the built-in control-plane-bootstrap
    included: ``to <serving node address> ipproto P dport A-B`` for every node address the
    local node is a client of (pod CIDRs are never exempt), and ``from <local address>
    ipproto P sport A-B`` for the ranges the local node serves - without ``to`` when every
    destination is a client of the policy, else once per client destination prefix. The rule
    count grows with (selected node addresses × their ranges) + (local addresses × served
    ranges × restricted client prefixes); see the operator guide's limits."""
    base = settings.iprule_priority_base
    plan = desired.plan
    rules: list[RuleSpec] = []
    for dest in plan.destinations:
        if dest.kind != KIND_NODE_IP:
            continue
        for proto, first, last in _ranges(dest.exempt_ports):
            rules.append(
                RuleSpec(
                    dest.prefix.version,
                    base + OFFSET_EXEMPT_DPORT,
                    MAIN_TABLE,
                    dst=str(dest.prefix),
                    ip_proto=proto,
                    dport=(first, last),
                    purpose="exempt-control-plane-port",
                )
            )
    everyone = {
        r.policy for r in plan.serves if all(r.policy in d.client_of for d in plan.destinations)
    }
    for addr in plan.local_addresses:
        # Matched by source address, never by "iif lo" alone: a pod's reply from an exempt
        # port would otherwise leave in the clear too.
        src = _host_prefix(addr)
        for proto, first, last in _ranges(r for r in plan.serves if r.policy in everyone):
            rules.append(
                RuleSpec(
                    addr.version,
                    base + OFFSET_EXEMPT_SPORT,
                    MAIN_TABLE,
                    src=src,
                    ip_proto=proto,
                    sport=(first, last),
                    purpose="exempt-control-plane-reply",
                )
            )
        for dest in plan.destinations:
            if dest.prefix.version != addr.version:
                continue
            restricted = [
                r for r in plan.serves if r.policy not in everyone and r.policy in dest.client_of
            ]
            for proto, first, last in _ranges(restricted):
                rules.append(
                    RuleSpec(
                        addr.version,
                        base + OFFSET_EXEMPT_SPORT,
                        MAIN_TABLE,
                        src=src,
                        dst=str(dest.prefix),
                        ip_proto=proto,
                        sport=(first, last),
                        purpose="exempt-control-plane-reply",
                    )
                )
    return rules


def local_prefixes(desired: DesiredState) -> list:
    """The local node's own addresses (host prefixes) and pod CIDRs."""
    plan = desired.plan
    return [ipaddress.ip_network(a) for a in plan.local_addresses] + list(plan.local_pod_cidrs)


def cilium_pod_rules(desired: DesiredState, settings: Settings) -> list[RuleSpec]:
    """Leave local-pod to remote-pod traffic to Cilium (nodecryptor/policy/cilium.py): per local pod
    CIDR, first the own table restricted to host routes (remote node addresses; pod CIDRs are
    never host routes), then main. Two rules per local pod CIDR, whatever the cluster size."""
    base = settings.iprule_priority_base
    rules = []
    for cidr in desired.cilium_pod_cidrs:
        rules.append(
            RuleSpec(
                cidr.version,
                base + OFFSET_CILIUM_NODES,
                settings.iprule_table,
                src=str(cidr),
                suppress_prefixlen=cidr.max_prefixlen - 1,
                purpose="pod-to-remote-node",
            )
        )
        rules.append(
            RuleSpec(
                cidr.version,
                base + OFFSET_CILIUM_POD,
                MAIN_TABLE,
                src=str(cidr),
                purpose="cilium-pod-to-pod",
            )
        )
    return rules


def desired_routes(desired: DesiredState) -> list[RouteSpec]:
    """The complete content of nodecryptor's own table for ``desired``."""
    return _split_routes(desired)[0]


def desired_guard_routes(desired: DesiredState) -> list[RouteSpec]:
    """The complete content of the guard table: remote pod CIDRs' fail-closed guards."""
    return _split_routes(desired)[1]


def _split_routes(desired: DesiredState) -> tuple[list[RouteSpec], list[RouteSpec]]:
    """(own table, guard table)."""
    pods = {str(d.prefix) for d in desired.destinations if d.kind != KIND_NODE_IP}
    own, guards = [], []
    for route in _all_routes(desired):
        pod_guard = route.kind == ROUTE_UNREACHABLE and route.dst in pods
        (guards if pod_guard else own).append(route)
    return own, guards


def _all_routes(desired: DesiredState) -> list[RouteSpec]:
    """Every route of both tables for ``desired``.

    WireGuard usable: one route per destination through it, with ``src`` set to the local node
    address of the family (without it the kernel may pick another local address and the peer's
    replies bypass WireGuard). Destinations no peer covers, and every destination while
    WireGuard is absent or down, become ``unreachable`` in fail-closed mode and are left out in
    fail-open mode (the lookup then falls through to main). Fail-closed mode keeps the
    ``unreachable`` guard (METRIC_GUARD) under every WireGuard route as well. No route ever
    overlaps the local node's own addresses or pod CIDRs."""
    if not desired.enabled:
        return []
    closed = desired.fail_mode != FailMode.OPEN
    usable = desired.wg.usable
    prefsrc = {}
    for addr in desired.plan.local_addresses:
        prefsrc.setdefault(addr.version, str(addr))
    local = [
        (p.version, int(p.network_address), int(p.broadcast_address))
        for p in local_prefixes(desired)
    ]
    routes = []
    for dest in desired.destinations:
        prefix = dest.prefix
        first, last = int(prefix.network_address), int(prefix.broadcast_address)
        if any(v == prefix.version and f <= last and first <= end for v, f, end in local):
            # Admission already rejects such claims; this guard keeps the table from ever
            # capturing the local node's own traffic whatever a plan says: the lookup rule
            # runs before main, so a route covering the local pod CIDR would send
            # host-to-local-pod traffic (kubelet probes, forwarding) into WireGuard or drop it.
            continue
        if usable and prefix not in desired.uncovered:
            routes.append(
                RouteSpec(
                    prefix.version,
                    str(prefix),
                    ROUTE_UNICAST,
                    oif=desired.wg.ifindex,
                    prefsrc=prefsrc.get(prefix.version),
                )
            )
        if closed:
            routes.append(
                RouteSpec(prefix.version, str(prefix), ROUTE_UNREACHABLE, metric=METRIC_GUARD)
            )
    return sorted(routes)
