"""Raw bpf(2) through ctypes for what BCC 0.26 and pyroute2 0.9 lack: pinning, reading pinned
maps without a compiler, object info, tcx links, program queries and BPF_PROG_TEST_RUN.

Every call that opens a kernel object (a pin, an id, a new map or tcx link) returns a
``BpfObject``: the one owner of that file descriptor, closed by ``close()`` or by leaving a
``with`` block. The other wrappers take a ``BpfObject`` or a plain fd someone else owns (BCC's),
return plain values, and raise OSError with the kernel's errno. Layouts follow
include/uapi/linux/bpf.h (union bpf_attr); only the fields used are declared.
"""

from __future__ import annotations

import ctypes as C
import errno
import os
import platform
from collections.abc import Iterator
from typing import Any, Union

_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), 321)

BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_MAP_GET_FD_BY_ID = 14
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_DETACH = 34

BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_F_REPLACE = 1 << 2
BPF_F_BEFORE = 1 << 3
BPF_F_AFTER = 1 << 4
BPF_F_ID = 1 << 5
BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

_libc = C.CDLL(None, use_errno=True)
_libc.syscall.restype = C.c_long


class BpfObject:
    """An open bpf(2) file descriptor and its only owner. ``close()`` is idempotent; a closed
    object refuses to hand out its number (a stale fd number may already name another file)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int):
        self._fd = fd

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError("BPF object already closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BpfObject(fd={self._fd})" if self._fd >= 0 else "BpfObject(closed)"


Fd = Union[int, BpfObject]
"""What the wrappers accept: an owned object, or the number of an fd owned elsewhere (BCC)."""


def fd_number(fd: Fd) -> int:
    """The number to hand to the kernel (or to mmap) for the length of one call."""
    return fd.fd if isinstance(fd, BpfObject) else fd


def error_text(e: OSError) -> str:
    """The kernel's word for an OSError from these wrappers (its message when it has no errno)."""
    return os.strerror(e.errno) if e.errno else str(e)


def _owned(fd: int) -> BpfObject:
    return BpfObject(fd)


def _bpf(cmd: int, attr: C.Structure) -> int:
    ret = _libc.syscall(C.c_long(_NR_BPF), C.c_int(cmd), C.byref(attr), C.c_uint(C.sizeof(attr)))
    if ret < 0:
        err = C.get_errno()
        raise OSError(err, f"bpf cmd {cmd}: {os.strerror(err)}")
    return ret


def _addr(buf: Any) -> int:
    return C.addressof(buf) if buf is not None else 0


class _MapElemAttr(C.Structure):
    _fields_ = [
        ("map_fd", C.c_uint32),
        ("pad", C.c_uint32),
        ("key", C.c_uint64),
        ("value", C.c_uint64),
        ("flags", C.c_uint64),
    ]


class _ObjAttr(C.Structure):
    _fields_ = [
        ("pathname", C.c_uint64),
        ("bpf_fd", C.c_uint32),
        ("file_flags", C.c_uint32),
        ("path_fd", C.c_int32),
        ("pad", C.c_uint32),
    ]


class _TestRunAttr(C.Structure):
    _fields_ = [
        ("prog_fd", C.c_uint32),
        ("retval", C.c_uint32),
        ("data_size_in", C.c_uint32),
        ("data_size_out", C.c_uint32),
        ("data_in", C.c_uint64),
        ("data_out", C.c_uint64),
        ("repeat", C.c_uint32),
        ("duration", C.c_uint32),
        ("ctx_size_in", C.c_uint32),
        ("ctx_size_out", C.c_uint32),
        ("ctx_in", C.c_uint64),
        ("ctx_out", C.c_uint64),
        ("flags", C.c_uint32),
        ("cpu", C.c_uint32),
        ("batch_size", C.c_uint32),
        ("pad", C.c_uint32),
    ]


class _GetIdAttr(C.Structure):
    _fields_ = [("id", C.c_uint32), ("next_id", C.c_uint32), ("open_flags", C.c_uint32)]


class _InfoAttr(C.Structure):
    _fields_ = [("bpf_fd", C.c_uint32), ("info_len", C.c_uint32), ("info", C.c_uint64)]


class _QueryAttr(C.Structure):
    _fields_ = [
        ("target", C.c_uint32),
        ("attach_type", C.c_uint32),
        ("query_flags", C.c_uint32),
        ("attach_flags", C.c_uint32),
        ("prog_ids", C.c_uint64),
        ("count", C.c_uint32),
        ("pad", C.c_uint32),
        ("prog_attach_flags", C.c_uint64),
        ("link_ids", C.c_uint64),
        ("link_attach_flags", C.c_uint64),
        ("revision", C.c_uint64),
    ]


