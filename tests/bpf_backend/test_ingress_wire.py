"""The ingress program on the wire: node A runs nodecryptor, node B (the control-plane
node of the two-node lab) does not, so everything B sends to A arrives in the clear on A's
underlay. In ``enforce`` B's clear text is refused on the wire and metered while A's bootstrap
connection to B's 6443 keeps working (its replies are a flow A opened); in ``audit`` the same
clear text arrives and is metered; the MSS B advertised is clamped; ``cleanup`` removes the
ingress links."""

from __future__ import annotations

import dataclasses

import ipaddress
import socket

import pytest
import json

from bpf_backend_lab import in_netns, nodecryptor_cli
from test_bpfbackend_wire import Receiver, datapaths, lab, tcp_exchange, udp_socket  # noqa: F401 - fixtures

from bpf_backend_lab import WG_PORT

from nodecryptor.datapath.bpf import abi, attach, inspect, pins, syscall
from nodecryptor.datapath.bpf.maps import decode

pytestmark = [pytest.mark.privileged, pytest.mark.bpf]


def _leaks(bpffs: str) -> dict:
    spec = abi.MAPS_BY_NAME[abi.LEAKS_MAP]
    with syscall.obj_get(pins.map_path(bpffs, abi.LEAKS_MAP), read_only=True) as leaks:
        return {
            (str(ipaddress.ip_address(bytes(k.src)[:4])), k.protocol, k.dport): v.packets
            for k, v in syscall.map_items(leaks, spec.key, spec.value)
        }


def _send_udp(src_netns: str, dst: str, port: int, n: int = 5) -> None:
    s = udp_socket(src_netns)
    try:
        for i in range(n):
            s.sendto(b"clear-%d" % i, (dst, port))
    finally:
        s.close()


def test_enforce_refuses_peer_clear_text_audit_meters_it_bootstrap_works_in_both(
    lab, bpffs, datapaths
):
    a, b = lab.a, lab.b
    rx_a = Receiver(a.netns, udp_ports=(7777,), tcp_ports=(7779,))
    rx_b = Receiver(b.netns, tcp_ports=(6443,))
    try:
        settings = lab.settings(bpffs, ingress_enforcement="enforce")
        with in_netns(a.netns):
            dp = datapaths(settings)
            dp.start()
            dp.apply(lab.desired(settings))
            att = attach.tcx_observe(bpffs, "eth0", attach.INGRESS)
            # cilium_wg0 too: the MSS clamp of handshakes peers send through the tunnel.
            assert pins.pinned_link_names(bpffs, "ingress") == ["cilium_wg0", "eth0"]
        assert att is not None and att.position == 0 and not att.defunct

        # enforce: B's clear text never reaches A's socket; A's 6443 connection to B works.
        _send_udp(b.netns, a.ip, 7777)
        assert rx_a.drain(7777, wait=1.0) == []
        tcp_exchange(a.netns, b.ip, 6443, b"bootstrap in enforce")
        with in_netns(a.netns):
            counters = dp.observe().counters
        assert counters["ingress-cleartext-dropped"] >= 5
        assert counters["ingress-exempt-control-plane-reply"] >= 1
        assert _leaks(bpffs)[(b.ip, 17, 7777)] >= 5

        # audit: the same clear text arrives, and is metered.
        settings = lab.settings(bpffs, ingress_enforcement="audit")
        with in_netns(a.netns):
            dp.apply(lab.desired(settings))
        _send_udp(b.netns, a.ip, 7777)
        assert rx_a.drain(7777, wait=2.0, want=5)
        tcp_exchange(a.netns, b.ip, 6443, b"bootstrap in audit")
        with in_netns(a.netns):
            counters = dp.observe().counters
            config = decode.read_config(dp._loaded.map_fds)
        assert config["ingress_mode"] == "audit"
        assert counters["ingress-cleartext-audited"] >= 5
        assert _leaks(bpffs)[(b.ip, 17, 7777)] >= 10

        # The contract's commands, as an operator runs them on A.
        def cli(*args):
            return nodecryptor_cli(*args, "--bpffs", bpffs, mount_pid=a.wg_pid)

        res = cli("status", "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["ingress_enforcement"] == {
            "supported": True,
            "mode": "audit",
            "attached": ["cilium_wg0", "eth0"],
        }
        res = cli("status", "--leaks", "--json")
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        assert report["ingress_enforcement"] == "audit"
        [row] = [r for r in report["leaks"] if (r["src"], r["dport"]) == (b.ip, 7777)]
        assert row["protocol"] == "udp" and row["packets"] >= 10
        for argv, want in (
            (
                ("--src", b.ip, "--dst", a.ip, "--proto", "udp", "--dport", "7777"),
                ("pass", "ingress-cleartext-audited"),
            ),
            (
                ("--src", b.ip, "--dst", a.ip, "--proto", "tcp", "--sport", "6443", "--dport", "1"),
                ("pass", "ingress-cleartext-audited"),
            ),
            (
                ("--src", "198.51.100.9", "--dst", a.ip, "--proto", "tcp"),
                ("pass", "ingress-not-from-cluster-peer"),
            ),
            (
                (
                    "--src",
                    b.ip,
                    "--dst",
                    a.ip,
                    "--proto",
                    "udp",
                    "--sport",
                    str(WG_PORT),
                    "--dport",
                    str(WG_PORT),
                ),
                ("pass", "ingress-wireguard-port"),
            ),
        ):
            res = cli("explain", "--direction", "ingress", *argv, "--json")
            assert res.returncode == 0, res.stderr
            got = json.loads(res.stdout)
            assert (got["verdict"], got["reason"]) == want, argv
        bad = cli("explain", "--direction", "sideways", "--dst", a.ip)
        assert bad.returncode == 2 and "--direction" in bad.stderr
        from nodecryptor.datapath.bpf import collector

        totals = collector.cleartext_totals(collector.read_pinned_counters(bpffs))
        assert totals[("ingress", "audit")] >= 5 and totals[("ingress", "drop")] >= 5
        assert totals[("egress", "exempt")] >= 2 and totals[("ingress", "exempt")] >= 2

        # MSS: B's clear SYN advertises 1460; A's replies go through WireGuard, so the MSS A
        # uses towards B must be at most the clamp (1420 - 40).
        with in_netns(b.netns):
            client = socket.create_connection((a.ip, 7779), timeout=3)
        with client:
            server, _ = rx_a.tcp[7779].accept()
            with server:
                mss = server.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        assert mss <= 1380, mss
        with in_netns(a.netns):
            assert dp.observe().counters["ingress-mss-clamped"] >= 1
            dp.close()
            report = inspect.cleanup(settings)
            assert report["ingress_tcx_links"] == ["cilium_wg0", "eth0"]
            chain = syscall.prog_query(attach.ifindex_of("eth0"), syscall.BPF_TCX_INGRESS)
        assert chain["prog_ids"] == []
    finally:
        rx_a.close()
        rx_b.close()


