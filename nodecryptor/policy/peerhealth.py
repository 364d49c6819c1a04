"""Peer health and the ``NodeEncryptionReady`` condition, decided without I/O.

``PeerTracker.observe`` turns one reading of the WireGuard device (``WgState``) and the synced
CiliumNodes into one ``PeerView`` per remote node; the tracker remembers, per peer public key,
the last tx byte count and when it last grew, which is all the history "unreachable" needs.
``decide_condition`` turns what the agent knows about itself into the condition's status,
reason and message. Both are deterministic given their inputs and the ``now`` passed in
(seconds since the epoch, the clock WireGuard's handshake times use).

Peer states
  healthy       a peer covers the node, its key is the annotated one, and a handshake
                completed within UNREACHABLE_AFTER seconds.
  key-mismatch  the peer covering the node's addresses has another public key than the
                CiliumNode annotation ``network.cilium.io/wg-pub-key``: handshakes with the node
                cannot succeed (a stale key after a reboot, or an annotation not updated).
  missing       no peer's allowed-IPs cover any of the node's addresses or pod CIDRs.
  unreachable   bytes were sent to the peer (tx grew within the last UNREACHABLE_AFTER seconds)
                but no handshake completed within UNREACHABLE_AFTER seconds, although the
                sending has lasted that long.
  idle          nothing to judge: no recent traffic and no recent handshake, or traffic that
                started too recently for a handshake to be overdue.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from nodecryptor.core.model import NodeInfo, WgPeer, WgState

HEALTHY = "healthy"
KEY_MISMATCH = "key-mismatch"
MISSING = "missing"
UNREACHABLE = "unreachable"
IDLE = "idle"
STATES = (HEALTHY, KEY_MISMATCH, MISSING, UNREACHABLE, IDLE)

REKEY_AFTER_TIME = 120.0
"""WireGuard: a sender starts a new handshake once its session key is this old."""
REKEY_ATTEMPT_TIME = 90.0
"""WireGuard: how long a sender keeps retrying a handshake before it gives up."""
MARGIN = 30.0
"""Slack for the time between our readings (every few seconds), wireguard-go's and the
kernel's timer granularity (a few seconds) and clock skew between the two readings."""
UNREACHABLE_AFTER = REKEY_AFTER_TIME + REKEY_ATTEMPT_TIME + MARGIN
"""240 s. A peer that keeps receiving our traffic renews its session at least every
REKEY_AFTER_TIME, and a failed renewal is retried for REKEY_ATTEMPT_TIME: a sending peer whose
last handshake is older than their sum has failed a whole rekey attempt, not merely started
one. A shorter threshold would flag peers in the middle of a normal renewal."""


@dataclass(frozen=True)
class PeerView:
    """What ``nodecryptor status --peers`` shows for one remote node."""

    node: str
    state: str
    annotation_key: str | None
    """The key the CiliumNode announces (None: no or an invalid annotation)."""
    peer_key: str | None
    """The key of the peer whose allowed-IPs cover the node (None: no such peer)."""
    key_match: bool | None
    """None when there is nothing to compare (no annotation, or no covering peer)."""
    covered: tuple[str, ...]
    """The node's addresses and pod CIDRs the peer's allowed-IPs cover."""
    uncovered: tuple[str, ...]
    handshake_age: float | None
    """Seconds since the peer's last handshake; None when there never was one."""
    rx_bytes: int = 0
    tx_bytes: int = 0

    def as_dict(self) -> dict:
        return {
            "node": self.node,
            "state": self.state,
            "key_match": self.key_match,
            "annotation_key": self.annotation_key,
            "peer_key": self.peer_key,
            "last_handshake_age_seconds": (
                None if self.handshake_age is None else round(self.handshake_age, 1)
            ),
            "covered": list(self.covered),
            "uncovered": list(self.uncovered),
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
        }


@dataclass
class _Memory:
    tx: int
    grew_at: float | None = None
    """Last time tx was seen to grow."""
    sending_since: float | None = None
    """Start of the current run of sends without a fresh handshake."""


def _prefixes(node: NodeInfo, address_types: Iterable[str]) -> list:
    wanted = set(address_types)
    out = [ipaddress.ip_network(a) for kind, a in node.addresses if kind in wanted]
    out.extend(node.pod_cidrs)
    return list(dict.fromkeys(out))


def _covers(peer: WgPeer, prefix) -> bool:
    return any(net.version == prefix.version and prefix.subnet_of(net) for net in peer.allowed_ips)


def covering_peer(
    node: NodeInfo, peers: Iterable[WgPeer], address_types: Iterable[str]
) -> tuple[WgPeer | None, tuple[str, ...], tuple[str, ...]]:
    """The peer that carries traffic to ``node`` (the one whose allowed-IPs cover most of its
    prefixes, node addresses first; the annotated key wins a tie), with the covered and
    uncovered prefixes."""
    prefixes = _prefixes(node, address_types)
    best: tuple | None = None
    for peer in peers:
        hits = [p for p in prefixes if _covers(peer, p)]
        if not hits:
            continue
        addr_hits = sum(1 for p in hits if p.prefixlen == p.max_prefixlen)
        rank = (addr_hits, len(hits), peer.public_key == node.wg_public_key)
        if best is None or rank > best[0]:
            best = (rank, peer, hits)
    if best is None:
        return None, (), tuple(map(str, prefixes))
    hits = best[2]
    return best[1], tuple(map(str, hits)), tuple(str(p) for p in prefixes if p not in hits)


