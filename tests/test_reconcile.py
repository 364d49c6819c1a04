"""The reconcile loop against the in-memory datapath: idempotency, retries, prune, outages."""

import dataclasses
import threading
import time

from nodecryptor.policy.ciliumnode import parse_ciliumnode
from nodecryptor.datapath.base import FakeDatapath
from nodecryptor.observe.metrics import Metrics
from nodecryptor.core.model import Device, WgPeer, WgState
from nodecryptor.agent.reconcile import Reconciler
from nodecryptor.core.settings import Settings
from nodecryptor.cluster.store import Store
from tests.cilium_objects import KUBEADM_CP, W1, W2, ciliumnode


def info(obj):
    """The CiliumNode's NodeInfo, its v1 Node (an honest kubelet) listing the same addresses."""
    parsed = parse_ciliumnode(obj)[0]
    return dataclasses.replace(parsed, node_addresses=parsed.addresses)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make(datapath=None, wg=None, rp=None, settings=None):
    store = Store()
    wg_state = wg or WgState(
        ifname="cilium_wg0",
        ifindex=9,
        present=True,
        up=True,
        mtu=1420,
        listen_port=51871,
        fwmark=0xE00,
        peers=(),
    )
    clock = Clock()
    rec = Reconciler(
        settings or Settings(node_name="w1", reconcile_seconds=0.05, debounce_seconds=0.01),
        store,
        datapath or FakeDatapath(),
        Metrics(),
        read_wg=lambda name: wg_state,
        resolve_devices=lambda names, addrs, exclude: ((Device("eth0", 2, 1500),), []),
        read_sysctl=lambda name: rp or {"all": 0, name: 0},
        clock=clock,
    )
    return store, rec, clock


def test_nothing_is_applied_before_the_first_full_list():
    store, rec, _ = make()
    store.upsert(info(W1))  # a watch event alone is not a complete picture
    assert not rec.reconcile_once().ok
    assert rec.datapath.apply_calls == 0
    assert rec.ready() == (False, "waiting for the first list of CiliumNodes")


def test_apply_is_idempotent_and_follows_changes():
    store, rec, _ = make()
    store.replace_all([info(KUBEADM_CP), info(W1), info(W2)])
    assert rec.reconcile_once().ok and rec.reconcile_once().ok
    dp = rec.datapath
    assert dp.apply_calls == 2 and len(dp.applied) == 1  # same desired state twice
    assert {d.node for d in dp.current.destinations} == {"cp1", "w2"}
    store.delete("w2")  # prune: w2's prefixes leave the desired state
    assert rec.reconcile_once().ok
    assert {d.node for d in dp.current.destinations} == {"cp1"}
    assert rec.ready() == (True, "synced, applied and attached")


def test_failures_are_retried_and_reported():
    store, rec, _ = make(datapath=FakeDatapath(fail_times=2))
    store.replace_all([info(W1), info(W2)])
    assert not rec.reconcile_once().ok
    assert rec.failures == 1 and "injected failure" in rec.last_error
    assert rec.ready()[0] is False
    assert not rec.reconcile_once().ok and rec.failures == 2
    assert rec.reconcile_once().ok and rec.failures == 0
    m = rec.metrics.registry
    assert m.get_sample_value("nodecryptor_reconciles_total", {"result": "error"}) == 2
    assert m.get_sample_value("nodecryptor_reconciles_total", {"result": "ok"}) == 1


def test_passes_without_store_updates_keep_the_last_state():
    """Passes that find no new store content (what an API outage looks like from the loop:
    the sync stops updating the store, it never clears it) re-apply the same state. The outage
    itself, with the real sync and a killed API server, is tests/test_agent.py's."""
    store, rec, _ = make()
    store.replace_all([info(KUBEADM_CP), info(W1), info(W2)])
    rec.reconcile_once()
    before = rec.datapath.current
    for _ in range(3):
        assert rec.reconcile_once().ok
    assert rec.datapath.current == before and len(before.destinations) == 8


def test_liveness_tracks_the_heartbeat():
    store, rec, clock = make()
    store.replace_all([info(W1)])
    rec.reconcile_once()
    assert rec.alive()[0]
    clock.now += rec.settings.heartbeat_stale_seconds + 1
    ok, why = rec.alive()
    assert not ok and "no reconcile pass" in why


def test_rp_filter_makes_the_node_not_ready():
    store, rec, _ = make(rp={"all": 1, "cilium_wg0": 0})
    store.replace_all([info(W1), info(W2)])
    assert rec.reconcile_once().ok
    ok, why = rec.ready()
    assert not ok and "rp_filter" in why


def test_uncovered_destinations_are_counted():
    peers = (WgPeer("k", tuple()),)
    wg = WgState(
        ifname="cilium_wg0",
        ifindex=9,
        present=True,
        up=True,
        mtu=1420,
        listen_port=51871,
        fwmark=0xE00,
        peers=peers,
    )
    store, rec, _ = make(wg=wg)
    store.replace_all([info(W1), info(W2)])
    rec.reconcile_once()
    assert rec.metrics.registry.get_sample_value("nodecryptor_uncovered_destinations") == 4
    assert len(rec.datapath.current.uncovered) == 4


