"""Capacity fails closed: the real BPF backend in a network namespace with a private bpffs,
tiny initial map sizes and a small hard cap. Verdicts are asked of the program the tcx link on
eth0 actually runs (BPF_PROG_TEST_RUN by program id), so a cluster destination that would
leave in the clear shows up as a pass.

- a cluster that outgrows the maps gets a new, complete generation swapped into the same link;
- a desired state beyond the hard cap is refused as a whole: the previous state keeps
  enforcing, readiness is false naming the numbers, a metric counts it; a fresh node attaches
  nothing (and so never runs a program that passes everything as "disabled");
- a write failing midway (in place or while growing) leaves the previous state enforcing;
- a full-range exempt spec fits (ranges, not one entry per port).
"""

from __future__ import annotations

import errno
import ipaddress
import socket

import pytest
from bpf_backend_lab import in_netns, sh
from conftest import require

from nodecryptor.datapath.base import VERDICT_ENCRYPT, VERDICT_EXEMPT
from nodecryptor.datapath.bpf import attach, pins, syscall, testrun
from nodecryptor.datapath.bpf.backend import BpfDatapath
from nodecryptor.core.errors import DatapathError
from nodecryptor.policy.exemptions import BUILTIN_NAME, PolicyRange
from nodecryptor.observe.metrics import Metrics
from nodecryptor.core.model import (
    KIND_NODE_IP,
    KIND_POD_CIDR,
    ROLE_WORKER,
    DesiredState,
    Destination,
    Device,
    Plan,
    WgState,
)
from nodecryptor.core.ports import parse_port_spec
from nodecryptor.core.settings import MapSizes, Settings

pytestmark = [pytest.mark.privileged, pytest.mark.bpf]

LOCAL_V4, LOCAL_V6 = "192.0.2.1", "2001:db8:ffff::1"
SIZES = MapSizes(destinations_v4=64, destinations_v6=64, destinations_max=1000)


@pytest.fixture
def node(netns, bpffs, bcc_available):
    ok, why = syscall.tcx_supported()
    require(ok, f"kernel without tcx: {why}")
    ns = netns("cap")
    sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", netns=ns)
    # A stand-in for the WireGuard device: test-run never performs the redirect.
    sh("ip", "link", "add", "cilium_wg0", "type", "veth", "peer", "name", "wgpeer0", netns=ns)
    for dev in ("eth0", "peer0", "cilium_wg0", "wgpeer0"):
        sh("ip", "link", "set", dev, "up", netns=ns)
    with in_netns(ns):
        ifindex = {name: socket.if_nametoindex(name) for name in ("eth0", "cilium_wg0")}
    started = []

    def make(**settings_kw):
        settings = Settings(bpffs=bpffs, map_sizes=SIZES, **settings_kw)
        metrics = Metrics()
        with in_netns(ns):
            dp = BpfDatapath(settings, metrics).start()
        started.append(dp)
        return dp, metrics

    yield ns, ifindex, make
    for dp in started:
        dp.close()


def node_addr(family: int, i: int) -> str:
    base = "172.16.0.0" if family == 4 else "fd00:50::"
    return str(ipaddress.ip_address(base) + i + 1)


def pod_net(family: int, i: int):
    if family == 4:
        return ipaddress.ip_network((int(ipaddress.ip_address("10.0.0.0")) + (i << 8), 24))
    return ipaddress.ip_network((int(ipaddress.ip_address("fd00:244::")) + (i << 64), 64))