class PeerTracker:
    """Peer states across readings. The caller (the agent's health loop) owns one and calls
    ``observe`` with each reading; nothing else holds state."""

    def __init__(self) -> None:
        self._memory: dict[str, _Memory] = {}
        self.states: dict[str, str] = {}
        """node -> state at the last observation (transitions are counted against it)."""

    def observe(
        self,
        wg: WgState,
        nodes: Mapping[str, NodeInfo],
        local: str,
        address_types: Iterable[str],
        now: float,
    ) -> list[PeerView]:
        """One PeerView per remote node, sorted by name. Unreadable peers (``wg.peers`` is
        None) give no views: nothing is known about them."""
        if wg.peers is None:
            return []
        address_types = tuple(address_types)
        seen: dict[str, _Memory] = {}
        for peer in wg.peers:
            seen[peer.public_key] = self._remember(peer, now)
        self._memory = seen  # peers that left are forgotten
        views = []
        for name in sorted(nodes):
            if name == local:
                continue
            node = nodes[name]
            peer, covered, uncovered = covering_peer(node, wg.peers, address_types)
            views.append(
                self._view(
                    node, peer, covered, uncovered, seen.get(peer.public_key) if peer else None, now
                )
            )
        return views

    def _remember(self, peer: WgPeer, now: float) -> _Memory:
        old = self._memory.get(peer.public_key)
        mem = _Memory(tx=peer.tx_bytes)
        if old is not None:
            mem.grew_at, mem.sending_since = old.grew_at, old.sending_since
            if peer.tx_bytes > old.tx:
                mem.grew_at = now
            # tx smaller than before: the peer was re-created; its counters start over, and
            # the reading is a new baseline rather than growth.
        fresh = peer.last_handshake is not None and now - peer.last_handshake <= UNREACHABLE_AFTER
        if fresh or mem.grew_at is None or now - mem.grew_at > UNREACHABLE_AFTER:
            mem.sending_since = None
        elif mem.sending_since is None:
            mem.sending_since = mem.grew_at
        return mem

    @staticmethod
    def _view(
        node: NodeInfo, peer: WgPeer | None, covered, uncovered, mem: _Memory | None, now: float
    ) -> PeerView:
        if peer is None:
            return PeerView(
                node.name, MISSING, node.wg_public_key, None, None, covered, uncovered, None
            )
        key_match = None if node.wg_public_key is None else peer.public_key == node.wg_public_key
        age = None if peer.last_handshake is None else max(0.0, now - peer.last_handshake)
        if key_match is False:
            state = KEY_MISMATCH
        elif age is not None and age <= UNREACHABLE_AFTER:
            state = HEALTHY
        elif (
            mem is not None
            and mem.sending_since is not None
            and now - mem.sending_since > UNREACHABLE_AFTER
        ):
            state = UNREACHABLE
        else:
            state = IDLE
        return PeerView(
            node.name,
            state,
            node.wg_public_key,
            peer.public_key,
            key_match,
            covered,
            uncovered,
            age,
            peer.rx_bytes,
            peer.tx_bytes,
        )

    def transitions(self, views: Iterable[PeerView]) -> list[tuple[str, str | None, str]]:
        """(node, old state or None, new state) for every node whose state changed since the
        last call; remembers the new states."""
        new = {v.node: v.state for v in views}
        out = [(n, self.states.get(n), s) for n, s in new.items() if self.states.get(n) != s]
        self.states = new
        return out