class _LinkCreateAttr(C.Structure):
    _fields_ = [
        ("prog_fd", C.c_uint32),
        ("target_ifindex", C.c_uint32),
        ("attach_type", C.c_uint32),
        ("flags", C.c_uint32),
        ("relative", C.c_uint32),
        ("pad", C.c_uint32),
        ("expected_revision", C.c_uint64),
        ("pad2", C.c_uint64 * 2),
    ]


class _LinkUpdateAttr(C.Structure):
    _fields_ = [
        ("link_fd", C.c_uint32),
        ("new_prog_fd", C.c_uint32),
        ("flags", C.c_uint32),
        ("old_prog_fd", C.c_uint32),
    ]


class _LinkDetachAttr(C.Structure):
    _fields_ = [("link_fd", C.c_uint32)]


class _MapCreateAttr(C.Structure):
    _fields_ = [
        ("map_type", C.c_uint32),
        ("key_size", C.c_uint32),
        ("value_size", C.c_uint32),
        ("max_entries", C.c_uint32),
        ("map_flags", C.c_uint32),
        ("inner_map_fd", C.c_uint32),
        ("numa_node", C.c_uint32),
        ("map_name", C.c_char * 16),
    ]


class ProgInfo(C.Structure):
    _fields_ = [
        ("type", C.c_uint32),
        ("id", C.c_uint32),
        ("tag", C.c_uint8 * 8),
        ("jited_prog_len", C.c_uint32),
        ("xlated_prog_len", C.c_uint32),
        ("jited_prog_insns", C.c_uint64),
        ("xlated_prog_insns", C.c_uint64),
        ("load_time", C.c_uint64),
        ("created_by_uid", C.c_uint32),
        ("nr_map_ids", C.c_uint32),
        ("map_ids", C.c_uint64),
        ("name", C.c_char * 16),
        ("ifindex", C.c_uint32),
        ("_rest", C.c_uint8 * 160),
    ]


class MapInfo(C.Structure):
    _fields_ = [
        ("type", C.c_uint32),
        ("id", C.c_uint32),
        ("key_size", C.c_uint32),
        ("value_size", C.c_uint32),
        ("max_entries", C.c_uint32),
        ("map_flags", C.c_uint32),
        ("name", C.c_char * 16),
        ("ifindex", C.c_uint32),
        ("_rest", C.c_uint8 * 64),
    ]


class LinkInfo(C.Structure):
    _fields_ = [
        ("type", C.c_uint32),
        ("id", C.c_uint32),
        ("prog_id", C.c_uint32),
        ("pad", C.c_uint32),
        ("tcx_ifindex", C.c_uint32),
        ("tcx_attach_type", C.c_uint32),
        ("_rest", C.c_uint8 * 64),
    ]


BPF_LINK_TYPE_TCX = 11


# ---- objects -------------------------------------------------------------------------------

BPF_F_RDONLY = 1 << 3


def obj_pin(fd: Fd, path: str) -> None:
    p = C.create_string_buffer(path.encode())
    _bpf(BPF_OBJ_PIN, _ObjAttr(pathname=C.addressof(p), bpf_fd=fd_number(fd)))


def obj_get(path: str, read_only: bool = False) -> BpfObject:
    """Open a pinned object (read-only for maps when asked)."""
    p = C.create_string_buffer(path.encode())
    flags = BPF_F_RDONLY if read_only else 0
    return _owned(_bpf(BPF_OBJ_GET, _ObjAttr(pathname=C.addressof(p), file_flags=flags)))


def _info(fd: Fd, info: Any) -> Any:
    _bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        _InfoAttr(bpf_fd=fd_number(fd), info_len=C.sizeof(info), info=C.addressof(info)),
    )
    return info


def prog_info(fd: Fd) -> ProgInfo:
    info: ProgInfo = _info(fd, ProgInfo())
    return info


_PROG_INFO_VERIFIED_INSNS = 216  # offsetof(struct bpf_prog_info, verified_insns), Linux 5.16+


def prog_verified_insns(fd: Fd) -> int:
    """Instructions the verifier processed to accept the program (0 before Linux 5.16)."""
    return int.from_bytes(bytes(prog_info(fd))[_PROG_INFO_VERIFIED_INSNS:][:4], "little")


