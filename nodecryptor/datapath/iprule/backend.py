"""``IpRuleDatapath``: the ip-rule fallback behind the ``Datapath`` protocol.

Reconciles nodecryptor's priority band and routing table with ``spec.desired_rules`` and
``spec.desired_routes``: missing rules first, then new and changed routes (replace is atomic),
then stale routes, then stale rules, so a flow is never left without a decision while the
state moves. Only rules inside the band and routes inside the table are ever read or changed.
"""

from __future__ import annotations

import errno
import logging
import threading
import time

from pyroute2.netlink.exceptions import NetlinkError

from nodecryptor.core.errors import DatapathError, NotSupported, SettingsError
from nodecryptor.core.log import kv
from nodecryptor.core.model import DesiredState
from nodecryptor.core.settings import DatapathMode, Settings
from nodecryptor.datapath.base import Observation
from nodecryptor.datapath.iprule import kernel, noop
from nodecryptor.datapath.iprule.bulk import RouteTable
from nodecryptor.datapath.iprule.spec import (
    MAIN_TABLE,
    OFFSET_LOOKUP,
    OFFSET_PROBE,
    RuleSpec,
    band,
    desired_guard_routes,
    desired_routes,
    desired_rules,
    guard_table,
)

log = logging.getLogger(__name__)


def remove_all(ipr, settings: Settings, netns: str | None = None) -> dict:
    """Delete every rule of the band, every route of the table and the noop route."""
    rules = kernel.read_rules(ipr, band(settings))
    # The catch-all lookup rule goes first so nothing is sent to a half-emptied table.
    rules.sort(key=lambda r: r.priority != settings.iprule_priority_base + OFFSET_LOOKUP)
    removed_rules = sum(kernel.delete_rule(ipr, r) for r in rules)
    removed_routes = 0
    for number in (settings.iprule_table, guard_table(settings)):
        with RouteTable(number, netns) as table:
            removed_routes += table.delete_routes(table.read())
    out = {"datapath": "iprule", "rules_removed": removed_rules, "routes_removed": removed_routes}
    out.update(noop.remove(ipr))
    return out


def ingress_report(settings: Settings) -> dict:
    """Ingress enforcement is a BPF-only feature: policy routing decides where a
    packet leaves, it cannot classify what arrives. Reported as unsupported, never pretended;
    with ``enforce`` requested the node is not ready, since nothing is being refused."""
    requested = str(settings.ingress_enforcement)
    reason = (
        "ingress enforcement unsupported: the ip-rule datapath cannot classify arriving "
        f"packets (--ingress-enforcement={requested} has no effect)"
    )
    return {
        "supported": False,
        "requested": requested,
        "reason": reason,
        "blocks_readiness": requested == "enforce",
    }


