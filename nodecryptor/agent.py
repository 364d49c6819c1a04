"""Wiring of the agent (`nodecryptor run`): store, Kubernetes sync, datapath selection,
reconcile loop, link watcher, health and metrics endpoints, and an orderly shutdown that
leaves the datapath enforcing (fail-static)."""

from __future__ import annotations

import logging
import signal
import threading

from prometheus_client import start_http_server

from . import log as logmod
from .errors import NotSupported
from .health import HealthServer, parse_bind
from .log import kv
from .metrics import Metrics
from .netwatch import LinkWatcher
from .reconcile import Reconciler
from .settings import RoleSource, Settings, require_node_name
from .store import Store

log = logging.getLogger("nodecryptor.agent")


def run_agent(settings: Settings, stop: threading.Event | None = None) -> int:
    from .datapath.select import choose_datapath
    from .k8s import CiliumNodeSync, NodeRoleSync

    logmod.setup(settings.log_format, settings.log_level)
    require_node_name(settings)
    stop = stop or threading.Event()
    metrics = Metrics()
    store = Store()

    try:
        datapath, why = choose_datapath(settings, metrics)
    except NotSupported as e:
        log.error("no usable datapath", extra=kv(error=str(e), datapath=settings.datapath))
        return 1
    log.info("datapath selected", extra=kv(datapath=datapath.name, reason=why))

    reconciler = Reconciler(settings, store, datapath, metrics)
    health = HealthServer(settings.health_bind, reconciler.alive, reconciler.ready,
                          on_ready=lambda ok: metrics.ready.set(1 if ok else 0)).start()
    host, port = parse_bind(settings.metrics_bind)
    metrics_http, _ = start_http_server(port, addr=host or "0.0.0.0", registry=metrics.registry)

    def on_signal(signum, _frame):
        log.info("stopping", extra=kv(signal=signal.Signals(signum).name))
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    sync = CiliumNodeSync(settings, store, metrics)

    def watched_links() -> set[str]:
        # The WireGuard device plus whatever underlay devices the last pass attached to
        # (detected ones included), so a re-created device triggers a re-attach.
        last = reconciler.last_desired
        return {settings.wg_interface, *settings.devices,
                *(d.name for d in (last.devices if last else ()))}

    watcher = LinkWatcher(store.changed, names=watched_links)
    threads = [threading.Thread(target=sync.run, args=(stop,), name="k8s-sync", daemon=True),
               threading.Thread(target=watcher.run, args=(stop,), name="netwatch", daemon=True)]
    if settings.role_source == RoleSource.NODE:
        # Control-plane roles from the v1 Nodes' labels (see NodeRoleSync).
        roles = NodeRoleSync(settings, store, metrics)
        threads.append(threading.Thread(target=roles.run, args=(stop,), name="k8s-node-roles",
                                        daemon=True))
    for t in threads:
        t.start()
    log.info("agent started", extra=kv(node=settings.node_name, datapath=datapath.name,
                                       health=settings.health_bind, metrics=settings.metrics_bind))
    try:
        reconciler.run(stop, store.changed)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
        health.stop()
        metrics_http.shutdown()
        # Leave links, filters, rules and pinned maps in place: the node keeps enforcing the
        # last applied state until the next agent takes over (fail-static).
        datapath.close()
        log.info("agent stopped; datapath left enforcing")
    return 0
