"""Prometheus metrics. One Metrics object per agent, built on an injected registry so tests use
a fresh one. Datapath counters are read at scrape time by collectors the backends register."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import choose_encoder

from nodecryptor.policy.admission import REASONS
from nodecryptor.policy.peerhealth import STATES as PEER_STATES

PREFIX = "nodecryptor"
PROGRAM_LOAD_RESULTS = ("ok", "compile_error", "load_error")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.nodes = Gauge(f"{PREFIX}_nodes", "CiliumNodes known, by role.", ["role"], registry=r)
        self.destinations = Gauge(
            f"{PREFIX}_destinations",
            "Remote prefixes encrypted, by kind and family.",
            ["kind", "family"],
            registry=r,
        )
        self.reconciles = Counter(
            f"{PREFIX}_reconciles_total",
            "Reconcile passes, by result (ok, error).",
            ["result"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            f"{PREFIX}_reconcile_duration_seconds",
            "Duration of a reconcile pass.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.watch_restarts = Counter(
            f"{PREFIX}_watch_restarts_total",
            "Restarts of the CiliumNode watch, by cause.",
            ["cause"],
            registry=r,
        )
        self.node_watch_restarts = Counter(
            f"{PREFIX}_node_watch_restarts_total",
            "Restarts of the v1 Node watch (control-plane role labels), by cause.",
            ["cause"],
            registry=r,
        )
        self.last_sync = Gauge(
            f"{PREFIX}_last_sync_timestamp_seconds",
            "Unix time of the last complete list of CiliumNodes.",
            registry=r,
        )
        self.last_apply = Gauge(
            f"{PREFIX}_last_apply_timestamp_seconds",
            "Unix time the datapath last matched the desired state.",
            registry=r,
        )
        self.datapath = Info(
            f"{PREFIX}_datapath", "Active datapath and why it was chosen.", registry=r
        )
        self.wg_up = Gauge(
            f"{PREFIX}_wireguard_up", "1 when the WireGuard device is present and up.", registry=r
        )
        self.wg_peers = Gauge(
            f"{PREFIX}_wireguard_peers", "Peers on the WireGuard device.", registry=r
        )
        self.uncovered = Gauge(
            f"{PREFIX}_uncovered_destinations",
            "Destinations no WireGuard peer's allowed-IPs cover.",
            registry=r,
        )
        self.rejected = Counter(
            f"{PREFIX}_invalid_entries_total",
            "CiliumNode entries skipped as invalid, by field.",
            ["field"],
            registry=r,
        )
        self.capacity_refused = Counter(
            f"{PREFIX}_capacity_refused_total",
            "Desired states refused as a whole because they exceed the datapath's hard "
            "capacity (the previous state keeps enforcing).",
            registry=r,
        )
        self.datapath_capacity = Gauge(
            f"{PREFIX}_datapath_capacity",
            "Destination entries the BPF maps hold at most now, by family (grows with the "
            "cluster up to the hard cap).",
            ["family"],
            registry=r,
        )
        self.ready = Gauge(f"{PREFIX}_ready", "1 when /readyz reports ready.", registry=r)
        self.ingress_supported = Gauge(
            f"{PREFIX}_ingress_enforcement_supported",
            "1 when the active datapath classifies clear text arriving from cluster peers "
            "(BPF), 0 when it cannot (ip rules: --ingress-enforcement has no effect).",
            registry=r,
        )
        self.rejected_claims = Counter(
            f"{PREFIX}_rejected_claims_total",
            "CiliumNode entries rejected and claim conflicts reported, by reason; each is "
            "counted once while it persists.",
            ["reason"],
            registry=r,
        )
        for reason in REASONS:
            self.rejected_claims.labels(reason=reason)
        self.watch_stalls = Counter(
            f"{PREFIX}_k8s_watch_stalls_total",
            "CiliumNode watch or list requests abandoned because the "
            "API server sent nothing within their read timeout (the "
            "stall threshold for a watch).",
            registry=r,
        )

        self.pod_pools_known = Gauge(
            f"{PREFIX}_pod_pools_known",
            "1 while Cilium's configuration (cilium-config ConfigMap, CiliumPodIPPools) names "
            "the cluster's pod pools; 0: pod CIDR claims are bounded by --cluster-pod-cidrs or "
            "the breadth limit only.",
            registry=r,
        )
        self.exemption_crd_missing = Gauge(
            f"{PREFIX}_exemption_crd_missing",
            "1 while the EncryptionExemption CRD is not installed (only the built-in policy "
            "applies).",
            registry=r,
        )
        self.exemption_watch_restarts = Counter(
            f"{PREFIX}_exemption_watch_restarts_total",
            "EncryptionExemption list/watch restarts, by cause.",
            ["cause"],
            registry=r,
        )
        # Peer health (nodecryptor.policy.peerhealth): per state, never per peer, so the series
        # count does not grow with the cluster (every node exports them).
        self.peers = Gauge(
            f"{PREFIX}_peers", "Remote nodes by WireGuard peer state.", ["state"], registry=r
        )
        self.peer_transitions = Counter(
            f"{PREFIX}_peer_transitions_total",
            "Remote nodes entering a peer state.",
            ["state"],
            registry=r,
        )
        for state in PEER_STATES:
            self.peers.labels(state=state)
            self.peer_transitions.labels(state=state)
        self.oldest_handshake = Gauge(
            f"{PREFIX}_peer_oldest_handshake_age_seconds",
            "Age of the oldest WireGuard handshake among peers that carry traffic (0: none).",
            registry=r,
        )
        self.condition_writes = Counter(
            f"{PREFIX}_node_condition_writes_total",
            "PATCHes of the NodeEncryptionReady condition, by result (ok, error).",
            ["result"],
            registry=r,
        )
        for result in ("ok", "error"):
            self.condition_writes.labels(result=result)
        # Every start compiles the program anew (nothing reuses a loaded one), and so does every
        # growth of the maps: loads per hour, across restarts, show a compile storm.
        self.program_loads = Counter(
            f"{PREFIX}_bpf_program_loads_total",
            "BPF program compile-and-load attempts by this agent process, by result (ok, "
            "compile_error, load_error: the kernel refused it, the verifier almost always).",
            ["result"],
            registry=r,
        )
        for result in PROGRAM_LOAD_RESULTS:
            self.program_loads.labels(result=result)
        self.program_loaded = Gauge(
            f"{PREFIX}_bpf_program_loaded_timestamp_seconds",
            "Unix time of the last successful BPF program load (0: none by this process); "
            "changes() of it counts loads across agent restarts.",
            registry=r,
        )
        self.program_load_duration = Gauge(
            f"{PREFIX}_bpf_program_load_duration_seconds",
            "Seconds the last successful BPF compile-and-load took.",
            registry=r,
        )

    def record_program_load(self, result: str, seconds: float = 0.0) -> None:
        """One compile-and-load attempt; an unknown result counts as load_error so the label
        set stays fixed."""
        result = result if result in PROGRAM_LOAD_RESULTS else "load_error"
        self.program_loads.labels(result=result).inc()
        if result == "ok":
            self.program_loaded.set(time.time())
            self.program_load_duration.set(seconds)

    def record_rejections(self, rejections) -> None:
        """Entries the parser skipped (counted by field, and by reason)."""
        for rej in rejections:
            # The field without list indices keeps the label set small.
            field = rej.field.split("[")[0]
            self.rejected.labels(field=field).inc()
        self.record_claim_rejections(rejections)

    def record_claim_rejections(self, rejections) -> None:
        for rej in rejections:
            # An unknown reason would grow the label set: count it as malformed.
            reason = rej.reason if rej.reason in REASONS else "malformed"
            self.rejected_claims.labels(reason=reason).inc()


def count_program_load(metrics: Metrics | None, result: str, seconds: float = 0.0) -> None:
    """``metrics.record_program_load`` for callers whose metrics are optional."""
    if metrics is not None:
        metrics.record_program_load(result, seconds)


def metrics_server(
    registry: CollectorRegistry,
    bind: str,
    *,
    flag: str = "--metrics-server-bind-address",
    max_connections: int = 64,
    request_seconds: float = 5.0,
):
    """/metrics for ``registry`` on ``bind``, on the hardened endpoint server rather than
    prometheus_client's own (a thread per connection, no deadlines). Listening starts now (a
    bad address raises SettingsError naming ``flag``); call ``start()`` to answer."""
    from nodecryptor.observe.httpserver import EndpointServer, Request, Response

    def handle(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept"))
        return Response(200, content_type, encoder(registry))

    return EndpointServer(
        bind,
        {"/metrics": handle},
        flag=flag,
        max_connections=max_connections,
        request_seconds=request_seconds,
        name="metrics",
    )