def test_loop_reacts_to_changes_and_stops():
    store, rec, _ = make()
    rec._clock = time.monotonic
    store.replace_all([info(W1)])
    stop = threading.Event()
    t = threading.Thread(target=rec.run, args=(stop, store.changed))
    t.start()
    try:
        deadline = time.monotonic() + 5
        store.upsert(info(ciliumnode("w7", "192.168.50.27", None, ["10.244.7.0/24"])))
        while time.monotonic() < deadline:
            cur = rec.datapath.current
            if cur and any(d.node == "w7" for d in cur.destinations):
                break
            stop.wait(0.02)
        assert any(d.node == "w7" for d in rec.datapath.current.destinations)
    finally:
        stop.set()
        t.join(5)
    assert not t.is_alive()


def test_peer_added_without_any_event_is_picked_up_soon():
    """WireGuard peer changes raise no event. While something is uncovered the loop re-checks
    on its own, instead of waiting for the (long) periodic pass."""
    import ipaddress

    states = {
        "wg": WgState(
            ifname="cilium_wg0",
            ifindex=9,
            present=True,
            up=True,
            mtu=1420,
            listen_port=51871,
            fwmark=0xE00,
            peers=(),
        )
    }
    settings = Settings(node_name="w1", reconcile_seconds=300, coverage_recheck_seconds=0.05)
    store = Store()
    rec = Reconciler(
        settings,
        store,
        FakeDatapath(),
        Metrics(),
        read_wg=lambda name: states["wg"],
        resolve_devices=lambda n, a, e: ((Device("eth0", 2, 1500),), []),
        read_sysctl=lambda name: {"all": 0, name: 0},
    )
    store.replace_all([info(W1), info(W2)])
    stop = threading.Event()
    t = threading.Thread(target=rec.run, args=(stop, threading.Event()))  # no wake-ups at all
    t.start()
    try:
        deadline = time.monotonic() + 5
        while rec.datapath.current is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(rec.datapath.current.uncovered) == 4
        nets = ("192.168.50.22/32", "fd50::22/128", "10.244.2.0/24", "fd00:10:244:2::/64")
        states["wg"] = dataclasses.replace(
            states["wg"], peers=(WgPeer("k", tuple(ipaddress.ip_network(n) for n in nets)),)
        )
        while rec.datapath.current.uncovered and time.monotonic() < deadline:
            time.sleep(0.01)
        assert rec.datapath.current.uncovered == frozenset()
    finally:
        stop.set()
        t.join(5)


def test_fully_covered_state_waits_for_the_periodic_pass():
    store, rec, _ = make(
        settings=Settings(node_name="w1", reconcile_seconds=300, coverage_recheck_seconds=0.01)
    )
    rec._clock = time.monotonic
    store.replace_all([info(W1)])  # no remote nodes: nothing can be uncovered
    stop = threading.Event()
    t = threading.Thread(target=rec.run, args=(stop, threading.Event()))
    t.start()
    time.sleep(0.5)
    stop.set()
    t.join(5)
    assert rec.datapath.apply_calls == 1


def test_unforced_pass_with_unchanged_inputs_skips_planning_and_applying():
    store, rec, _ = make()
    store.replace_all([info(KUBEADM_CP), info(W1), info(W2)])
    assert rec.reconcile_once(force=False).ok  # first pass: nothing applied yet -> applies
    assert rec.datapath.apply_calls == 1
    assert rec.reconcile_once(force=False).ok and rec.datapath.apply_calls == 1
    assert rec.reconcile_once(force=True).ok and rec.datapath.apply_calls == 2  # repair pass
    store.delete("w2")  # a real change applies even when not forced
    assert rec.reconcile_once(force=False).ok and rec.datapath.apply_calls == 3


def test_handshake_times_do_not_count_as_a_change():
    a = WgPeer("k", (), endpoint="192.168.50.22:51871", last_handshake=100.0)
    b = WgPeer("k", (), endpoint="192.168.50.22:51871", last_handshake=250.0)
    assert a == b and WgPeer("k2", ()) != a


def test_device_resolver_remembers_route_lookups(root):
    import ipaddress

    from nodecryptor.node.devices import DeviceResolver

    clock = Clock()
    resolver = DeviceResolver(refresh_seconds=30, clock=clock)
    addrs = [ipaddress.ip_address(f"127.0.0.{i}") for i in range(2, 12)]
    devices, problems = resolver((), addrs, "cilium_wg0")
    assert (devices, problems, resolver.lookups) == ((), [], 10)  # loopback is never underlay
    resolver((), addrs, "cilium_wg0")
    assert resolver.lookups == 10  # remembered
    resolver((), addrs + [ipaddress.ip_address("127.0.0.99")], "cilium_wg0")
    assert resolver.lookups == 11  # only the new address
    clock.now += 31
    resolver((), addrs, "cilium_wg0")
    assert resolver.lookups == 21  # refreshed after refresh_seconds