def prog_map_ids(fd: Fd) -> list[int]:
    """Ids of the maps a program uses (two BPF_OBJ_GET_INFO_BY_FD calls: count, then ids)."""
    count = prog_info(fd).nr_map_ids
    ids = (C.c_uint32 * max(count, 1))()
    info = ProgInfo(nr_map_ids=count, map_ids=C.addressof(ids))
    _info(fd, info)
    return sorted(ids[: min(count, info.nr_map_ids)])


def map_info(fd: Fd) -> MapInfo:
    info: MapInfo = _info(fd, MapInfo())
    return info


def link_info(fd: Fd) -> LinkInfo:
    info: LinkInfo = _info(fd, LinkInfo())
    return info


def prog_fd_by_id(prog_id: int) -> BpfObject:
    return _owned(_bpf(BPF_PROG_GET_FD_BY_ID, _GetIdAttr(id=prog_id)))


def map_fd_by_id(map_id: int) -> BpfObject:
    return _owned(_bpf(BPF_MAP_GET_FD_BY_ID, _GetIdAttr(id=map_id)))


def link_fd_by_id(link_id: int) -> BpfObject:
    return _owned(_bpf(BPF_LINK_GET_FD_BY_ID, _GetIdAttr(id=link_id)))


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, flags: int = 0, name: str = ""
) -> BpfObject:
    return _owned(
        _bpf(
            BPF_MAP_CREATE,
            _MapCreateAttr(
                map_type=map_type,
                key_size=key_size,
                value_size=value_size,
                max_entries=max_entries,
                map_flags=flags,
                map_name=name.encode()[:15],
            ),
        )
    )


# ---- map elements --------------------------------------------------------------------------


def map_lookup(fd: Fd, key: Any, value: Any) -> bool:
    """Fill ``value`` (a ctypes object) from ``key``; False when the key is absent."""
    try:
        _bpf(
            BPF_MAP_LOOKUP_ELEM,
            _MapElemAttr(map_fd=fd_number(fd), key=C.addressof(key), value=C.addressof(value)),
        )
        return True
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise


def map_update(fd: Fd, key: Any, value: Any, flags: int = BPF_ANY) -> None:
    _bpf(
        BPF_MAP_UPDATE_ELEM,
        _MapElemAttr(
            map_fd=fd_number(fd), key=C.addressof(key), value=C.addressof(value), flags=flags
        ),
    )


def map_delete(fd: Fd, key: Any) -> bool:
    """Delete ``key``; a missing key is success (returns False)."""
    try:
        _bpf(BPF_MAP_DELETE_ELEM, _MapElemAttr(map_fd=fd_number(fd), key=C.addressof(key)))
        return True
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise


def map_keys(fd: Fd, key_type: type) -> Iterator[Any]:
    """Iterate the keys of a map (a snapshot: keys deleted meanwhile may restart the walk)."""
    key = None
    while True:
        nxt = key_type()
        try:
            _bpf(
                BPF_MAP_GET_NEXT_KEY,
                _MapElemAttr(map_fd=fd_number(fd), key=_addr(key), value=C.addressof(nxt)),
            )
        except OSError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        yield nxt
        key = nxt


def map_items(fd: Fd, key_type: type, value_type: type) -> Iterator[tuple[Any, Any]]:
    for key in map_keys(fd, key_type):
        value = value_type()
        if map_lookup(fd, key, value):
            yield key, value


def possible_cpus() -> int:
    """Number of possible CPUs, the stride of per-CPU map values."""
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def percpu_lookup(fd: Fd, key: Any, value_type: type[Any]) -> list[Any]:
    """Per-CPU map lookup: one value per possible CPU (each rounded up to 8 bytes)."""
    ncpu = possible_cpus()
    stride = (C.sizeof(value_type) + 7) & ~7
    buf = (C.c_uint8 * (stride * ncpu))()
    _bpf(
        BPF_MAP_LOOKUP_ELEM,
        _MapElemAttr(map_fd=fd_number(fd), key=C.addressof(key), value=C.addressof(buf)),
    )
    return [
        value_type.from_buffer_copy(bytes(buf[i * stride : i * stride + C.sizeof(value_type)]))
        for i in range(ncpu)
    ]


def percpu_update(fd: Fd, key: Any, values: list[Any]) -> None:
    """Per-CPU map update: one value per possible CPU (each rounded up to 8 bytes)."""
    ncpu = possible_cpus()
    if not values:
        return
    value_type = type(values[0])
    stride = (C.sizeof(value_type) + 7) & ~7
    buf = (C.c_uint8 * (stride * ncpu))()
    for i, value in enumerate(values[:ncpu]):
        C.memmove(C.addressof(buf) + i * stride, C.addressof(value), C.sizeof(value_type))
    _bpf(
        BPF_MAP_UPDATE_ELEM,
        _MapElemAttr(map_fd=fd_number(fd), key=C.addressof(key), value=C.addressof(buf)),
    )


