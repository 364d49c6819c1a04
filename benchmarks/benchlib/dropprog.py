"""A two-instruction tc program that drops every packet, loaded with raw bpf(2) (no compiler),
and attached at tcx egress: the sink of the sender-ceiling measurement."""

from __future__ import annotations

import ctypes as C
import os
import socket

from nodecryptor.datapath.bpf import syscall

BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
TC_ACT_SHOT = 2


class _ProgLoad(C.Structure):
    _fields_ = [
        ("prog_type", C.c_uint32),
        ("insn_cnt", C.c_uint32),
        ("insns", C.c_uint64),
        ("license", C.c_uint64),
        ("log_level", C.c_uint32),
        ("log_size", C.c_uint32),
        ("log_buf", C.c_uint64),
        ("kern_version", C.c_uint32),
        ("prog_flags", C.c_uint32),
        ("prog_name", C.c_char * 16),
    ]


def load_drop() -> int:
    """fd of a SCHED_CLS program ``r0 = TC_ACT_SHOT; exit``."""
    code = (
        bytes([0xB7, 0, 0, 0])
        + TC_ACT_SHOT.to_bytes(4, "little")  # mov64 r0, imm
        + bytes([0x95, 0, 0, 0, 0, 0, 0, 0])
    )  # exit
    insns = (C.c_uint8 * len(code)).from_buffer_copy(code)
    lic = C.create_string_buffer(b"GPL")
    attr = _ProgLoad(
        prog_type=BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt=len(code) // 8,
        insns=C.addressof(insns),
        license=C.addressof(lic),
        prog_name=b"nc_bench_drop",
    )
    return syscall._bpf(BPF_PROG_LOAD, attr)


def attach_drop(device: str) -> tuple[int, syscall.BpfObject]:
    """(prog fd, link) of a drop program at the tcx egress of ``device`` in the calling
    thread's namespace. Closing both detaches it."""
    prog = load_drop()
    try:
        link = syscall.tcx_link_create(prog, socket.if_nametoindex(device), syscall.BPF_TCX_EGRESS)
    except OSError:
        os.close(prog)
        raise
    return prog, link