def desired(ifindex: dict, nodes: range, exempt: str = "2379-2380,6443") -> DesiredState:
    """Nodes ``nodes`` (node 0 control-plane), each with a node address and a pod CIDR in both
    families. The built-in policy exempts ``exempt`` to node 0's addresses, as compute_plan
    would put it on them."""
    ports = parse_port_spec(exempt)
    builtin = tuple(PolicyRange(r.protocol, r.first, r.last, BUILTIN_NAME) for r in ports)
    dests = []
    for i in nodes:
        for family in (4, 6):
            dests.append(
                Destination(
                    ipaddress.ip_network(node_addr(family, i)),
                    f"n{i}",
                    KIND_NODE_IP,
                    i == 0,
                    exempt_ports=builtin if i == 0 else (),
                )
            )
            dests.append(Destination(pod_net(family, i), f"n{i}", KIND_POD_CIDR, i == 0))
    plan = Plan(
        node="local",
        role=ROLE_WORKER,
        local_addresses=(ipaddress.ip_address(LOCAL_V4), ipaddress.ip_address(LOCAL_V6)),
        destinations=tuple(dests),
        exempt_ports=ports,
        policies=(BUILTIN_NAME,) if ports else (),
    )
    wg = WgState(
        ifname="cilium_wg0",
        ifindex=ifindex["cilium_wg0"],
        present=True,
        up=True,
        mtu=1420,
        listen_port=51871,
        peers=None,
    )
    return DesiredState(
        plan=plan,
        wg=wg,
        devices=(Device("eth0", ifindex["eth0"], 1500),),
        fail_mode="closed",
        enabled=True,
        mss_v4=1380,
        mss_v6=1360,
        max_packet_v4=1420,
        max_packet_v6=1420,
    )


def attached_verdicts(ns: str, bpffs: str, targets: list[tuple[str, int]]) -> dict:
    """{(dst, dport): (verdict, reason)} from the program eth0's tcx link runs."""
    with in_netns(ns):
        att = attach.tcx_observe(bpffs, "eth0")
    assert att is not None and not att.defunct
    with syscall.prog_fd_by_id(att.prog_id) as prog:
        out = {}
        for dst, dport in targets:
            src = LOCAL_V4 if ":" not in dst else LOCAL_V6
            result = testrun.run(prog, testrun.build_frame(src, dst, dport=dport))
            out[(dst, dport)] = (result.verdict, result.reason_name)
        return out


def cluster_targets(nodes) -> list[tuple[str, int]]:
    """Every node address and an address in every pod CIDR of ``nodes``, on a port that is
    never exempt."""
    out = []
    for i in nodes:
        for family in (4, 6):
            out.append((node_addr(family, i), 8080))
            out.append((str(pod_net(family, i).network_address + 9), 8080))
    return out


def assert_all_encrypted(ns, bpffs, nodes):
    verdicts = attached_verdicts(ns, bpffs, cluster_targets(nodes))
    clear = {k: v for k, v in verdicts.items() if v[0] != VERDICT_ENCRYPT}
    assert clear == {}


def test_growing_cluster_gets_a_larger_generation_in_the_same_link(node, bpffs):
    ns, ifindex, make = node
    dp, metrics = make()
    with in_netns(ns):
        dp.apply(desired(ifindex, range(20)))  # 40 entries per family: fits 64
        first = dp.observe()
    assert first.ready, first.reason
    assert first.details["capacity"] == {"ipv4": 64, "ipv6": 64}
    link = first.details["devices"][0]["link_id"]
    assert_all_encrypted(ns, bpffs, range(20))

    with in_netns(ns):
        dp.apply(desired(ifindex, range(300)))  # 600 per family
        grown = dp.observe()
    assert grown.ready, grown.reason
    # 600 + 25 % head-room, a power of two, bounded by the hard cap
    assert grown.details["capacity"] == {"ipv4": 1000, "ipv6": 1000}
    assert grown.details["generation"] == first.details["generation"] + 1
    assert pins.generations(bpffs) == [grown.details["generation"]]
    assert grown.details["devices"][0]["link_id"] == link
    assert grown.details["devices"][0]["prog_id"] != first.details["devices"][0]["prog_id"]
    assert (
        metrics.registry.get_sample_value("nodecryptor_datapath_capacity", {"family": "ipv4"})
        == 1000
    )
    assert_all_encrypted(ns, bpffs, range(300))


