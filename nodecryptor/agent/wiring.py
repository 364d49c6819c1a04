"""Wiring of the agent (`nodecryptor run`): store, Kubernetes sync, datapath selection,
reconcile loop, link watcher, health and metrics endpoints, and an orderly shutdown that
leaves the datapath enforcing (fail-static).

Start-up order matters: everything that can be wrong with the configuration (flags, the
kubeconfig or service account, the bind addresses) is found before a datapath is chosen, so a
configuration error exits 2 without compiling, pinning or attaching anything."""

from __future__ import annotations

import logging
import signal
import threading
import time

from nodecryptor.core import log as logmod
from nodecryptor.datapath.base import Datapath
from nodecryptor.core.errors import NotSupported
from nodecryptor.observe.health import Check, HealthServer, all_of
from nodecryptor.core.log import kv
from nodecryptor.observe.metrics import Metrics, metrics_server
from nodecryptor.node.netwatch import LinkWatcher
from nodecryptor.agent.reconcile import Reconciler
from nodecryptor.core.settings import Settings, require_node_name
from nodecryptor.cluster.store import Store

log = logging.getLogger("nodecryptor.agent")


def thread_check(thread: threading.Thread, progress: Check | None = None) -> Check:
    """Liveness of one of the agent's threads: it is running and (when given) its own
    progress check passes. A thread that died is never hidden behind a green probe."""

    def check() -> tuple[bool, str]:
        if not thread.is_alive():
            return False, f"thread {thread.name} has exited"
        return progress() if progress is not None else (True, f"{thread.name} running")

    return check


