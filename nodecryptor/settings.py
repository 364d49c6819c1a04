"""Settings of the agent: one frozen dataclass, each field documented (meaning, unit, default
and why). The CLI only translates flags into this object; nothing else reads flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from .ports import PortRange, parse_port_spec

DEFAULT_EXEMPT_PORTS = "2379-2380,6443"


MAX_EXEMPT_PORT_RANGES = 16
"""Exempt port ranges (after merging) the BPF program scans; a range costs the same as one
port, so ``1-65535`` is one entry. ``--control-plane-exempt-ports`` is checked against it."""


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


@dataclass(frozen=True)
class Settings:
    """Everything that shapes nodecryptor's behaviour on one node."""

    node_name: str = ""
    """Name of the local node (its CiliumNode object). Flag --node-name, or NODE_NAME."""

    exempt_ports: tuple[PortRange, ...] = field(
        default_factory=lambda: parse_port_spec(DEFAULT_EXEMPT_PORTS))
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

    datapath: str = "auto"
    """"bpf", "iprule", or "auto" (BPF when it compiles, loads and attaches; else ip rules)."""

    wg_interface: str = "cilium_wg0"
    """Cilium's WireGuard device."""

    devices: tuple[str, ...] = ()
    """Underlay devices to attach to. Empty: detected from the routes to remote node addresses."""

    fail_mode: str = "closed"
    """"closed": cluster traffic that cannot be encrypted (WireGuard down or absent, destination
    no peer covers) is dropped; exemptions still pass. "open": it leaves in the clear."""

    bpffs: str = "/sys/fs/bpf"
    """bpffs mount; nodecryptor keeps every pin under <bpffs>/nodecryptor/."""

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
    """Server-side watch timeout; the client reads with a timeout a little above this so a
    stalled connection is noticed."""

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
    """Routing table id nodecryptor owns in ip-rule mode; no other table is ever modified."""

    map_sizes: MapSizes = field(default_factory=MapSizes)
    """Capacity of the BPF maps."""

    log_format: str = "text"
    """"text" or "json"."""

    log_level: str = "info"
    """debug, info, warning or error."""
