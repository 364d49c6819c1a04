"""The agent's encryption-health loop: every few seconds, read the WireGuard device, judge every
peer (policy.peerhealth), export the per-state metrics, decide ``NodeEncryptionReady`` and
hand it to the condition writer, and record the peer table in the run directory for
``nodecryptor status --peers``.

It runs on its own thread and only reads what the reconcile loop and the sync already hold (the
store, the reconciler's last pass, the sync's failure count) plus its own reading of the device,
so a slow API or a slow pass never delays it, and it never delays them. The condition writer's
``submit`` does not block either.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from nodecryptor.policy import peerhealth as ph
from nodecryptor.node import wireguard
from nodecryptor.core.log import kv
from nodecryptor.core.runfiles import read_json_object, write_json
from nodecryptor.observe.metrics import Metrics
from nodecryptor.core.model import WgState
from nodecryptor.core.settings import Settings
from nodecryptor.cluster.store import Store

log = logging.getLogger(__name__)

CHECK_SECONDS = 5.0
"""How often the device is read and the peers judged: WireGuard going down shows in the
condition within this (plus the writer's minimum interval between writes)."""
PEERS_FILE = "peers.json"
STARTUP_GRACE = 30.0
"""Seconds after start during which a condition that only says "not synced or applied yet"
is not published: a normal start then writes True once instead of False, then True (two
writes and an Event per agent restart, 20,000 writes for a rolling update at 10,000 nodes).
After the grace, or at once for any other reason, whatever holds is published."""


def peers_path(settings: Settings) -> str:
    return os.path.join(settings.run_dir, PEERS_FILE)


def read_peers_file(settings: Settings) -> dict[str, object] | None:
    """The table the agent last recorded, or None when there is none."""
    return read_json_object(peers_path(settings))


def split_uncovered(desired, nodes) -> tuple[int, tuple[str, ...]]:
    """(uncovered destinations of nodes that published a WireGuard key, names of the nodes
    with uncovered destinations that published none). A node without a key cannot have a
    peer: that is its fault (or a forged object's), not the local node's."""
    if desired is None:
        return 0, ()
    keyed, keyless = 0, set()
    for dest in desired.destinations:
        if dest.prefix not in desired.uncovered:
            continue
        node = nodes.get(dest.node)
        if node is None or not node.has_ciliumnode or not node.wg_public_key:
            keyless.add(dest.node)
        else:
            keyed += 1
    return keyed, tuple(sorted(keyless))


class PeerMonitor:
    """One ``check`` per CHECK_SECONDS. ``reconciler`` and ``sync`` are read duck-typed
    (``applied_once``, ``last_error``, ``ready()``, ``last_desired``; ``failures``), so tests
    hand in small stand-ins."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        reconciler,
        sync,
        publish: Callable[[ph.Condition], None],
        metrics: Metrics | None = None,
        *,
        read_wg: Callable[[str], WgState] = wireguard.read_state,
        wall: Callable[[], float] = time.time,
        write_file: bool = True,
    ):
        self.settings = settings
        self.store = store
        self.reconciler = reconciler
        self.sync = sync
        self.publish = publish
        self.metrics = metrics
        self._read_wg = read_wg
        self._wall = wall
        self._write_file = write_file
        self.tracker = ph.PeerTracker()
        self.condition: ph.Condition | None = None
        self.views: list[ph.PeerView] = []
        self._since: dict[str, float | None] = {"sync": None, "uncovered": None, "mismatch": None}
        self.heartbeat = time.monotonic()
        self._started = time.monotonic()

    def _held(self, what: str, active: bool, now: float) -> float:
        """Seconds ``what`` has been continuously active (0 when it is not)."""
        if not active:
            self._since[what] = None
            return 0.0
        if self._since[what] is None:
            self._since[what] = now
        return now - self._since[what]

    def check(self) -> ph.Condition:
        now = self._wall()
        wg = self._read_wg(self.settings.wg_interface)
        nodes = self.store.snapshot()
        views = self.tracker.observe(
            wg, nodes, self.settings.node_name, self.settings.address_types, now
        )
        transitions = self.tracker.transitions(views)
        counts = ph.count_states(views)
        r = self.reconciler
        ready, why = r.ready()
        desired = r.last_desired
        uncovered, keyless = split_uncovered(desired, nodes)
        mismatched = tuple(v.node for v in views if v.state == ph.KEY_MISMATCH)
        facts = ph.NodeFacts(
            wg_usable=wg.usable,
            wg_problem=wg.error or ("down" if wg.present else "absent"),
            synced=self.store.synced.is_set(),
            applied=bool(r.applied_once) and not r.last_error,
            datapath_ready=ready,
            datapath_problem=r.last_error or why,
            sync_failing_for=self._held("sync", getattr(self.sync, "failures", 0) > 0, now),
            uncovered=uncovered,
            uncovered_for=self._held("uncovered", uncovered > 0, now),
            keyless=keyless,
            fail_mode=str(self.settings.fail_mode),
            peer_counts=counts,
            mismatched=mismatched,
            mismatch_for=self._held("mismatch", bool(mismatched), now),
            unreachable=tuple(v.node for v in views if v.state == ph.UNREACHABLE),
        )
        cond = ph.decide_condition(facts, self.settings.sync_stale_seconds)
        if self.metrics is not None:
            for state, n in counts.items():
                self.metrics.peers.labels(state=state).set(n)
            for _node, _old, new in transitions:
                self.metrics.peer_transitions.labels(state=new).inc()
            self.metrics.oldest_handshake.set(ph.oldest_handshake_age(views))
        for node, old, new in transitions:
            if old is not None or new not in (ph.HEALTHY, ph.IDLE):
                log.log(
                    logging.INFO if new in (ph.HEALTHY, ph.IDLE) else logging.WARNING,
                    "peer state changed",
                    extra=kv(node=node, old=old, new=new),
                )
        if self.condition is None or self.condition.key != cond.key:
            log.info(
                "encryption condition",
                extra=kv(status=cond.status, reason=cond.reason, message=cond.message),
            )
        self.condition, self.views = cond, views
        starting = (
            cond.reason in (ph.SYNC_STALE, ph.DATAPATH_NOT_READY)
            and not (facts.synced and facts.applied)
            and time.monotonic() - self._started < STARTUP_GRACE
        )
        if not starting:
            self.publish(cond)
        if self._write_file:
            self._record(wg, views, cond, now)
        self.heartbeat = time.monotonic()
        return cond

    def _record(self, wg: WgState, views, cond: ph.Condition, now: float) -> None:
        """The peer table for `nodecryptor status --peers` (another process), replaced
        atomically; a read-only run directory only loses that table."""
        path = peers_path(self.settings)
        data = {
            "node": self.settings.node_name,
            "written_at": now,
            "wireguard": {"ifname": wg.ifname, "up": wg.usable, "error": wg.error},
            "condition": {
                "type": ph.CONDITION_TYPE,
                "status": cond.status,
                "reason": cond.reason,
                "message": cond.message,
            },
            "peers": [v.as_dict() for v in views],
            # The pod pools the agent bounds pod CIDR claims with (problem: why none).
            "pools": self.store.pools().to_json(),
        }
        try:
            write_json(path, data)
        except OSError as e:
            log.debug("cannot record the peer table", extra=kv(path=path, error=str(e)))

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.check()
            except Exception:  # a bug must not end the loop; it shows in the log and liveness
                log.exception("peer health check failed")
            stop.wait(CHECK_SECONDS)

    def alive(self, now: float | None = None) -> tuple[bool, str]:
        age = (now if now is not None else time.monotonic()) - self.heartbeat
        if age > self.settings.heartbeat_stale_seconds:
            return False, f"no peer health check for {age:.0f}s"
        return True, f"peer health checked {age:.1f}s ago"
