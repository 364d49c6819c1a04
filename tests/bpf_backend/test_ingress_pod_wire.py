"""On the wire: a local pod's bootstrap connection under ``--ingress-enforcement enforce``.
Node A runs nodecryptor, node B (the lab's control-plane node) does not, so B's replies arrive
in the clear on A's underlay. A socket bound to A's pod address connects to B's 6443: the SYN
leaves exempt and is remembered with the pod's address, B's SYN-ACK to the pod passes (a flow
the pod opened), and B's other clear text to the pod is still refused and metered."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from bpf_backend_lab import in_netns
from test_bpfbackend_wire import Receiver, datapaths, lab, udp_socket  # noqa: F401 (fixtures)

from nodecryptor.datapath.bpf import abi, pins, syscall

pytestmark = [pytest.mark.privileged, pytest.mark.bpf]


def _map(bpffs: str, name: str) -> list:
    spec = abi.MAPS_BY_NAME[name]
    with syscall.obj_get(pins.map_path(bpffs, name), read_only=True) as obj:
        return list(syscall.map_items(obj, spec.key, spec.value))


def test_enforce_passes_a_pods_bootstrap_connection_and_refuses_the_rest(lab, bpffs, datapaths):
    a, b = lab.a, lab.b
    rx_a = Receiver(a.netns, udp_ports=(7777,))
    rx_b = Receiver(b.netns, tcp_ports=(6443,))
    try:
        settings = lab.settings(bpffs, ingress_enforcement="enforce")
        with in_netns(a.netns):
            dp = datapaths(settings)
            dp.start()
            dp.apply(lab.desired(settings))
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.settimeout(3)
            client.bind((a.pod_ip, 0))
        with client:
            # Completes only if B's clear SYN-ACK to the pod address passes A's ingress.
            client.connect((b.ip, 6443))
            client.sendall(b"pod bootstrap in enforce")
            pod_port = client.getsockname()[1]
            server, peer = rx_b.tcp[6443].accept()
            with server:
                server.settimeout(3)
                assert peer[0] == a.pod_ip
                assert server.recv(64) == b"pod bootstrap in enforce"
        flows = {
            (
                str(ipaddress.ip_address(bytes(k.local)[:4])),
                k.local_port,
                str(ipaddress.ip_address(bytes(k.remote)[:4])),
                k.remote_port,
            ): v.origin
            for k, v in _map(bpffs, "nc_flows")
        }
        assert flows[(a.pod_ip, pod_port, b.ip, 6443)] == abi.FLOW_OUTBOUND

        # B's clear UDP to the same pod address: refused and metered.
        sender = udp_socket(b.netns)
        with sender:
            for i in range(5):
                sender.sendto(b"clear-%d" % i, (a.pod_ip, 7777))
        assert rx_a.drain(7777, wait=1.0) == []
        with in_netns(a.netns):
            counters = dp.observe().counters
        assert counters["ingress-exempt-control-plane-reply"] >= 1
        assert counters["ingress-cleartext-dropped"] >= 5
        leaks = {
            (str(ipaddress.ip_address(bytes(k.src)[:4])), k.protocol, k.dport): v.packets
            for k, v in _map(bpffs, "nc_leaks")
        }
        assert leaks[(b.ip, 17, 7777)] >= 5
    finally:
        rx_a.close()
        rx_b.close()