# ---- programs, tcx links -------------------------------------------------------------------


def prog_test_run(
    prog_fd: Fd, data: bytes, ctx_in: bytes | None = None, ctx_out_size: int = 0, repeat: int = 1
) -> tuple[int, bytes, bytes, int]:
    """BPF_PROG_TEST_RUN. Returns (retval, data_out, ctx_out, duration_ns per run)."""
    din = C.create_string_buffer(data, len(data))
    dout = C.create_string_buffer(len(data) + 256)
    cin = C.create_string_buffer(ctx_in, len(ctx_in)) if ctx_in else None
    cout = C.create_string_buffer(ctx_out_size) if ctx_out_size else None
    attr = _TestRunAttr(
        prog_fd=fd_number(prog_fd),
        data_size_in=len(data),
        data_size_out=C.sizeof(dout),
        data_in=C.addressof(din),
        data_out=C.addressof(dout),
        repeat=repeat,
        ctx_size_in=len(ctx_in) if ctx_in else 0,
        ctx_size_out=ctx_out_size,
        ctx_in=_addr(cin),
        ctx_out=_addr(cout),
    )
    _bpf(BPF_PROG_TEST_RUN, attr)
    # A signed view of retval: TCX_NEXT / TC_ACT_UNSPEC is -1.
    retval = C.c_int32(attr.retval).value
    return (
        retval,
        dout.raw[: attr.data_size_out],
        cout.raw[: attr.ctx_size_out] if cout else b"",
        attr.duration,
    )


def prog_query(
    ifindex: int, attach_type: int = BPF_TCX_EGRESS, max_count: int = 64
) -> dict[str, Any]:
    """BPF_PROG_QUERY on a device hook: program ids and link ids in chain order, revision."""
    prog_ids = (C.c_uint32 * max_count)()
    link_ids = (C.c_uint32 * max_count)()
    attr = _QueryAttr(
        target=ifindex,
        attach_type=attach_type,
        prog_ids=C.addressof(prog_ids),
        count=max_count,
        link_ids=C.addressof(link_ids),
    )
    _bpf(BPF_PROG_QUERY, attr)
    n = attr.count
    return {
        "prog_ids": list(prog_ids[:n]),
        "link_ids": list(link_ids[:n]),
        "revision": attr.revision,
    }


def tcx_supported(ifindex: int = 1) -> tuple[bool, str]:
    """Probe tcx with a query on the loopback device: EINVAL means the kernel has no tcx."""
    try:
        prog_query(ifindex, BPF_TCX_EGRESS)
        return True, "BPF_PROG_QUERY with BPF_TCX_EGRESS succeeded"
    except OSError as e:
        return False, f"BPF_PROG_QUERY with BPF_TCX_EGRESS failed: {error_text(e)}"


def tcx_link_create(
    prog_fd: Fd,
    ifindex: int,
    attach_type: int = BPF_TCX_EGRESS,
    flags: int = BPF_F_BEFORE,
    relative: int = 0,
) -> BpfObject:
    """Attach ``prog_fd`` to the device's tcx hook; with BPF_F_BEFORE and no anchor the
    program goes to the head of the chain. Returns the link (unpinned, it lives as long as
    this object stays open)."""
    return _owned(
        _bpf(
            BPF_LINK_CREATE,
            _LinkCreateAttr(
                prog_fd=fd_number(prog_fd),
                target_ifindex=ifindex,
                attach_type=attach_type,
                flags=flags,
                relative=relative,
            ),
        )
    )


def link_update(link_fd: Fd, new_prog_fd: Fd, old_prog_fd: Fd | None = None) -> None:
    """Swap the link's program atomically (with BPF_F_REPLACE when ``old_prog_fd`` is given).
    ENOLINK means the link is defunct (its device is gone)."""
    attr = _LinkUpdateAttr(link_fd=fd_number(link_fd), new_prog_fd=fd_number(new_prog_fd))
    if old_prog_fd is not None:
        attr.flags = BPF_F_REPLACE
        attr.old_prog_fd = fd_number(old_prog_fd)
    _bpf(BPF_LINK_UPDATE, attr)


def link_detach(link_fd: Fd) -> None:
    _bpf(BPF_LINK_DETACH, _LinkDetachAttr(link_fd=fd_number(link_fd)))
