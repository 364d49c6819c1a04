"""The lab's pure parts: address plan, pcap decoding, flow classification, leak detection,
the stand-in's peer computation, and the state file's crash clean-up. Fast; root only for the
clean-up test that creates a namespace."""

from __future__ import annotations

import ipaddress
import os
import struct
import subprocess
import sys

import pytest

from nodecryptor_testkit.lab import capture, flows, spec, state, standin
from nodecryptor_testkit import netns as netns_mod


def ip4(src: str, dst: str, proto: int, payload: bytes, frag_offset: int = 0) -> bytes:
    total = 20 + len(payload)
    return (
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            total,
            1,
            frag_offset,
            64,
            proto,
            0,
            ipaddress.IPv4Address(src).packed,
            ipaddress.IPv4Address(dst).packed,
        )
        + payload
    )


def ip6(src: str, dst: str, next_header: int, payload: bytes) -> bytes:
    return (
        struct.pack(
            "!IHBB16s16s",
            6 << 28,
            len(payload),
            next_header,
            64,
            ipaddress.IPv6Address(src).packed,
            ipaddress.IPv6Address(dst).packed,
        )
        + payload
    )


def ports(sport: int, dport: int) -> bytes:
    return struct.pack("!HH", sport, dport) + bytes(16)


def pcap(linktype: int, frames: list[bytes], nanos: bool = False) -> bytes:
    magic = 0xA1B23C4D if nanos else 0xA1B2C3D4
    out = struct.pack("<IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)
    for i, frame in enumerate(frames):
        out += struct.pack("<IIII", 100 + i, 500, len(frame), len(frame)) + frame
    return out


def eth(ethertype: int, packet: bytes) -> bytes:
    return bytes(12) + struct.pack("!H", ethertype) + packet


def sll2(ethertype: int, packet: bytes) -> bytes:
    return struct.pack("!HH", ethertype, 0) + bytes(16) + packet


def test_make_spec_roles_and_addresses():
    lab = spec.make_spec(5, control_planes=2)
    assert [n.name for n in lab.nodes] == ["cp1", "cp2", "w1", "w2", "w3"]
    assert [n.name for n in lab.control_plane] == ["cp1", "cp2"]
    w1 = lab.node("w1")
    assert str(w1.ipv4) == "192.168.50.13" and str(w1.pod_cidr_v4) == "10.244.3.0/24"
    assert w1.pod_ipv6 in w1.pod_cidr_v6 and w1.pod_ipv4 in w1.pod_cidr_v4
    assert len({n.ipv6 for n in lab.nodes}) == 5


@pytest.mark.parametrize("nodes,cps", [(1, 1), (2, 2), (3, 0), (201, 1)])
def test_make_spec_rejects_impossible_labs(nodes, cps):
    with pytest.raises(ValueError, match="nodes=|control_planes="):
        spec.make_spec(nodes, cps)


def test_ciliumnode_object_is_what_the_parser_reads():
    from nodecryptor.policy.ciliumnode import parse_ciliumnode

    node = spec.make_spec(3).node("cp1")
    info, rejections = parse_ciliumnode(spec.ciliumnode_object(node, "A" * 43 + "="))
    assert rejections == []
    assert ("node-role.kubernetes.io/control-plane", "") in info.labels
    assert {a for _, a in info.addresses} == {node.ipv4, node.ipv6}
    assert info.wg_public_key == "A" * 43 + "="


@pytest.mark.parametrize(
    "linktype,wrap", [(capture.LINKTYPE_ETHERNET, eth), (capture.LINKTYPE_LINUX_SLL2, sll2)]
)
def test_read_pcap_decodes_both_families(tmp_path, linktype, wrap):
    frames = [
        wrap(0x0800, ip4("192.168.50.12", "192.168.50.13", 6, ports(20001, 8080))),
        wrap(0x0800, ip4("192.168.50.12", "192.168.50.13", 17, ports(51871, 51871))),
        # IPv6 with a hop-by-hop header in front of TCP
        wrap(0x86DD, ip6("fd50::12", "fd50::13", 0, bytes([6, 0]) + bytes(6) + ports(20002, 6443))),
        wrap(0x86DD, ip6("fd50::12", "fd50::13", 58, bytes([135, 0, 0, 0]))),
        wrap(0x0800, ip4("10.244.2.10", "10.244.3.10", 17, b"data", frag_offset=185)),
        wrap(0x0806, bytes(28)),  # ARP: not IP, skipped
    ]
    path = tmp_path / "c.pcap"
    path.write_bytes(pcap(linktype, frames))
    pkts = capture.read_pcap(str(path))
    assert len(pkts) == 5
    assert (pkts[0].proto, pkts[0].sport, pkts[0].dport) == (6, 20001, 8080)
    assert pkts[0].ts == pytest.approx(100.0005)
    assert pkts[1].wireguard and not pkts[0].wireguard
    assert (pkts[2].proto, pkts[2].dport) == (6, 6443)
    assert pkts[3].neighbour_discovery
    assert pkts[4].fragment and pkts[4].sport == 0


def test_later_fragments_of_a_wireguard_datagram_are_not_leaks(tmp_path):
    """A WireGuard datagram fragmented on the underlay: only its first fragment carries the
    UDP header. Its later fragments (same addresses and IP id) are encrypted, not clear text;
    the later fragment of a clear UDP datagram, or of another id, still is a leak."""
    more = 0x2000  # IPv4 more-fragments flag
    frames = [
        eth(0x0800, ip4(src, dst, 17, payload, frag_offset=off))
        for src, dst, payload, off in (
            ("192.168.50.11", "192.168.50.12", ports(51871, 51871), more),  # WG, first
            ("192.168.50.11", "192.168.50.12", b"tail", 185),  # its rest
            ("192.168.50.11", "192.168.50.13", ports(40000, 5353), more),  # clear, first
            ("192.168.50.11", "192.168.50.13", b"tail", 185),
        )
    ]  # its rest
    path = tmp_path / "f.pcap"
    path.write_bytes(pcap(capture.LINKTYPE_ETHERNET, frames))
    pkts = capture.read_pcap(str(path))
    assert [p.frag_id for p in pkts] == [1, 1, 1, 1]  # ip4() writes IP id 1
    assert pkts[0].wireguard and pkts[1].fragment and pkts[3].fragment
    assert flows.leaks(pkts, spec.make_spec(3)) == pkts[2:]


def test_read_pcap_nanosecond_and_truncated(tmp_path):
    frame = eth(0x0800, ip4("192.168.50.12", "192.168.50.13", 6, ports(1, 2)))
    raw = pcap(capture.LINKTYPE_ETHERNET, [frame, frame], nanos=True)
    path = tmp_path / "n.pcap"
    path.write_bytes(raw[:-5])  # the last record is cut short, as when tcpdump is killed
    pkts = capture.read_pcap(str(path))
    assert len(pkts) == 1 and pkts[0].ts == pytest.approx(100.0000005)


@pytest.mark.parametrize(
    "through,clear,expected",
    [
        (True, 0, flows.ENCRYPTED),
        (True, 3, flows.CLEAR),
        (False, 0, flows.BLOCKED),
        (False, 1, flows.LEAKED),
    ],
)
def test_classify(through, clear, expected):
    assert flows.classify(through, clear) == expected


def P(src, dst, proto=6, sport=40000, dport=8080):
    return capture.Packet(ipaddress.ip_address(src), ipaddress.ip_address(dst), proto, sport, dport)


def test_leaks_ignores_exempt_wireguard_and_foreign_traffic():
    lab = spec.make_spec(3)
    packets = [
        P("192.168.50.12", "192.168.50.11", dport=6443),  # to cp apiserver: exempt
        P("192.168.50.11", "192.168.50.12", sport=6443, dport=40000),  # its reply: exempt
        P("192.168.50.12", "192.168.50.13", 17, 51871, 51871),  # WireGuard
        P("192.168.50.12", "192.168.50.250"),  # not a cluster address
        P("192.168.50.12", "192.168.50.13", dport=6443),  # 6443 on a worker: leak
        P("10.244.2.10", "192.168.50.11", dport=8080),  # pod to cp, not exempt: leak
        P("192.168.50.12", "192.168.50.11", 17, 40000, 6443),  # UDP 6443: leak
        P("192.168.50.13", "192.168.50.12", sport=6443, dport=40000),  # worker "reply": leak
    ]
    assert flows.leaks(packets, lab) == packets[4:]


def test_packets_of_matches_both_directions_of_one_flow_only():
    pkts = [
        P("192.168.50.12", "192.168.50.13", sport=20001),
        P("192.168.50.13", "192.168.50.12", sport=8080, dport=20001),
        P("192.168.50.12", "192.168.50.13", sport=20002),
        P("192.168.50.12", "192.168.50.13", 17, 20001, 8080),
    ]
    got = flows._packets_of("192.168.50.12", "192.168.50.13", "tcp", 20001, 8080, pkts)
    assert got == pkts[:2]


def test_standin_desired_peers_like_cilium():
    lab = spec.make_spec(3)
    objs = [
        spec.ciliumnode_object(n, key)
        for n, key in zip(lab.nodes, ["A" * 43 + "=", "B" * 43 + "=", None])
    ]
    peers = standin.desired_peers(objs, local="w1")
    # w1 itself and w2 (no key yet) are not peers
    assert list(peers) == ["A" * 43 + "="]
    allowed, endpoint = peers["A" * 43 + "="]
    assert endpoint == "192.168.50.11:51871"
    assert allowed == {"192.168.50.11/32", "fd50::11/128", "10.244.1.0/24", "fd44:0:0:1::/64"}


def test_reap_stale_removes_a_dead_owners_lab_but_not_a_live_or_kept_one(tmp_path, root):
    # A "crashed run": a child process records a namespace and a sleeping process, then dies.
    code = (
        "import subprocess, sys\n"
        "from nodecryptor_testkit.lab.state import LabState\n"
        "from nodecryptor_testkit import netns\n"
        f"s = LabState.new({str(tmp_path)!r})\n"
        "s.add_netns(netns.create('crash'))\n"
        "p = subprocess.Popen(['sleep', '600'], start_new_session=True,\n"
        "                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "s.add_process(p.pid, 'sleeper')\n"
        "print(s.path, s.netns[0], p.pid)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    path, ns, pid = out[0], out[1], int(out[2])
    live = state.LabState.new(str(tmp_path))  # owned by this (live) process
    try:
        assert os.path.exists(f"/run/netns/{ns}")
        assert state.reap_stale(str(tmp_path)) == [path]
        assert not os.path.exists(f"/run/netns/{ns}")
        assert not os.path.exists(path)
        assert state.process_start_time(pid) is None or _is_zombie(pid)
        assert os.path.exists(live.path)
    finally:
        netns_mod.delete(ns)
        state.reap(live)


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def test_reap_never_kills_a_recycled_pid(tmp_path):
    proc = subprocess.Popen(["sleep", "600"])
    try:
        s = state.LabState.new(str(tmp_path))
        s.processes.append((proc.pid, state.process_start_time(proc.pid) + 1, "not it"))
        s.save()
        state.reap(s, grace=0.1)
        assert proc.poll() is None  # a different start time: left alone
    finally:
        proc.kill()
        proc.wait()
