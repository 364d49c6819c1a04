"""Peer states and the NodeEncryptionReady decision: tables, an injected clock."""

import ipaddress

import pytest

from nodecryptor.policy import peerhealth as ph
from nodecryptor.core.model import NodeInfo, WgPeer, WgState
from nodecryptor.node.wireguard import parse_uapi

KEY_A = "A" * 43 + "="
KEY_B = "B" * 43 + "="
NOW = 1_000_000.0
T = ph.UNREACHABLE_AFTER


def node(name="w2", ip="10.0.0.2", cidr="10.244.2.0/24", key=KEY_A):
    return NodeInfo(
        name=name,
        addresses=(("InternalIP", ipaddress.ip_address(ip)),),
        pod_cidrs=(ipaddress.ip_network(cidr),) if cidr else (),
        wg_public_key=key,
    )


def peer(key=KEY_A, allowed=("10.0.0.2/32", "10.244.2.0/24"), hs=None, tx=0, rx=0):
    return WgPeer(
        public_key=key,
        allowed_ips=tuple(ipaddress.ip_network(a) for a in allowed),
        last_handshake=hs,
        tx_bytes=tx,
        rx_bytes=rx,
    )


def wg(*peers):
    return WgState("cilium_wg0", ifindex=5, present=True, up=True, peers=tuple(peers))


def observe(tracker, peers, nodes, now):
    nodes = {n.name: n for n in nodes}
    return {v.node: v for v in tracker.observe(wg(*peers), nodes, "w1", ("InternalIP",), now)}


def test_threshold_is_wireguards_rekey_window_plus_margin():
    assert ph.UNREACHABLE_AFTER == 120 + 90 + ph.MARGIN == 240


# One reading: (node, peer, expected state, expected key_match)
SINGLE = [
    ("fresh handshake", node(), peer(hs=NOW - 5, tx=100), ph.HEALTHY, True),
    ("handshake at the threshold", node(), peer(hs=NOW - T), ph.HEALTHY, True),
    ("old handshake, no traffic", node(), peer(hs=NOW - T - 1), ph.IDLE, True),
    ("never handshook, no history", node(), peer(), ph.IDLE, True),
    ("other key covers the node", node(), peer(key=KEY_B, hs=NOW - 1), ph.KEY_MISMATCH, False),
    (
        "no annotation: nothing to compare",
        node(key=None),
        peer(key=KEY_B, hs=NOW - 1),
        ph.HEALTHY,
        None,
    ),
    ("no peer covers the node", node(), peer(allowed=("10.0.0.9/32",)), ph.MISSING, None),
    (
        "pod CIDR only (no node IPs in allowed-IPs)",
        node(),
        peer(allowed=("10.244.2.0/24",), hs=NOW),
        ph.HEALTHY,
        True,
    ),
    ("covered by a wider prefix", node(), peer(allowed=("10.0.0.0/8",), hs=NOW), ph.HEALTHY, True),
    ("IPv6 peer for an IPv4 node", node(), peer(allowed=("fd00::/64",)), ph.MISSING, None),
]


@pytest.mark.parametrize("what,n,p,state,match", SINGLE, ids=[s[0] for s in SINGLE])
def test_single_reading(what, n, p, state, match):
    view = observe(ph.PeerTracker(), [p], [n], NOW)["w2"]
    assert (view.state, view.key_match) == (state, match)


def test_local_node_is_not_a_peer():
    views = observe(ph.PeerTracker(), [peer()], [node(name="w1"), node()], NOW)
    assert list(views) == ["w2"]


def test_unreadable_peers_give_no_views():
    state = WgState("cilium_wg0", ifindex=5, present=True, up=True, peers=None)
    assert ph.PeerTracker().observe(state, {"w2": node()}, "w1", ("InternalIP",), NOW) == []


def test_the_annotated_key_wins_among_covering_peers():
    views = observe(
        ph.PeerTracker(), [peer(key=KEY_B, hs=NOW), peer(key=KEY_A, hs=NOW)], [node()], NOW
    )
    assert views["w2"].state == ph.HEALTHY and views["w2"].peer_key == KEY_A


# Sequences: (seconds after NOW, tx bytes, last handshake or None, expected state)
SEQUENCES = {
    "sending without any handshake becomes unreachable after the window": [
        (0, 100, None, ph.IDLE),
        (10, 200, None, ph.IDLE),
        (T + 5, 300, None, ph.IDLE),
        (T + 11, 400, None, ph.UNREACHABLE),
    ],
    "a handshake ends unreachable": [
        (0, 100, None, ph.IDLE),
        (10, 200, None, ph.IDLE),
        (T + 20, 300, None, ph.UNREACHABLE),
        (T + 25, 400, T + 24, ph.HEALTHY),
    ],
    "old handshake, then traffic: judged only after a whole window of sending": [
        (0, 100, -1000, ph.IDLE),
        (5, 200, -1000, ph.IDLE),
        (100, 300, -1000, ph.IDLE),
        (T + 6, 400, -1000, ph.UNREACHABLE),
    ],
    "traffic stops: idle once the last send is a window old": [
        (0, 100, None, ph.IDLE),
        (5, 200, None, ph.IDLE),
        (T + 6, 300, None, ph.UNREACHABLE),
        (2 * T + 5, 300, None, ph.UNREACHABLE),
        (2 * T + 7, 300, None, ph.IDLE),
    ],
    "counter reset (peer re-created) is a baseline, not growth": [
        (0, 1000, None, ph.IDLE),
        (5, 10, None, ph.IDLE),
        (T + 100, 10, None, ph.IDLE),
    ],
    "regular handshakes stay healthy while sending": [
        (0, 100, 0, ph.HEALTHY),
        (120, 200, 118, ph.HEALTHY),
        (240, 300, 236, ph.HEALTHY),
        (500, 400, 356, ph.HEALTHY),
    ],
}


