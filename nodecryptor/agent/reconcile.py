"""The reconcile loop: read inputs, decide (pure policy), act (one datapath call).

Each pass takes a snapshot of the store, reads the WireGuard device and the underlay devices,
computes the desired state and hands it to the datapath, which makes the kernel match it
idempotently. Passes run when something changed (debounced), periodically to repair drift, and
with exponential backoff after a failure. Nothing is applied before the first complete list of
CiliumNodes; after that an unreachable API server leaves the last known state in force — the
loop never removes protection because the API is gone.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

from nodecryptor.policy import cilium
from nodecryptor.node import devices as devices_mod
from nodecryptor.node import wireguard
from nodecryptor.datapath.base import Datapath
from nodecryptor.core.errors import DatapathError
from nodecryptor.core.log import kv
from nodecryptor.observe.metrics import Metrics
from nodecryptor.core.model import ROLE_CONTROL_PLANE, DesiredState, WgState
from nodecryptor.policy.plan import (
    admission_limits,
    compute_desired,
    compute_plan,
    is_control_plane,
)
from nodecryptor.policy.plan import node_addresses as policy_node_addresses
from nodecryptor.agent import exemption_record
from nodecryptor.observe.rejectlog import RejectionLog
from nodecryptor.core.settings import Settings
from nodecryptor.cluster.store import Store

log = logging.getLogger(__name__)

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


def read_rp_filter(ifname: str) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for name in ("all", ifname):
        try:
            with open(f"/proc/sys/net/ipv4/conf/{name}/rp_filter") as f:
                out[name] = int(f.read().strip())
        except (OSError, ValueError):
            out[name] = None
    return out


@dataclass
class PassResult:
    ok: bool
    desired: DesiredState | None = None
    error: str | None = None


class Reconciler:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        datapath: Datapath,
        metrics: Metrics | None = None,
        *,
        read_wg: Callable[[str], WgState] = wireguard.read_state,
        resolve_devices: Callable | None = None,
        read_sysctl: Callable[[str], dict] = read_rp_filter,
        read_tunnel: Callable[[], tuple] = devices_mod.tunnel_devices,
        read_local: Callable[[], tuple] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.settings = settings
        self.store = store
        self.datapath = datapath
        self.metrics = metrics
        self._read_wg = read_wg
        self._resolve_devices = resolve_devices or devices_mod.DeviceResolver(
            refresh_seconds=settings.reconcile_seconds, clock=clock
        )
        self._read_sysctl = read_sysctl
        self._read_tunnel = read_tunnel
        # The local node's own prefixes as the kernel shows them (localroutes.py; the agent's
        # wiring passes the reader). Without one, the Node object alone names them.
        self._read_local = read_local or tuple
        self._clock = clock
        self.heartbeat: float = clock()
        """Monotonic time of the last completed pass (successful or not): liveness."""
        self.applied_once = False
        self.last_error: str | None = None
        self.last_desired: DesiredState | None = None
        self.rp_filter_problem: str | None = None
        self.failures = 0
        self._last_uncovered = -1
        self._observation: tuple[bool, str] = (False, "no pass has applied anything yet")
        """The datapath's own report (ready, why not) as the reconcile thread last read it.
        /readyz answers from it: observing can mean a netlink dump under the datapath's lock,
        which a probe flood must never get to repeat."""
        self._last_inputs: tuple | None = None
        """Inputs of the last successful pass; a pass that is not forced and sees the same
        inputs skips planning and applying (the datapath already holds that state)."""
        self._rejections = RejectionLog(metrics)
        """Admission's rejections, logged and counted once each."""

    # ---- one pass --------------------------------------------------------------------------
    def reconcile_once(self, force: bool = True) -> PassResult:
        """One pass. ``force=False`` (re-checks and event wake-ups from the loop) returns early
        when the inputs are those of the last successful pass; forced passes (the periodic
        one, and every direct call) always apply, which repairs drift in the kernel."""
        if not self.store.synced.is_set():
            self.heartbeat = self._clock()
            return PassResult(ok=False, error="waiting for the first list of CiliumNodes")
        started = time.perf_counter()
        try:
            inputs = self._inputs()
            if not force and inputs == self._last_inputs and self.last_desired is not None:
                self.heartbeat = self._clock()
                return PassResult(ok=True, desired=self.last_desired)
            desired = self._desired(*inputs)
            try:
                self.datapath.apply(desired)
            except BaseException:
                self._observe()
                raise
            self._record_exemptions(desired)
            # Observing can cost as much as applying (the ip-rule datapath dumps its table):
            # on forced passes (every reconcile_seconds), and while not ready, is enough.
            if force or not self._observation[0]:
                self._observe()
        except (DatapathError, OSError) as e:
            return self._failed(str(e), started)
        except Exception as e:  # a bug must not kill the loop; it is logged with its trace
            log.exception("reconcile pass failed unexpectedly")
            return self._failed(f"{type(e).__name__}: {e}", started)
        self.last_desired = desired
        self._last_inputs = inputs
        self.applied_once = True
        self.last_error = None
        self.failures = 0
        self._record(desired, time.perf_counter() - started, ok=True)
        return PassResult(ok=True, desired=desired)

    def _inputs(self) -> tuple:
        """Everything a pass depends on, cheap to read and comparable: the store version and
        snapshot, the WireGuard device, the underlay devices and rp_filter."""
        version = self.store.version
        snapshot = self.store.snapshot()
        node_addresses = [
            addr
            for name, node in snapshot.items()
            if name != self.settings.node_name
            for addr in policy_node_addresses(node, self.settings.address_types)
        ]
        wg = self._read_wg(self.settings.wg_interface)
        devices, _problems = self._resolve_devices(
            self.settings.devices, node_addresses, self.settings.wg_interface
        )
        rp = tuple(sorted(self._read_sysctl(self.settings.wg_interface).items()))
        return (
            version,
            snapshot,
            wg,
            devices,
            rp,
            self._read_tunnel(),
            self.store.exemptions(),
            self.store.pools(),
            tuple(self._read_local()),
        )

    def _desired(
        self,
        _version,
        snapshot,
        wg,
        devices,
        rp_items,
        tunnel=(),
        policies=(),
        pools=None,
        local_prefixes=(),
    ) -> DesiredState:
        plan = compute_plan(
            snapshot,
            self.settings.node_name,
            self.settings,
            underlay_networks=[n for d in devices for n in d.networks],
            policies=policies,
            pools=pools,
            kernel_prefixes=local_prefixes,
        )
        self._rejections.report(plan.rejected)
        if not plan.local_known:
            log.warning(
                "local node has no CiliumNode; treating it as a worker",
                extra=kv(node=self.settings.node_name),
            )
        rp = dict(rp_items)
        bad = {k: v for k, v in rp.items() if v not in (0, None)}
        self.rp_filter_problem = (
            (
                "rp_filter must be 0 on 'all' and on the WireGuard device "
                "(decrypted packets arrive "
                f"on a device without an IPv4 address): {bad}"
            )
            if bad
            else None
        )
        desired = compute_desired(plan, wg, devices, self.settings)
        desired = self._with_cilium(desired, snapshot, wg, tunnel)
        if self.metrics:
            self._export_inputs(snapshot, desired)
        return desired

    def _record_exemptions(self, desired: DesiredState) -> None:
        """Names of the applied policies for ``nodecryptor explain`` (exemption_record.py);
        written only when they change."""
        summary = exemption_record.summarize(desired)
        if summary != getattr(self, "_exemption_summary", None):
            exemption_record.write(self.settings, summary)
            self._exemption_summary = summary

    def _observe(self) -> None:
        try:
            obs = self.datapath.observe()
        except Exception as e:  # observe should not raise; if it does, say so in readiness
            log.exception("observing the datapath failed")
            self._observation = (False, f"cannot observe the datapath: {type(e).__name__}: {e}")
            return
        self._observation = (
            obs.ready,
            "" if obs.ready else f"datapath {obs.datapath} not ready: {obs.reason}",
        )

    def _with_cilium(self, desired, snapshot, wg, tunnel) -> DesiredState:
        """Cilium's routing mode and own traffic (nodecryptor/policy/cilium.py)."""
        node_ips, pod_cidrs = cilium.remote_inventory(
            snapshot, self.settings.node_name, self.settings.address_types
        )
        facts = cilium.detect(wg, tunnel, node_ips, pod_cidrs)
        last = self.last_desired.cilium if self.last_desired is not None else None
        if last is None or (last.routing_mode, last.node_ips_in_allowed_ips) != (
            facts.routing_mode,
            facts.node_ips_in_allowed_ips,
        ):
            log.info(
                "cilium detected",
                extra=kv(
                    routing_mode=facts.routing_mode,
                    why=facts.routing_mode_source,
                    node_ips_in_allowed_ips=facts.node_ips_in_allowed_ips,
                ),
            )
        return cilium.apply(
            desired,
            facts,
            self.settings.take_over_pod_to_pod,
            admission_limits(self.settings, self.store.pools()),
        )

    def _failed(self, error: str, started: float) -> PassResult:
        self.failures += 1
        self.last_error = error
        log.error("reconcile failed; will retry", extra=kv(error=error, attempt=self.failures))
        self._record(None, time.perf_counter() - started, ok=False)
        return PassResult(ok=False, error=error)

    def _record(self, desired: DesiredState | None, seconds: float, ok: bool) -> None:
        self.heartbeat = self._clock()
        if not self.metrics:
            return
        self.metrics.reconciles.labels(result="ok" if ok else "error").inc()
        self.metrics.reconcile_duration.observe(seconds)
        if ok:
            self.metrics.last_apply.set(time.time())

    def _export_inputs(self, snapshot, desired: DesiredState) -> None:
        m = self.metrics
        cp = sum(
            1
            for n in snapshot.values()
            if is_control_plane(n, self.settings.control_plane_labels, self.settings.role_source)
        )
        m.nodes.labels(role=ROLE_CONTROL_PLANE).set(cp)
        m.nodes.labels(role="worker").set(len(snapshot) - cp)
        counts = {(k, f): 0 for k in ("node-ip", "pod-cidr") for f in ("ipv4", "ipv6")}
        for d in desired.destinations:
            counts[(d.kind, f"ipv{d.prefix.version}")] += 1
        for (kind, family), n in counts.items():
            m.destinations.labels(kind=kind, family=family).set(n)
        m.wg_up.set(1 if desired.wg.usable else 0)
        m.wg_peers.set(len(desired.wg.peers or ()))
        m.uncovered.set(len(desired.uncovered))
        if len(desired.uncovered) != self._last_uncovered:
            self._last_uncovered = len(desired.uncovered)
            if desired.uncovered:
                log.warning(
                    "destinations not covered by any WireGuard peer",
                    extra=kv(
                        count=len(desired.uncovered),
                        fail_mode=desired.fail_mode,
                        sample=", ".join(sorted(map(str, desired.uncovered))[:5]),
                    ),
                )

    # ---- the loop --------------------------------------------------------------------------
    def run(self, stop: threading.Event, wake: threading.Event) -> None:
        """Run passes until ``stop``. ``wake`` is set by the store and the link watcher."""
        next_periodic = self._clock()
        next_forced = self._clock()
        while not stop.is_set():
            wake.clear()
            force = self._clock() >= next_forced or self.failures > 0
            result = self.reconcile_once(force=force)
            if force and result.ok:
                next_forced = self._clock() + self.settings.reconcile_seconds
            if result.ok or not self.store.synced.is_set():
                delay = self.settings.reconcile_seconds if result.ok else 0.2
                if result.ok and (result.desired.uncovered or not result.desired.wg.usable):
                    # Waiting for Cilium to add a peer or bring the device back: neither
                    # raises an event this loop hears, so look again soon.
                    delay = min(delay, self.settings.coverage_recheck_seconds)
            else:
                delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures - 1))
                delay *= random.uniform(0.8, 1.2)
            next_periodic = self._clock() + delay
            while not stop.is_set():
                remaining = next_periodic - self._clock()
                if remaining <= 0:
                    break
                if wake.wait(min(remaining, 1.0)):
                    # Debounce: let a burst of events settle, then reconcile once.
                    stop.wait(self.settings.debounce_seconds)
                    break

    # ---- health ----------------------------------------------------------------------------
    def alive(self, now: float | None = None) -> tuple[bool, str]:
        age = (now if now is not None else self._clock()) - self.heartbeat
        if age > self.settings.heartbeat_stale_seconds:
            return False, f"no reconcile pass for {age:.0f}s"
        return True, f"last pass {age:.1f}s ago"

    def ready(self) -> tuple[bool, str]:
        """Readiness from what the loop last saw (cheap, lock-free: the health server calls
        it); the datapath is observed by the loop after every pass that applied."""
        if not self.store.synced.is_set():
            return False, "waiting for the first list of CiliumNodes"
        if not self.applied_once:
            return False, f"desired state not applied yet: {self.last_error or 'pending'}"
        observed_ready, why = self._observation
        if not observed_ready:
            return False, why
        if self.rp_filter_problem:
            return False, self.rp_filter_problem
        problem = cilium.readiness_problem(self.last_desired.cilium if self.last_desired else None)
        if problem:
            return False, problem
        return True, "synced, applied and attached"
