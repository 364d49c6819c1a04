"""Prometheus metrics. One Metrics object per agent, built on an injected registry so tests use
a fresh one. Datapath counters are read at scrape time by collectors the backends register."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

PREFIX = "nodecryptor"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.nodes = Gauge(f"{PREFIX}_nodes", "CiliumNodes known, by role.", ["role"], registry=r)
        self.destinations = Gauge(f"{PREFIX}_destinations",
                                  "Remote prefixes encrypted, by kind and family.",
                                  ["kind", "family"], registry=r)
        self.reconciles = Counter(f"{PREFIX}_reconciles_total",
                                  "Reconcile passes, by result (ok, error).", ["result"],
                                  registry=r)
        self.reconcile_duration = Histogram(
            f"{PREFIX}_reconcile_duration_seconds", "Duration of a reconcile pass.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.watch_restarts = Counter(f"{PREFIX}_watch_restarts_total",
                                      "Restarts of the CiliumNode watch, by cause.", ["cause"],
                                      registry=r)
        self.last_sync = Gauge(f"{PREFIX}_last_sync_timestamp_seconds",
                               "Unix time of the last complete list of CiliumNodes.", registry=r)
        self.last_apply = Gauge(f"{PREFIX}_last_apply_timestamp_seconds",
                                "Unix time the datapath last matched the desired state.",
                                registry=r)
        self.datapath = Info(f"{PREFIX}_datapath", "Active datapath and why it was chosen.",
                             registry=r)
        self.wg_up = Gauge(f"{PREFIX}_wireguard_up",
                           "1 when the WireGuard device is present and up.", registry=r)
        self.wg_peers = Gauge(f"{PREFIX}_wireguard_peers", "Peers on the WireGuard device.",
                              registry=r)
        self.uncovered = Gauge(f"{PREFIX}_uncovered_destinations",
                               "Destinations no WireGuard peer's allowed-IPs cover.", registry=r)
        self.rejected = Counter(f"{PREFIX}_invalid_entries_total",
                                "CiliumNode entries skipped as invalid, by field.", ["field"],
                                registry=r)
        self.capacity_refused = Counter(
            f"{PREFIX}_capacity_refused_total",
            "Desired states refused as a whole because they exceed the datapath's hard "
            "capacity (the previous state keeps enforcing).", registry=r)
        self.datapath_capacity = Gauge(
            f"{PREFIX}_datapath_capacity",
            "Destination entries the BPF maps hold at most now, by family (grows with the "
            "cluster up to the hard cap).", ["family"], registry=r)
        self.ready = Gauge(f"{PREFIX}_ready", "1 when /readyz reports ready.", registry=r)

    def record_rejections(self, rejections) -> None:
        for rej in rejections:
            # The field without list indices keeps the label set small.
            field = rej.field.split("[")[0]
            self.rejected.labels(field=field).inc()
