"""Settings of the agent: one frozen dataclass, each field documented (meaning, unit, default
and why). The CLI only translates flags into this object; nothing else reads flags."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Union

from nodecryptor.core.errors import SettingsError
from nodecryptor.core.ports import PortRange, parse_port_spec

DEFAULT_EXEMPT_PORTS = "2379-2380,6443"


MAX_EXEMPT_PORT_RANGES = 16
"""Exempt port ranges (after merging) of one exemption policy, the built-in one
(``--control-plane-exempt-ports``) included; a range costs the same as one port, so
``1-65535`` is one entry. All policies together hold at most 64 (exemptions.MAX_RANGES, what
the BPF program scans)."""


class RoleSource(StrEnum):
    """Which object the control-plane role labels are read from (``--role-source``)."""

    NODE = "node"
    """The v1 Node: NodeRestriction keeps kubelets from setting node-role labels."""
    CILIUMNODE = "ciliumnode"
    """The CiliumNode: any Cilium agent may rewrite it (clusters without NodeRestriction)."""


class FailMode(StrEnum):
    """What happens to cluster traffic that cannot be encrypted (``--fail-mode``)."""

    CLOSED = "closed"
    """Dropped; the bootstrap exemptions still pass."""
    OPEN = "open"
    """Sent in the clear, as if nodecryptor were not installed."""


class IngressEnforcement(StrEnum):
    """What the ingress program does with clear text from cluster peers
    (``--ingress-enforcement``; the rollout path is audit everywhere, then enforce)."""

    OFF = "off"
    """Passed and not counted as a leak."""
    AUDIT = "audit"
    """Passed, counted and listed (``status --leaks``)."""
    ENFORCE = "enforce"
    """Dropped, counted and listed; the bootstrap flows still pass."""


class DatapathMode(StrEnum):
    """Which datapath enforces (``--datapath``); BPF and IPRULE also name the backends."""

    AUTO = "auto"
    """BPF when it compiles, loads and attaches; otherwise ip rules."""
    BPF = "bpf"
    """The tc BPF program, or fail."""
    IPRULE = "iprule"
    """Policy routing into the WireGuard device."""


@dataclass(frozen=True)
class MapSizes:
    """Capacity of the BPF maps. The destination maps start at the initial size, are sized
    from the desired state with head-room and grow (a new generation of maps, then an atomic
    program swap) as the cluster grows, up to ``destinations_max``."""

    destinations_v4: int = 16384
    """Initial capacity of the IPv4 destination map (node addresses + pod CIDRs). A restarted
    agent starts from the capacity the previous one had grown to."""
    destinations_v6: int = 16384
    """Initial capacity of the IPv6 destination map."""
    destinations_max: int = 262144
    """Hard cap per family. A desired state with more destinations of one family is refused as
    a whole (the previous state keeps enforcing, readiness false): 50,000 nodes with one
    address and four pod CIDRs each fit. Kernel memory is about 100 bytes per entry in use."""
    headroom_percent: int = 25
    """Spare capacity added when the maps are (re)sized, so joining nodes rarely force a
    growth; capacities are powers of two."""
    local_addresses: int = 256
    """Addresses of the local node (both families)."""
    fragments: int = 8192
    """LRU of first-fragment verdicts, keyed by (src, dst, IP id, protocol)."""


DEFAULT_WG_INTERFACE = "cilium_wg0"
"""The WireGuard device Cilium creates."""


@dataclass(frozen=True)
class Settings:
    """Everything that shapes nodecryptor's behaviour on one node."""

    node_name: str = ""
    """Name of the local node (its CiliumNode object). Flag --node-name, or NODE_NAME."""

    exempt_ports: tuple[PortRange, ...] = field(
        default_factory=lambda: parse_port_spec(DEFAULT_EXEMPT_PORTS)
    )
    """Ports that stay in the clear to and from control-plane nodes: kube-apiserver (6443) and
    etcd (2379-2380) are what a rebooted control-plane node needs before it can publish its new
    WireGuard key; both are TLS-protected. TCP unless an entry is prefixed (udp/, sctp/)."""

    control_plane_labels: tuple[str, ...] = (
        "node-role.kubernetes.io/control-plane",
        "node-role.kubernetes.io/master",
    )
    """A node is control-plane when any of these labels is present, whatever its value
    (kubeadm sets an empty value, k3s "true"; the seed matched only "true", a bug)."""

    address_types: tuple[str, ...] = ("InternalIP",)
    """CiliumNode spec.addresses types that count as node addresses to encrypt towards."""

    role_source: RoleSource = RoleSource.NODE
    """Where the control-plane labels are read: "node" (default), the v1 Node objects, whose
    node-role.kubernetes.io/* labels the NodeRestriction admission plugin keeps kubelets from
    setting; or "ciliumnode", the CiliumNode objects, which any Cilium agent may rewrite (only
    for clusters without NodeRestriction). Until a node's Node is known it is a worker: its
    traffic is encrypted, the safe direction."""

    pod_cidr_min_prefix_v4: int = 16
    """Shortest prefix length accepted for an IPv4 pod CIDR of another node. Node pod CIDRs
    are /24-/26 in practice; anything broader than /16 would cover addresses outside the
    cluster."""

    pod_cidr_min_prefix_v6: int = 48
    """Shortest prefix length accepted for an IPv6 pod CIDR (nodes get /64-/120)."""

    cluster_pod_cidrs: tuple[Union[ipaddress.IPv4Network, ipaddress.IPv6Network], ...] = ()
    """The cluster's pod ranges, overriding what Cilium's configuration says (the
    cilium-config ConfigMap, CiliumPodIPPools). A pod CIDR claim of a family with a range
    must lie inside one of that family's ranges; a family without a range is not checked (only
    the breadth limit applies to it), so naming only the IPv4 range never drops IPv6
    encryption."""

    cilium_namespace: str = "kube-system"
    """The namespace of Cilium's ``cilium-config`` ConfigMap, read for the pod pools."""

    datapath: DatapathMode = DatapathMode.AUTO
    """DatapathMode.BPF, IPRULE, or AUTO (BPF when it compiles, loads and attaches; else ip
    rules)."""

    wg_interface: str = DEFAULT_WG_INTERFACE
    """Cilium's WireGuard device."""

    devices: tuple[str, ...] = ()
    """Underlay devices to attach to. Empty: detected from the routes to remote node addresses."""

    fail_mode: FailMode = FailMode.CLOSED
    ingress_enforcement: IngressEnforcement = IngressEnforcement.AUDIT
    """CLOSED: cluster traffic that cannot be encrypted (WireGuard down or absent, destination
    no peer covers) is dropped; exemptions still pass. OPEN: it leaves in the clear."""

    bpffs: str = "/sys/fs/bpf"
    """bpffs mount; nodecryptor keeps every pin under <bpffs>/nodecryptor/."""

    run_dir: str = "/run/nodecryptor"
    """Directory where the agent records which datapath it chose and why (``datapath.json``),
    for ``nodecryptor status`` in another process. The DaemonSet mounts a small emptyDir here;
    a read-only directory only loses that status line."""

    kubeconfig: str | None = None
    """Path to a kubeconfig; None means in-cluster service-account configuration."""

    health_bind: str = ":8083"
    """host:port of /healthz and /readyz (host empty = all addresses)."""

    metrics_bind: str = ":8084"
    """host:port of the Prometheus /metrics endpoint."""

    noop_route: bool = False
    """Create the seed's dummy device and route (compatibility only; see docs)."""

    resync_seconds: float = 300.0
    """Seconds between full re-lists of CiliumNodes (a safety net under the watch)."""

    reconcile_seconds: float = 30.0
    """Seconds between full reconciles even when nothing changed (repairs drift)."""

    coverage_recheck_seconds: float = 1.0
    """Seconds between passes while WireGuard is unusable or some destination is not covered by
    any peer. Peer changes raise no netlink event, and a node can join (CiliumNode seen) before
    Cilium has added its peer; without this, its traffic stayed dropped (fail-closed) until the
    next periodic pass."""

    debounce_seconds: float = 0.2
    """Quiet time after a change before reconciling, so bursts of events apply once."""

    watch_timeout_seconds: int = 300
    """Upper bound of the server-side watch timeout (``timeoutSeconds``). Watches usually end
    sooner, a few seconds before ``watch_stall_seconds``; see there."""

    watch_stall_seconds: float = 55.0
    """A watch, or the request opening it, that delivers nothing (no event, bookmark or end of
    stream) for this many seconds is abandoned as stalled: counted
    (nodecryptor_k8s_watch_stalls_total) and opened again from the last resourceVersion while
    the store keeps its content. This catches an API server that accepts connections but never
    answers, or freezes mid-watch, within a minute instead of the watch timeout.
    kube-apiserver sends a bookmark only about once a minute, but also just before a watch's
    deadline, and then ends it; so that a quiet, healthy watch is never taken for a stalled
    one, the agent asks for ``timeoutSeconds`` a few seconds below this value. The price is a
    new watch request per node every ~50 s (10,000 nodes: ~200 per second, served from the
    API server's watch cache); raise it (flag --watch-stall-seconds) to trade detection time
    for fewer requests."""

    sync_stale_seconds: float = 150.0
    """/healthz fails when the CiliumNode sync loop has not turned for this long (or its thread
    is gone). Every step of the loop is bounded (request timeouts, the stall threshold, a
    backoff of at most 60 s), so a healthy loop, even during an API outage, turns well within
    this; a loop that does not is stuck, and a restart is the remedy."""

    endpoint_max_connections: int = 64
    """Open connections each endpoint server (health, metrics) keeps; accepting one more closes
    the oldest, so a flood of idle connections cannot lock out the kubelet's probe and file
    descriptors stay bounded."""

    endpoint_request_seconds: float = 5.0
    """Seconds a connection to the health or metrics endpoint gets to send a complete request
    (and again to read the answer), however slowly it sends: slow clients are closed."""

    request_timeout_seconds: float = 15.0
    """Client-side timeout of list requests and of connecting."""

    list_page_size: int = 500
    """Objects per paginated list request (limit/continue)."""

    heartbeat_stale_seconds: float = 90.0
    """/healthz fails when the reconcile loop has not completed a pass for this long."""

    iprule_priority_base: int = 10300
    """First ip-rule priority of nodecryptor's band (it owns base..base+99 and touches no other
    rule). Chosen well above the low priorities Cilium installs and below main (32766)."""

    iprule_table: int = 2026
    """Routing table id nodecryptor owns in ip-rule mode, together with the next id (the guard
    table of remote pod CIDRs); no other table is ever modified."""

    take_over_pod_to_pod: bool = False
    """Redirect local-pod to remote-pod traffic into WireGuard in nodecryptor instead of leaving
    it to Cilium (which encrypts it itself, with its identity mark, policy and Hubble). Off by
    default; see the operator guide for the trade-off."""

    map_sizes: MapSizes = field(default_factory=MapSizes)
    """Capacity of the BPF maps."""

    log_format: str = "text"
    """"text" or "json"."""

    log_level: str = "info"
    """debug, info, warning or error."""

    def __post_init__(self) -> None:
        # Plain strings (from code or JSON) become the enums, so every later comparison is
        # between enum members; an unknown value names the flag.
        for name, enum, flag in (
            ("fail_mode", FailMode, "--fail-mode"),
            ("ingress_enforcement", IngressEnforcement, "--ingress-enforcement"),
            ("datapath", DatapathMode, "--datapath"),
            ("role_source", RoleSource, "--role-source"),
        ):
            value = getattr(self, name)
            if not isinstance(value, enum):
                try:
                    object.__setattr__(self, name, enum(value))
                except ValueError:
                    raise SettingsError(
                        flag, value, "expected one of " + ", ".join(m.value for m in enum)
                    ) from None
        ns = self.cilium_namespace
        if not (
            isinstance(ns, str)
            and 0 < len(ns) <= 63
            and ns.replace("-", "").isalnum()
            and ns == ns.lower()
            and ns[0] != "-"
            and ns[-1] != "-"
            and ns.isascii()
        ):
            raise SettingsError("--cilium-namespace", ns, "not a namespace name (a DNS label)")


def require_node_name(settings: Settings) -> None:
    """The agent and ``plan`` act for one node; without its name nothing can be decided."""
    if not settings.node_name:
        raise SettingsError("--node-name", "", "required (or set NODE_NAME)")
