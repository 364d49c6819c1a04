"""The peer-health loop: device reading + store + reconciler state -> metrics, the
NodeEncryptionReady condition handed to the writer, and the peer table for status --peers."""

import ipaddress
from types import SimpleNamespace

from nodecryptor.agent import peermonitor
from nodecryptor.policy import peerhealth as ph
from nodecryptor.observe.metrics import Metrics
from nodecryptor.core.model import Destination, NodeInfo, WgPeer, WgState
from nodecryptor.core.settings import Settings
from nodecryptor.cluster.store import Store

KEY = "K" * 43 + "="
OTHER = "O" * 43 + "="


class Reconciler:
    """``uncovered``: (prefix, node) pairs, or prefixes of w2 (which published a key)."""

    def __init__(self, ready=(True, "ok"), applied=True, error=None, uncovered=()):
        self._ready, self.applied_once, self.last_error = ready, applied, error
        pairs = [u if isinstance(u, tuple) else (u, "w2") for u in uncovered]
        dests = tuple(
            Destination(ipaddress.ip_network(p), node, "pod-cidr", False) for p, node in pairs
        )
        self.last_desired = SimpleNamespace(
            uncovered=frozenset(d.prefix for d in dests), destinations=dests
        )

    def ready(self):
        return self._ready


def setup(tmp_path, peers, up=True, reconciler=None, failures=0):
    store = Store()
    store.replace_all(
        [
            NodeInfo("w1"),
            NodeInfo(
                "w2",
                addresses=(("InternalIP", ipaddress.ip_address("10.0.0.2")),),
                wg_public_key=KEY,
            ),
        ]
    )
    published = []
    wall = SimpleNamespace(t=1_000_000.0)
    state = {"wg": WgState("cilium_wg0", ifindex=7, present=True, up=up, peers=tuple(peers))}
    metrics = Metrics()
    mon = peermonitor.PeerMonitor(
        Settings(node_name="w1", run_dir=str(tmp_path)),
        store,
        reconciler or Reconciler(),
        SimpleNamespace(failures=failures),
        published.append,
        metrics,
        read_wg=lambda _ifname: state["wg"],
        wall=lambda: wall.t,
    )
    return mon, published, wall, state, metrics


def peer(key=KEY, hs=999_990.0, tx=10):
    return WgPeer(key, (ipaddress.ip_network("10.0.0.2/32"),), last_handshake=hs, tx_bytes=tx)


def test_healthy_peer_gives_true_metrics_and_a_table(tmp_path):
    mon, published, _, _, metrics = setup(tmp_path, [peer()])
    cond = mon.check()
    assert (cond.status, cond.reason) == ("True", ph.READY) and published == [cond]
    assert metrics.registry.get_sample_value("nodecryptor_peers", {"state": "healthy"}) == 1
    assert metrics.registry.get_sample_value("nodecryptor_peers", {"state": "missing"}) == 0
    assert metrics.registry.get_sample_value("nodecryptor_peer_oldest_handshake_age_seconds") == 10
    table = peermonitor.read_peers_file(mon.settings)
    assert table["peers"][0]["node"] == "w2" and table["peers"][0]["state"] == "healthy"
    assert table["condition"]["reason"] == ph.READY
    # The pod pools are recorded too: none read in this store, and it says why.
    assert table["pools"]["cidrs"] == [] and table["pools"]["problem"]


def test_wireguard_down_is_false_at_once(tmp_path):
    mon, published, *_ = setup(tmp_path, [peer()], up=False)
    assert (mon.check().status, published[-1].reason) == ("False", ph.WIREGUARD_DOWN)


def test_key_mismatch_after_the_hold_and_transitions_counted(tmp_path):
    mon, published, wall, state, metrics = setup(tmp_path, [peer()])
    mon.check()
    state["wg"] = WgState("cilium_wg0", ifindex=7, present=True, up=True, peers=(peer(key=OTHER),))
    assert mon.check().reason == ph.READY
    wall.t += ph.KEY_MISMATCH_HOLD
    assert mon.check().reason == ph.PEER_KEY_MISMATCH
    assert (
        metrics.registry.get_sample_value(
            "nodecryptor_peer_transitions_total", {"state": "key-mismatch"}
        )
        == 1
    )
    assert (
        metrics.registry.get_sample_value(
            "nodecryptor_peer_transitions_total", {"state": "healthy"}
        )
        == 1
    )


def test_sync_failing_and_uncovered_need_their_duration(tmp_path):
    mon, _, wall, *_ = setup(
        tmp_path, [peer()], failures=3, reconciler=Reconciler(uncovered=["10.9.0.0/24"])
    )
    assert mon.check().reason == ph.READY
    wall.t += ph.UNCOVERED_HOLD
    assert mon.check().reason == ph.UNCOVERED
    wall.t += 200
    assert mon.check().reason == ph.SYNC_STALE


def test_startup_grace_hides_the_not_yet_applied_state(tmp_path):
    mon, published, *_ = setup(tmp_path, [peer()], reconciler=Reconciler(applied=False))
    assert mon.check().reason == ph.DATAPATH_NOT_READY
    assert published == []