def test_beyond_the_hard_cap_is_refused_whole_and_the_previous_state_enforces(node, bpffs):
    ns, ifindex, make = node
    dp, metrics = make()
    with in_netns(ns):
        dp.apply(desired(ifindex, range(30)))
        prog = dp.observe().details["prog_id"]
        with pytest.raises(
            DatapathError, match="1200 IPv4 destinations exceed the hard cap of 1000"
        ):
            dp.apply(desired(ifindex, range(600)))
        obs = dp.observe()
    assert not obs.ready and "1200 IPv6 destinations exceed the hard cap of 1000" in obs.reason
    assert metrics.registry.get_sample_value("nodecryptor_capacity_refused_total") == 1
    assert obs.details["devices"][0]["prog_id"] == prog
    assert_all_encrypted(ns, bpffs, range(30))
    # Back within the cap: applied, ready again.
    with in_netns(ns):
        dp.apply(desired(ifindex, range(40)))
        assert dp.observe().ready


def test_fresh_node_beyond_the_hard_cap_attaches_nothing(node, bpffs):
    ns, ifindex, make = node
    dp, _ = make()
    with in_netns(ns):
        with pytest.raises(DatapathError, match="hard cap"):
            dp.apply(desired(ifindex, range(600)))
        assert attach.tcx_observe(bpffs, "eth0") is None
        assert not dp.observe().ready


def _failing_after(monkeypatch, calls: int):
    real = syscall.map_update
    count = {"n": 0}

    def update(fd, key, value, flags=0):
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(errno.ENOMEM, "injected")
        return real(fd, key, value, flags)

    monkeypatch.setattr(syscall, "map_update", update)


@pytest.mark.parametrize("fail_after", [0, 5, 30])
def test_write_failing_midway_in_place_leaves_previous_state_enforcing(
    node, bpffs, monkeypatch, fail_after
):
    ns, ifindex, make = node
    dp, _ = make()
    with in_netns(ns):
        dp.apply(desired(ifindex, range(0, 20)))
        # Nodes 10..29: ten leave, ten join; still fits in place (30 <= 64).
        _failing_after(monkeypatch, fail_after)
        with pytest.raises(DatapathError):
            dp.apply(desired(ifindex, range(10, 30)))
        monkeypatch.undo()
        assert not dp.observe().ready
    assert_all_encrypted(ns, bpffs, range(0, 20))


def test_write_failing_while_growing_keeps_the_running_generation(node, bpffs, monkeypatch):
    ns, ifindex, make = node
    dp, _ = make()
    with in_netns(ns):
        dp.apply(desired(ifindex, range(20)))
        before = dp.observe()
        _failing_after(monkeypatch, 100)
        with pytest.raises(DatapathError):
            dp.apply(desired(ifindex, range(300)))
        monkeypatch.undo()
        after = dp.observe()
    assert after.details["devices"][0]["prog_id"] == before.details["devices"][0]["prog_id"]
    assert pins.current_generation(bpffs) == before.details["generation"]
    assert pins.generations(bpffs) == [before.details["generation"]]
    assert_all_encrypted(ns, bpffs, range(20))
    with in_netns(ns):  # the next pass grows
        dp.apply(desired(ifindex, range(300)))
        assert dp.observe().ready
    assert_all_encrypted(ns, bpffs, range(300))


def test_full_range_exempt_spec_fits_and_never_clears_non_exempt_traffic(node, bpffs):
    ns, ifindex, make = node
    dp, _ = make()
    with in_netns(ns):
        dp.apply(desired(ifindex, range(5), exempt="1-65535,udp/1-65535,sctp/1-65535"))
        assert dp.observe().ready
    cp = [(node_addr(4, 0), port) for port in (1, 6443, 40000, 65535)]
    cp += [(node_addr(6, 0), port) for port in (1, 65535)]
    verdicts = attached_verdicts(ns, bpffs, cp)
    assert {v for v in verdicts.values()} == {(VERDICT_EXEMPT, "exempt-control-plane-port")}
    # workers and every pod (also the control-plane node's) stay encrypted on any port
    others = [
        (dst, port)
        for dst, _ in cluster_targets(range(5))
        for port in (1, 6443, 65535)
        if dst not in (node_addr(4, 0), node_addr(6, 0))
    ]
    clear = {
        k: v for k, v in attached_verdicts(ns, bpffs, others).items() if v[0] != VERDICT_ENCRYPT
    }
    assert clear == {}