def count_states(views: Iterable[PeerView]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for v in views:
        counts[v.state] += 1
    return counts


def oldest_handshake_age(views: Iterable[PeerView]) -> float:
    """Age of the oldest handshake among peers that carry traffic (healthy or unreachable);
    0 when there is none. A peer that never handshook while sending counts as infinitely old
    and is reported by the unreachable count instead, so it is skipped here."""
    ages = [
        v.handshake_age
        for v in views
        if v.state in (HEALTHY, UNREACHABLE) and v.tx_bytes > 0 and v.handshake_age is not None
    ]
    return max(ages, default=0.0)


# ------------------------------------------------------------------------------------------
# The Node condition

CONDITION_TYPE = "NodeEncryptionReady"

READY = "EncryptionReady"
WIREGUARD_DOWN = "WireGuardDown"
DATAPATH_NOT_READY = "DatapathNotReady"
SYNC_STALE = "SyncStale"
UNCOVERED = "UncoveredDestinations"
PEER_KEY_MISMATCH = "PeerKeyMismatch"
PEERS_UNREACHABLE = "PeersUnreachable"
DESTINATIONS_WITHOUT_KEY = "DestinationsWithoutKey"
REASONS = (
    READY,
    WIREGUARD_DOWN,
    DATAPATH_NOT_READY,
    SYNC_STALE,
    UNCOVERED,
    PEER_KEY_MISMATCH,
    PEERS_UNREACHABLE,
    DESTINATIONS_WITHOUT_KEY,
)

UNCOVERED_HOLD = 60.0
"""Seconds destinations must stay uncovered before the condition says so. A joining node's
destinations are uncovered on every other node until Cilium adds its peer (seconds): without
the hold, each join would flip the condition of the whole cluster twice."""
KEY_MISMATCH_HOLD = 60.0
"""The same for a key mismatch: after a node's reboot Cilium updates the annotation and every
peer within seconds; a mismatch that outlives a minute is the stale-key failure."""


@dataclass(frozen=True)
class NodeFacts:
    """What the agent knows about its own enforcement, read by its health loop."""

    wg_usable: bool
    wg_problem: str = ""
    synced: bool = True
    applied: bool = True
    datapath_ready: bool = True
    datapath_problem: str = ""
    sync_failing_for: float = 0.0
    """Seconds the CiliumNode sync has been failing without a success in between."""
    uncovered: int = 0
    """Uncovered destinations of nodes that published a WireGuard key: the local Cilium
    should have a peer for them (a local fault)."""
    uncovered_for: float = 0.0
    keyless: tuple[str, ...] = ()
    """Nodes with uncovered destinations that published no key (no CiliumNode, or no key
    annotation): their own fault, reported without turning the condition False, so one
    forged or broken object cannot flip every node's condition."""
    fail_mode: str = "closed"
    peer_counts: Mapping[str, int] = field(default_factory=dict)
    mismatched: tuple[str, ...] = ()
    mismatch_for: float = 0.0
    """Seconds some peer has been in key-mismatch without interruption."""
    unreachable: tuple[str, ...] = ()


@dataclass(frozen=True)
class Condition:
    status: str  # "True" or "False"
    reason: str
    message: str

    @property
    def key(self) -> tuple[str, str]:
        """What a write is decided on: the message alone never causes one."""
        return self.status, self.reason


def _names(names: tuple[str, ...], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def decide_condition(f: NodeFacts, sync_stale_after: float) -> Condition:
    """The condition for ``f``. The first problem in this order wins: the local datapath's
    ability to encrypt first (WireGuard, the datapath, the sync), then the coverage of remote
    destinations, then the health of individual peers, which leaves the status True: a remote
    node's broken key or dead link is that node's fault, and a False condition on every other
    node (a taint, for a Node Readiness rule) would spread one node's failure cluster-wide."""
    if not f.wg_usable:
        return Condition(
            "False",
            WIREGUARD_DOWN,
            f"WireGuard device not usable: {f.wg_problem or 'absent or down'}; "
            f"cluster traffic is {'dropped' if f.fail_mode == 'closed' else 'sent in the clear'}",
        )
    if not f.synced:
        return Condition("False", SYNC_STALE, "no complete list of CiliumNodes yet")
    if not f.applied or not f.datapath_ready:
        return Condition(
            "False",
            DATAPATH_NOT_READY,
            f"the datapath does not enforce the desired state: "
            f"{f.datapath_problem or 'not applied yet'}",
        )
    if f.sync_failing_for > sync_stale_after:
        return Condition(
            "False",
            SYNC_STALE,
            f"CiliumNode sync failing for {f.sync_failing_for:.0f}s; the last known "
            f"state keeps being enforced but may miss new nodes or keys",
        )
    if f.uncovered and f.uncovered_for >= UNCOVERED_HOLD:
        return Condition(
            "False",
            UNCOVERED,
            f"{f.uncovered} destinations have no WireGuard peer "
            f"({'dropped' if f.fail_mode == 'closed' else 'sent in the clear'}) "
            f"for {f.uncovered_for:.0f}s",
        )
    counts = ", ".join(f"{n} {s}" for s, n in f.peer_counts.items() if n)
    if f.mismatched and f.mismatch_for >= KEY_MISMATCH_HOLD:
        return Condition(
            "True",
            PEER_KEY_MISMATCH,
            f"encrypting; peers with a key other than their CiliumNode "
            f"annotation: {_names(f.mismatched)} (peers: {counts})",
        )
    if f.keyless:
        return Condition(
            "True",
            DESTINATIONS_WITHOUT_KEY,
            f"encrypting; nodes without a published WireGuard key, whose "
            f"destinations are {'dropped' if f.fail_mode == 'closed' else 'sent in the clear'}: "
            f"{_names(f.keyless)}",
        )
    if f.unreachable:
        return Condition(
            "True",
            PEERS_UNREACHABLE,
            f"encrypting; no handshake for {UNREACHABLE_AFTER:.0f}s although "
            f"traffic was sent: {_names(f.unreachable)} (peers: {counts})",
        )
    return Condition(
        "True",
        READY,
        "WireGuard up and the datapath enforces the desired state"
        + (f" (peers: {counts})" if counts else ""),
    )
