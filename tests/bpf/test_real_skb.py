"""The program on a real tcx egress hook with real TCP, where test-run cannot reach: socket
buffers with CHECKSUM_PARTIAL, GSO super-packets, neighbour resolution, TCX_NEXT.

Two namespaces joined by two veth pairs: ``u`` is the underlay (addresses, routes) and ``w``
stands in for the WireGuard device (the program redirects into it; its far end has the
underlay peer's MAC, so B accepts what arrives there). A's underlay egress runs the program;
192.168.77.2 is a cluster destination, 192.168.77.3 (also on B) is not.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import threading

import pytest

from conftest import have_bcc, require
from nodecryptor_testkit.netns import entered as netns_entered
from nodecryptor.datapath.bpf import program, syscall
from nodecryptor.datapath.bpf.maps import decode, diff
from nodecryptor.core.model import (
    KIND_NODE_IP,
    ROLE_WORKER,
    DesiredState,
    Destination,
    Plan,
    WgState,
)
from nodecryptor.core.ports import parse_port_spec
from nodecryptor.core.settings import FailMode, Settings
from nodecryptor_testkit import netns as netns_mod

pytestmark = [pytest.mark.privileged, pytest.mark.bpf]

A_IP, B_IP, B_OTHER_IP = "192.168.77.1", "192.168.77.2", "192.168.77.3"
MSS = 1000
TCP_MAXSEG = 2


in_netns = netns_entered  # this thread in a network namespace for a block


def sh(ns: str, *cmd: str) -> str:
    return netns_mod.run(*cmd, netns=ns).stdout


def rx_packets(ns: str, dev: str) -> int:
    return json.loads(sh(ns, "ip", "-j", "-s", "link", "show", dev))[0]["stats64"]["rx"]["packets"]


@pytest.fixture
def pair(netns):
    require(os.geteuid() == 0, "needs root")
    ok, why = have_bcc()
    require(ok, why)
    ok, why = syscall.tcx_supported()
    require(ok, f"tcx (kernel >= 6.6): {why}")
    a, b = netns("ska"), netns("skb")
    for peer_a, peer_b in (("u_a", "u_b"), ("w_a", "w_b")):
        sh(a, "ip", "link", "add", peer_a, "type", "veth", "peer", "name", peer_b, "netns", b)
    mac = json.loads(sh(b, "ip", "-j", "link", "show", "u_b"))[0]["address"]
    sh(b, "ip", "link", "set", "w_b", "address", mac)
    sh(a, "ip", "addr", "add", f"{A_IP}/24", "dev", "u_a")
    sh(b, "ip", "addr", "add", f"{B_IP}/24", "dev", "u_b")
    sh(b, "ip", "addr", "add", f"{B_OTHER_IP}/24", "dev", "u_b")
    for ns, devs in ((a, ("u_a", "w_a")), (b, ("u_b", "w_b"))):
        for dev in devs:
            sh(ns, "ip", "link", "set", dev, "up")
    for key in ("all", "default", "w_b", "u_b"):
        sh(b, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0")
    with in_netns(a):
        wg_ifindex = socket.if_nametoindex("w_a")
        underlay = socket.if_nametoindex("u_a")
    return a, b, wg_ifindex, underlay


def desired_config(wg_ifindex: int) -> DesiredState:
    """One cluster destination (B_IP), WireGuard stand-in up, MSS clamp to ``MSS``."""
    plan = Plan(
        node="a",
        role=ROLE_WORKER,
        local_addresses=(ipaddress.ip_address(A_IP),),
        destinations=(Destination(ipaddress.ip_network(f"{B_IP}/32"), "b", KIND_NODE_IP, False),),
        exempt_ports=parse_port_spec("6443"),
    )
    wg = WgState(
        ifname="w_a", ifindex=wg_ifindex, present=True, up=True, mtu=1420, listen_port=51871
    )
    return DesiredState(
        plan=plan,
        wg=wg,
        devices=(),
        fail_mode=FailMode.CLOSED,
        enabled=True,
        mss_v4=MSS,
        mss_v6=MSS,
        max_packet_v4=1420,
        max_packet_v6=1420,
        wg_port=51871,
    )


def tcp_exchange(a: str, b: str, dst: str, payload: bytes) -> tuple[int, bytes]:
    """Connect from A to ``dst``:5555 in B, send ``payload``; returns (the server socket's
    MSS, the bytes the server received)."""
    with in_netns(b):
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with server:
        server.bind((dst, 5555))
        server.listen(1)
        server.settimeout(10)
        received = bytearray()
        outcome: dict = {}

        def serve():
            conn, _ = server.accept()
            with conn:
                outcome["mss"] = conn.getsockopt(socket.IPPROTO_TCP, TCP_MAXSEG)
                while chunk := conn.recv(65536):
                    received.extend(chunk)

        thread = threading.Thread(target=serve)
        thread.start()
        with in_netns(a):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with client:
            client.settimeout(10)
            client.connect((dst, 5555))
            client.sendall(payload)
        thread.join(15)
        assert not thread.is_alive(), "server did not finish"
    return outcome["mss"], bytes(received)


def test_redirect_clamp_and_pass_through_on_a_real_hook(pair):
    a, b, wg_ifindex, underlay = pair
    loaded = program.load(Settings())
    link = None
    try:
        diff.sync(loaded.map_fds, desired_config(wg_ifindex))
        with in_netns(a):
            link = syscall.tcx_link_create(loaded.prog_fd, underlay)
        payload = os.urandom(300_000)
        before = rx_packets(b, "w_b")

        mss, got = tcp_exchange(a, b, B_IP, payload)
        assert got == payload
        assert mss <= MSS  # B saw the clamped option in A's SYN
        redirected = rx_packets(b, "w_b") - before
        assert redirected >= 10  # the data went through the stand-in for WireGuard

        mss_other, got_other = tcp_exchange(a, b, B_OTHER_IP, payload)
        assert got_other == payload
        assert mss_other > MSS  # not a cluster destination: untouched
        assert rx_packets(b, "w_b") - before == redirected  # and not redirected

        counters = decode.read_counters(loaded.map_fds)
        assert counters["mss-clamped"]["packets"] == 1
        assert counters["cluster-destination"]["packets"] >= redirected
        assert counters["not-cluster-destination"]["packets"] >= 3
        assert counters["not-ip"]["packets"] >= 1  # ARP passed through
    finally:
        if link is not None:
            link.close()  # an unpinned link detaches when its last fd closes
        loaded.close()
