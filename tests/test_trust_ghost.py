"""Finding 5 of the trust review: a CiliumNode with no published WireGuard key (a ghost any
Cilium agent can write) has destinations no peer covers. That is reported, but it is that
node's fault, not the local node's: NodeEncryptionReady stays True, so one write cannot turn
every node's condition False (and, with a readiness taint on it, taint the whole cluster).
Destinations of a node that did publish a key and still have no peer remain the local
Cilium's fault and turn the condition False, as before."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

from nodecryptor.agent import peermonitor
from nodecryptor.cluster.store import Store
from nodecryptor.core.model import Destination, NodeInfo, WgPeer, WgState
from nodecryptor.core.settings import Settings
from nodecryptor.observe.metrics import Metrics
from nodecryptor.policy import peerhealth as ph

KEY = "K" * 43 + "="
net = ipaddress.ip_network


class Reconciler:
    applied_once, last_error = True, None

    def __init__(self, uncovered: dict[str, str]):
        """``uncovered``: prefix -> node of each destination no peer covers."""
        dests = tuple(Destination(net(p), n, "pod-cidr", False) for p, n in uncovered.items())
        self.last_desired = SimpleNamespace(
            destinations=dests, uncovered=frozenset(d.prefix for d in dests)
        )

    def ready(self):
        return True, "ok"


def monitor(tmp_path, uncovered: dict[str, str]):
    store = Store()
    store.replace_all(
        [
            NodeInfo("w1", wg_public_key=KEY),
            NodeInfo(
                "w2",
                addresses=(("InternalIP", ipaddress.ip_address("10.0.0.2")),),
                pod_cidrs=(net("10.244.2.0/24"),),
                wg_public_key=KEY,
            ),
            # The ghost: a CiliumNode without a key annotation and without a Node.
            NodeInfo("ghost", pod_cidrs=(net("10.244.66.0/24"),)),
        ]
    )
    wall = SimpleNamespace(t=1_000_000.0)
    wg = WgState(
        "cilium_wg0",
        ifindex=7,
        present=True,
        up=True,
        peers=(
            WgPeer(
                KEY,
                (net("10.0.0.2/32"), net("10.244.2.0/24")),
                last_handshake=999_990.0,
                tx_bytes=10,
            ),
        ),
    )
    mon = peermonitor.PeerMonitor(
        Settings(node_name="w1", run_dir=str(tmp_path)),
        store,
        Reconciler(uncovered),
        SimpleNamespace(failures=0),
        lambda _c: None,
        Metrics(),
        read_wg=lambda _ifname: wg,
        wall=lambda: wall.t,
    )
    return mon, wall


def test_a_keyless_ghost_is_reported_but_the_condition_stays_true(tmp_path):
    mon, wall = monitor(tmp_path, {"10.244.66.0/24": "ghost"})
    mon.check()
    wall.t += ph.UNCOVERED_HOLD + 1
    cond = mon.check()
    assert cond.status == "True", cond
    assert cond.reason == ph.DESTINATIONS_WITHOUT_KEY
    assert "ghost" in cond.message


def test_an_uncovered_node_that_published_a_key_is_still_the_local_fault(tmp_path):
    mon, wall = monitor(tmp_path, {"10.244.66.0/24": "ghost", "10.244.2.0/25": "w2"})
    mon.check()
    wall.t += ph.UNCOVERED_HOLD + 1
    cond = mon.check()
    assert (cond.status, cond.reason) == ("False", ph.UNCOVERED)