def _flows(bpffs: str) -> dict:
    spec = abi.MAPS_BY_NAME[abi.FLOWS_MAP]
    with syscall.obj_get(pins.map_path(bpffs, abi.FLOWS_MAP), read_only=True) as flows:
        return {
            (str(ipaddress.ip_address(bytes(k.remote)[:4])), k.remote_port): v.origin
            for k, v in syscall.map_items(flows, spec.key, spec.value)
        }


def test_restart_carries_exempt_flows_and_leaks_into_the_new_generation(lab, bpffs, datapaths):
    """An agent restart whose program changed loads a new map generation; the established
    bootstrap flow and the leak meter come along, so the replies of an established exempt
    connection stay exempt. (A restart with the same program keeps its maps as they are.)"""
    a, b = lab.a, lab.b
    rx_b = Receiver(b.netns, tcp_ports=(6443,))
    try:
        settings = lab.settings(bpffs, ingress_enforcement="enforce")
        with in_netns(a.netns):
            first = datapaths(settings)
            first.start()
            first.apply(lab.desired(settings))
        tcp_exchange(a.netns, b.ip, 6443, b"before restart")
        _send_udp(b.netns, a.ip, 7777, n=2)
        before = _flows(bpffs)
        assert (b.ip, 6443) in before and before[(b.ip, 6443)] == abi.FLOW_OUTBOUND
        generation = pins.current_generation(bpffs)
        first.close()
        settings = dataclasses.replace(
            settings,
            map_sizes=dataclasses.replace(
                settings.map_sizes, fragments=settings.map_sizes.fragments * 2
            ),
        )
        with in_netns(a.netns):
            second = datapaths(settings)
            second.start()
            second.apply(lab.desired(settings))
        assert second.observe().details["program"]["source"] == "compiled"
        assert pins.current_generation(bpffs) != generation
        assert _flows(bpffs) == before
        assert _leaks(bpffs)[(b.ip, 17, 7777)] == 2
    finally:
        rx_b.close()