class Agent:
    """The agent's parts around one datapath. Constructing it binds the health and metrics
    sockets (SettingsError naming the flag when an address cannot be used); ``run`` serves
    them and runs the loops until ``stop``."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None):
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.store = Store()
        self.reconciler: Reconciler | None = None
        self._alive: Check = lambda: (False, "starting")
        self._ready: Check = lambda: (False, "starting")
        limits = {
            "max_connections": settings.endpoint_max_connections,
            "request_seconds": settings.endpoint_request_seconds,
        }
        self.health = HealthServer(
            settings.health_bind,
            lambda: self._alive(),
            lambda: self._ready(),
            on_ready=lambda ok: self.metrics.ready.set(1 if ok else 0),
            **limits,
        )
        try:
            self.metrics_http = metrics_server(
                self.metrics.registry, settings.metrics_bind, **limits
            )
        except BaseException:
            self.health.stop()
            raise

    def close(self) -> None:
        self.health.stop()
        self.metrics_http.stop()

    @staticmethod
    def _with_exemption_note(ready, policies):
        """Readiness with a note while the EncryptionExemption CRD is missing: not a reason
        to be unready (the built-in policy applies), but worth seeing in /readyz."""

        def check() -> tuple[bool, str]:
            ok, why = ready()
            if policies.crd_missing:
                why += "; EncryptionExemption CRD not installed: only the built-in policy applies"
            return ok, why

        return check

    def run(self, datapath: Datapath, stop: threading.Event) -> int:
        from nodecryptor.cluster.poolsync import CiliumConfigSync, PodIPPoolSync
        from nodecryptor.cluster.resources import ExemptionSync, NodeRoleSync
        from nodecryptor.cluster.sync import CiliumNodeSync
        from nodecryptor.node import localroutes

        settings = self.settings
        reconciler = self.reconciler = Reconciler(
            settings,
            self.store,
            datapath,
            self.metrics,
            read_local=lambda: localroutes.read_local_prefixes(settings.wg_interface),
        )
        sync = CiliumNodeSync(settings, self.store, self.metrics)

        def watched_links() -> set[str]:
            # The WireGuard device plus whatever underlay devices the last pass attached to
            # (detected ones included), so a re-created device triggers a re-attach.
            last = reconciler.last_desired
            return {
                settings.wg_interface,
                *settings.devices,
                *(d.name for d in (last.devices if last else ())),
            }

        watcher = LinkWatcher(self.store.changed, names=watched_links)
        threads = [
            threading.Thread(target=sync.run, args=(stop,), name="k8s-sync", daemon=True),
            threading.Thread(target=watcher.run, args=(stop,), name="netwatch", daemon=True),
        ]
        checks = [reconciler.alive, thread_check(threads[0], sync.alive), thread_check(threads[1])]
        # The v1 Nodes, whatever the role source: their addresses and pod CIDRs are the
        # trusted ones (see NodeRoleSync); and the pod pools (poolsync.py).
        for loop, name in (
            (NodeRoleSync(settings, self.store, self.metrics), "k8s-nodes"),
            (CiliumConfigSync(settings, self.store, self.metrics), "k8s-cilium-config"),
            (PodIPPoolSync(settings, self.store, self.metrics), "k8s-ip-pools"),
        ):
            threads.append(threading.Thread(target=loop.run, args=(stop,), name=name, daemon=True))
            checks.append(thread_check(threads[-1], loop.alive))
        # EncryptionExemption policies (exemptions.py); a missing CRD is retried, not fatal.
        policies = self.exemption_sync = ExemptionSync(settings, self.store, self.metrics)
        threads.append(
            threading.Thread(target=policies.run, args=(stop,), name="k8s-exemptions", daemon=True)
        )
        checks.append(thread_check(threads[-1], policies.alive))
        # NodeEncryptionReady and peer health (nodecryptor.agent.peermonitor): two more threads, so
        # neither an API outage (the writer) nor a device read (the monitor) ever waits on, or
        # delays, the reconcile loop.
        from nodecryptor.cluster.condition import NodeConditionWriter
        from nodecryptor.policy.peerhealth import CONDITION_TYPE
        from nodecryptor.agent.peermonitor import PeerMonitor

        writer = NodeConditionWriter(settings, CONDITION_TYPE, self.metrics)
        monitor = PeerMonitor(settings, self.store, reconciler, sync, writer.submit, self.metrics)
        for target, name, progress in (
            (writer.run, "node-condition", None),
            (monitor.run, "peer-health", monitor.alive),
        ):
            threads.append(threading.Thread(target=target, args=(stop,), name=name, daemon=True))
            checks.append(thread_check(threads[-1], progress))
        for t in threads:
            t.start()
        # Checks are wired after the threads started: a thread not started yet is not dead.
        self._alive = all_of(*checks)
        self._ready = self._with_exemption_note(reconciler.ready, policies)
        self.health.start()
        self.metrics_http.start()
        log.info(
            "agent started",
            extra=kv(
                node=settings.node_name,
                datapath=datapath.name,
                health=settings.health_bind,
                metrics=settings.metrics_bind,
            ),
        )
        try:
            reconciler.run(stop, self.store.changed)
        finally:
            stop.set()
            deadline = time.monotonic() + 5
            for t in threads:
                t.join(timeout=max(0.1, deadline - time.monotonic()))
            self.close()
            # Leave links, filters, rules and pinned maps in place: the node keeps enforcing
            # the last applied state until the next agent takes over (fail-static). The
            # NodeEncryptionReady condition is left as it is for the same reason.
            datapath.close()
            log.info("agent stopped; datapath left enforcing")
        return 0


def run_agent(settings: Settings, stop: threading.Event | None = None) -> int:
    """Run the agent until SIGTERM/SIGINT (or ``stop``). Configuration errors raise
    SettingsError before anything on the node is changed; the caller validated the flags and
    the client configuration (nodecryptor.commands.common.validate_run)."""
    from nodecryptor.datapath.select import choose_datapath

    logmod.setup(settings.log_format, settings.log_level)
    require_node_name(settings)
    stop = stop or threading.Event()
    agent = Agent(settings)  # binds the endpoints: a busy or bad address fails here

    try:
        datapath, why = choose_datapath(settings, agent.metrics)
    except NotSupported as e:
        agent.close()
        log.error("no usable datapath", extra=kv(error=str(e), datapath=settings.datapath))
        return 1
    except BaseException:
        agent.close()
        raise
    log.info("datapath selected", extra=kv(datapath=datapath.name, reason=why))

    def on_signal(signum, _frame):
        log.info("stopping", extra=kv(signal=signal.Signals(signum).name))
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    return agent.run(datapath, stop)
