"""Kernel handles have one owner: ``syscall.BpfObject`` closes its fd once, refuses to hand out a
closed number, and every call that opens a BPF object returns one. The leak meter is read
through maps.decode like every other map."""

from __future__ import annotations

import ctypes as C
import ipaddress
import os

import pytest

from conftest import require
from nodecryptor.datapath.bpf import abi, syscall
from nodecryptor.datapath.bpf.maps import decode


def test_an_object_closes_its_fd_once_and_then_refuses_the_number():
    read_end, write_end = os.pipe()
    try:
        with syscall.BpfObject(read_end) as obj:
            assert obj.fd == read_end and not obj.closed
        assert obj.closed
        with pytest.raises(OSError):
            os.fstat(read_end)  # really closed
        with pytest.raises(ValueError, match="closed"):
            _ = obj.fd  # a stale number may name another file by now
        obj.close()  # a second close is harmless
    finally:
        os.close(write_end)


def _created(spec: abi.MapSpec, entries: int) -> syscall.BpfObject:
    require(os.geteuid() == 0, "creating a BPF map needs root")
    return syscall.map_create(
        spec.map_type, spec.key_size, spec.value_size, entries, spec.flags, spec.name
    )


@pytest.mark.privileged
def test_created_maps_are_owned_and_closed_with_their_block():
    spec = abi.MAPS_BY_NAME[abi.CONFIG_MAP]
    with _created(spec, 1) as config_map:
        assert isinstance(config_map, syscall.BpfObject)
        assert syscall.map_info(config_map).max_entries == 1
    with pytest.raises(ValueError):
        syscall.map_info(config_map)


@pytest.mark.privileged
def test_leak_meter_is_decoded_newest_first_with_protocol_names():
    spec = abi.MAPS_BY_NAME[abi.LEAKS_MAP]
    with _created(spec, abi.LEAKS_MAX) as leaks:
        for src, proto, dport, last_ns, packets in (
            ("192.168.50.22", 17, 7777, 1_000, 3),
            ("fd00::22", 6, 2381, 3_000, 1),
        ):
            addr = ipaddress.ip_address(src)
            key = abi.LeakKey(family=addr.version, protocol=proto, dport=dport)
            C.memmove(key.src, addr.packed, len(addr.packed))
            syscall.map_update(leaks, key, abi.LeakVal(last_ns=last_ns, packets=packets))
        rows = decode.read_leaks(leaks, now_ns=5_000_000_000 + 3_000)
    assert rows == [
        {"src": "fd00::22", "protocol": "tcp", "dport": 2381, "packets": 1, "seconds_ago": 5.0},
        {
            "src": "192.168.50.22",
            "protocol": "udp",
            "dport": 7777,
            "packets": 3,
            "seconds_ago": 5.0,
        },
    ]