class IpRuleDatapath:
    """Policy-routing datapath. The constructor does no I/O; ``start`` probes and opens.

    ``netns`` runs every operation in that network namespace (tests; the agent uses its own).
    ``metrics`` is accepted for symmetry with the BPF backend; policy routing has no packet
    counters, and rule/route counts are reported through ``observe()``.
    """

    name = DatapathMode.IPRULE

    def __init__(self, settings: Settings, metrics=None, netns: str | None = None):
        self.settings = settings
        self.metrics = metrics
        self.netns = netns
        self._ipr = None
        # /readyz calls observe() from the health server's thread while the reconcile thread
        # may be applying; one pyroute2 handle (and its event loop) must not serve both.
        self._lock = threading.RLock()
        self._applied = False
        self._error = ""
        self._noop_checked = False
        self.last_apply: dict = {}

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> "IpRuleDatapath":
        """Check the band and table settings and that policy routing with protocol/port
        selectors works here; raise NotSupported otherwise. Returns self."""
        self._check_settings()
        try:
            ipr = kernel.open_route(self.netns)
        except (OSError, NetlinkError) as e:
            raise NotSupported("rtnetlink", f"cannot open a netlink socket: {e}") from e
        try:
            self._probe(ipr)
        except NotSupported:
            ipr.close()
            raise
        self._ipr = ipr
        if self.metrics is not None:
            self.metrics.ingress_supported.set(0)
        log.info(
            "ip-rule datapath started",
            extra=kv(
                band=f"{self.settings.iprule_priority_base}-"
                f"{self.settings.iprule_priority_base + 99}",
                table=self.settings.iprule_table,
                netns=self.netns or "-",
            ),
        )
        return self

    def _check_settings(self) -> None:
        table, base = self.settings.iprule_table, self.settings.iprule_priority_base
        # unspec, default, main and local belong to the kernel and everybody else; the next
        # id is the guard table (spec.guard_table).
        if {table, table + 1} & {0, 253, 254, 255} or not 0 < table < 2**32 - 1:
            raise SettingsError(
                "iprule_table",
                table,
                "must be an unused table id whose "
                "successor (the guard table) is unused too, neither being "
                "0 (unspec), 253 (default), 254 (main) or 255 (local)",
            )
        # The whole band must sit between the local table's rule (0) and main's (32766).
        if not 0 < base or base + OFFSET_PROBE >= 32766:
            raise SettingsError(
                "iprule_priority_base",
                base,
                f"the band {base}..{base + OFFSET_PROBE} must lie within 1..32765",
            )

    def _probe(self, ipr) -> None:
        try:
            list(ipr.rule("dump"))
        except NetlinkError as e:
            raise NotSupported(
                "policy routing",
                f"listing ip rules failed: {e}",
                minimum="CONFIG_IP_MULTIPLE_TABLES",
            ) from e
        # A rule with ipproto and a port range, at the band's reserved probe priority: the
        # exemptions need both (Linux 4.17); without ipproto a dport rule would match every
        # protocol.
        probe = RuleSpec(
            4,
            self.settings.iprule_priority_base + OFFSET_PROBE,
            MAIN_TABLE,
            dst="192.0.2.255/32",
            ip_proto=6,
            dport=(1, 1),
        )
        try:
            kernel.add_rule(ipr, probe)
            kernel.delete_rule(ipr, probe)
        except DatapathError as e:
            raise NotSupported(
                "ip rule ipproto/dport selectors", str(e), minimum="Linux 4.17"
            ) from e

    def _handle(self):
        if self._ipr is None:
            self.start()
        return self._ipr

    def close(self) -> None:
        """Release the netlink handle; rules and routes stay and keep enforcing."""
        with self._lock:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

    # -- Datapath protocol ---------------------------------------------------------------

    def apply(self, desired: DesiredState) -> None:
        with self._lock:
            self._apply(desired)

    def _apply(self, desired: DesiredState) -> None:
        ipr = self._handle()
        started = time.monotonic()
        want_rules = set(desired_rules(desired, self.settings))
        wanted = {
            self.settings.iprule_table: {r.key: r for r in desired_routes(desired)},
            guard_table(self.settings): {r.key: r for r in desired_guard_routes(desired)},
        }
        try:
            have_rules = set(kernel.read_rules(ipr, band(self.settings)))
            added_rules = sum(kernel.add_rule(ipr, r) for r in sorted(want_rules - have_rules))
            # Every table's new routes before any table's stale ones: a guard moving from
            # one table to the other is never missing from both.
            stale, changed = [], []
            for number, want_routes in wanted.items():
                with RouteTable(number, self.netns) as table:
                    have_routes = {r.key: r for r in table.read()}
                    new = [r for k, r in want_routes.items() if have_routes.get(k) != r]
                    table.set_routes(new)
                    changed += new
                    stale.append(
                        (number, [r for k, r in have_routes.items() if k not in want_routes])
                    )
            removed_routes = 0
            for number, routes in stale:
                with RouteTable(number, self.netns) as table:
                    removed_routes += table.delete_routes(routes)
            removed_rules = sum(kernel.delete_rule(ipr, r) for r in sorted(have_rules - want_rules))
            if self.settings.noop_route:
                noop_state = noop.ensure(ipr)
                self._noop_checked = False  # a later pass without the flag removes it
            elif not self._noop_checked:
                # A leftover (of an earlier agent run with --noop-route) is removed once. Only
                # that flag creates the route, so later passes skip the check: it dumps the
                # whole main table, which at 10,000 nodes was 44 % of the agent's busy time
                # under churn (benchmarks/suite.py control plane, py-spy).
                noop_state = noop.remove(ipr) if noop.present(ipr) else {}
                self._noop_checked = True
            else:
                noop_state = {}
        except DatapathError as e:
            self._error = str(e)
            raise
        except NetlinkError as e:  # an unexpected errno outside the kernel helpers
            self._error = str(e)
            raise DatapathError(f"ip-rule apply failed: {e}") from e
        self._applied = True
        self._error = ""
        self.last_apply = {
            "rules": len(want_rules),
            "routes": sum(len(w) for w in wanted.values()),
            "rules_added": added_rules,
            "rules_removed": removed_rules,
            "routes_set": len(changed),
            "routes_removed": removed_routes,
            "seconds": round(time.monotonic() - started, 3),
        }
        if noop_state:
            self.last_apply["noop"] = noop_state
        log.info("ip-rule datapath applied", extra=kv(**self.last_apply))

    def observe(self) -> Observation:
        with self._lock:
            return self._observe()

    def _observe(self) -> Observation:
        try:
            ipr = self._handle()
            rules = kernel.read_rules(ipr, band(self.settings))
            routes = []
            for number in (self.settings.iprule_table, guard_table(self.settings)):
                with RouteTable(number, self.netns) as table:
                    routes += table.read()
        except (DatapathError, NotSupported, NetlinkError) as e:
            return Observation(
                datapath=self.name,
                attached=False,
                ready=False,
                reason=f"cannot read rules/routes: {e}",
            )
        lookup_prio = self.settings.iprule_priority_base + OFFSET_LOOKUP
        lookup_families = sorted({r.family for r in rules if r.priority == lookup_prio})
        attached = bool(lookup_families)
        if not attached:
            reason = "no lookup rule in the band (nothing applied yet)"
        elif not self._applied:
            reason = "rules found from an earlier run; not yet applied by this process"
        else:
            reason = self._error
        ingress = ingress_report(self.settings)
        if attached and self._applied and not self._error and ingress["blocks_readiness"]:
            reason = ingress["reason"]
        kinds: dict[str, int] = {}
        for route in routes:
            kinds[route.kind] = kinds.get(route.kind, 0) + 1
        return Observation(
            datapath=self.name,
            attached=attached,
            ready=attached
            and self._applied
            and not self._error
            and not ingress["blocks_readiness"],
            reason=reason,
            details={
                "rules": len(rules),
                "routes": len(routes),
                "routes_by_kind": kinds,
                "table": self.settings.iprule_table,
                "priority_band": [
                    self.settings.iprule_priority_base,
                    self.settings.iprule_priority_base + 99,
                ],
                "lookup_rule_families": lookup_families,
                "noop_route": noop.present(ipr),
                "last_apply": self.last_apply,
                "ingress_enforcement": {
                    k: v for k, v in ingress.items() if k != "blocks_readiness"
                },
            },
        )

    def cleanup(self) -> None:
        with self._lock:
            self._cleanup()

    def _cleanup(self) -> None:
        ipr = self._handle()
        try:
            result = remove_all(ipr, self.settings, self.netns)
        except NetlinkError as e:
            if e.code == errno.EPERM:
                raise DatapathError(f"ip-rule cleanup needs CAP_NET_ADMIN: {e}") from e
            raise DatapathError(f"ip-rule cleanup failed: {e}") from e
        self._applied = False
        log.info("ip-rule datapath removed", extra=kv(**result))
