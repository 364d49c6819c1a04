"""Settings of the agent: one frozen dataclass, each field documented (meaning, unit, default
and why). The CLI only translates flags into this object; nothing else reads flags."""

from __future__ import annotations

from dataclasses import dataclass, field

from .ports import PortRange, parse_port_spec

DEFAULT_EXEMPT_PORTS = "2379-2380,6443"


@dataclass(frozen=True)
class MapSizes:
    """Capacity of the BPF maps. Defaults fit 10,000 nodes with dual-stack pod CIDRs."""

    destinations_v4: int = 65536
    """IPv4 destination prefixes (node addresses + pod CIDRs). 10,000 nodes × (1 node IP + up to
    4 pod CIDRs) = 50,000 fits with head-room for churn while stale entries are pruned."""
    destinations_v6: int = 65536
    """IPv6 destination prefixes, sized like the IPv4 map for dual-stack clusters."""
    exempt_ports: int = 4096
    """(protocol, port) pairs; ranges are expanded port by port."""
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
