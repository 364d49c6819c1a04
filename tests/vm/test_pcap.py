"""The pcap decoder the VM checks count with (vm-tests/guest/pcap.py), on crafted frames: a
wrong decoder would make "0 clear packets" or "0 fragments" meaningless. Runs on the host, fast.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import struct
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PCAP_PY = os.path.join(REPO, "vm-tests", "guest", "pcap.py")


@pytest.fixture(scope="module")
def pcap():
    spec = importlib.util.spec_from_file_location("nc_vm_pcap", PCAP_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def ipv4(
    src: str, dst: str, proto: int, payload: bytes, frag: int = 0, total: int | None = None
) -> bytes:
    length = total if total is not None else 20 + len(payload)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x45,
        0,
        length,
        1,
        frag,
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return header + payload


def tcp(sport: int, dport: int, flags: int, options: bytes = b"", data: bytes = b"") -> bytes:
    doff = (20 + len(options)) // 4
    return (
        struct.pack("!HHIIBBHHH", sport, dport, 0, 0, doff << 4, flags, 65535, 0, 0)
        + options
        + data
    )


def udp(sport: int, dport: int, data: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(data), 0) + data


def ether(ip: bytes, ethertype: int = 0x0800) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + struct.pack("!H", ethertype) + ip


def write_pcap(path, linktype: int, frames: list[bytes]) -> str:
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype))
        for frame in frames:
            f.write(struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame)
    return str(path)


def test_ethernet_capture_decodes_tcp_udp_fragments_and_skips_other_frames(pcap, tmp_path):
    mss_nop_ws = b"\x02\x04\x05\xb4" + b"\x01" + b"\x03\x03\x07"
    frames = [
        ether(ipv4("192.168.50.1", "10.0.2.10", 6, tcp(40000, 8080, 0x02, mss_nop_ws))),
        ether(
            ipv4(
                "192.168.50.1",
                "192.168.50.2",
                17,
                udp(51871, 51871, b"x" * 100),
                frag=0x2000,
                total=1500,
            )
        ),
        ether(ipv4("192.168.50.1", "192.168.50.2", 17, b"y" * 40, frag=185)),
        ether(b"\x00" * 28, ethertype=0x0806),  # ARP: not IP, skipped
        ether(ipv4("192.168.50.1", "192.168.50.2", 6, tcp(40001, 6443, 0x18, data=b"GET"))),
    ]
    packets = pcap.read(write_pcap(tmp_path / "e.pcap", pcap.LINKTYPE_ETHERNET, frames))
    assert len(packets) == 4
    syn, first, rest, psh = packets
    assert (syn.proto, syn.sport, syn.dport, syn.mss) == (6, 40000, 8080, 1460)
    assert not syn.fragment and syn.has_port(8080) and syn.between("10.0.2.10")
    assert first.first_fragment and first.fragment and first.dport == 51871
    assert first.length == 1500
    assert rest.fragment and not rest.first_fragment and rest.frag_offset == 185
    assert (rest.sport, rest.dport) == (0, 0)  # non-first fragments carry no ports
    assert psh.payload == 3 and psh.mss == 0


def test_raw_ip_capture_of_the_wireguard_device(pcap, tmp_path):
    frames = [ipv4("192.168.50.1", "10.0.2.10", 1, b"\x08\x00" + b"\x00" * 62)]
    (packet,) = pcap.read(write_pcap(tmp_path / "r.pcap", pcap.LINKTYPE_RAW, frames))
    assert (packet.src, packet.dst, packet.proto) == ("192.168.50.1", "10.0.2.10", 1)


def test_unknown_file_is_rejected(pcap, tmp_path):
    path = tmp_path / "bad.pcap"
    path.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="not a pcap"):
        pcap.read(str(path))