@pytest.mark.parametrize("name", list(SEQUENCES))
def test_sequences(name):
    tracker = ph.PeerTracker()
    got = []
    for dt, tx, hs, _ in SEQUENCES[name]:
        p = peer(tx=tx, hs=None if hs is None else NOW + hs)
        got.append(observe(tracker, [p], [node()], NOW + dt)["w2"].state)
    assert got == [s for *_, s in SEQUENCES[name]]


def test_transitions_are_reported_once():
    tracker = ph.PeerTracker()
    views = tracker.observe(wg(peer(hs=NOW)), {"w2": node()}, "w1", ("InternalIP",), NOW)
    assert tracker.transitions(views) == [("w2", None, ph.HEALTHY)]
    assert tracker.transitions(views) == []
    views = tracker.observe(wg(peer(key=KEY_B, hs=NOW)), {"w2": node()}, "w1", ("InternalIP",), NOW)
    assert tracker.transitions(views) == [("w2", ph.HEALTHY, ph.KEY_MISMATCH)]


def test_counts_and_oldest_handshake():
    tracker = ph.PeerTracker()
    nodes = {
        "w2": node(),
        "w3": node("w3", "10.0.0.3", "10.244.3.0/24", KEY_B),
        "w4": node("w4", "10.0.0.4", None),
    }
    views = tracker.observe(
        wg(peer(hs=NOW - 30, tx=5), peer(KEY_B, ("10.0.0.3/32",), hs=NOW - 90, tx=7)),
        nodes,
        "w1",
        ("InternalIP",),
        NOW,
    )
    assert ph.count_states(views) == {
        ph.HEALTHY: 2,
        ph.KEY_MISMATCH: 0,
        ph.MISSING: 1,
        ph.UNREACHABLE: 0,
        ph.IDLE: 0,
    }
    assert ph.oldest_handshake_age(views) == 90
    assert ph.oldest_handshake_age([]) == 0


def test_uapi_reader_returns_traffic_counters():
    _, _, peers = parse_uapi(
        "public_key=" + "11" * 32 + "\nallowed_ip=10.0.0.2/32\n"
        "last_handshake_time_sec=1700000000\nrx_bytes=42\ntx_bytes=99\n"
        "errno=0\n\n"
    )
    assert (peers[0].rx_bytes, peers[0].tx_bytes, peers[0].last_handshake) == (42, 99, 1700000000.0)


# ---- the condition --------------------------------------------------------------------------
OK = dict(wg_usable=True)
CONDITIONS = [
    ("all good", OK, "True", ph.READY),
    (
        "wireguard down wins over everything",
        dict(wg_usable=False, applied=False, uncovered=3, uncovered_for=999),
        "False",
        ph.WIREGUARD_DOWN,
    ),
    ("not synced yet", dict(OK, synced=False), "False", ph.SYNC_STALE),
    ("not applied", dict(OK, applied=False), "False", ph.DATAPATH_NOT_READY),
    (
        "datapath not ready",
        dict(OK, datapath_ready=False, datapath_problem="detached"),
        "False",
        ph.DATAPATH_NOT_READY,
    ),
    ("sync failing beyond the threshold", dict(OK, sync_failing_for=151), "False", ph.SYNC_STALE),
    ("sync failing briefly", dict(OK, sync_failing_for=149), "True", ph.READY),
    (
        "uncovered, held long enough",
        dict(OK, uncovered=2, uncovered_for=ph.UNCOVERED_HOLD),
        "False",
        ph.UNCOVERED,
    ),
    (
        "uncovered, within the hold (a node joining)",
        dict(OK, uncovered=2, uncovered_for=10),
        "True",
        ph.READY,
    ),
    (
        "key mismatch held",
        dict(OK, mismatched=("w2",), mismatch_for=ph.KEY_MISMATCH_HOLD),
        "True",
        ph.PEER_KEY_MISMATCH,
    ),
    (
        "key mismatch within the hold (a reboot)",
        dict(OK, mismatched=("w2",), mismatch_for=5),
        "True",
        ph.READY,
    ),
    ("unreachable peers", dict(OK, unreachable=("w3",)), "True", ph.PEERS_UNREACHABLE),
    (
        "uncovered wins over a peer problem",
        dict(OK, uncovered=1, uncovered_for=999, unreachable=("w3",)),
        "False",
        ph.UNCOVERED,
    ),
]


@pytest.mark.parametrize("what,facts,status,reason", CONDITIONS, ids=[c[0] for c in CONDITIONS])
def test_condition(what, facts, status, reason):
    c = ph.decide_condition(ph.NodeFacts(**facts), sync_stale_after=150)
    assert (c.status, c.reason) == (status, reason)
    assert c.reason in ph.REASONS and c.message


def test_message_alone_does_not_change_the_key():
    a = ph.decide_condition(ph.NodeFacts(True, peer_counts={"healthy": 3}), 150)
    b = ph.decide_condition(ph.NodeFacts(True, peer_counts={"healthy": 4}), 150)
    assert a.message != b.message and a.key == b.key
