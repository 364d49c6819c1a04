"""Writing a DesiredState into the program's maps: an idempotent diff against what they hold,
and the carrying of counters and LRU entries from one generation of maps to the next.

``sync`` is checked against the maps' capacity before anything is written (``CapacityError``:
the caller grows the maps instead). Order matters for traffic in flight, and makes an
interrupted sync leave a superset of the previous state:

1. filter bits (summary and bloom, see nc_abi.h) of new destinations are set (the filters
   stay a superset of the maps);
2. new and changed destinations and local addresses are written;
3. the exempt ranges, then the configuration entry (prefix lengths to look up, ``enabled``), so
   a program that sees a prefix length or ``enabled`` finds complete tables;
4. stale destinations and addresses are deleted (never before the new ones exist);
5. the filters are made exact.
"""

from __future__ import annotations

import ctypes as C
import mmap
import time
from collections.abc import Mapping
from dataclasses import dataclass

from nodecryptor.core.errors import DatapathError
from nodecryptor.core.model import DesiredState
from nodecryptor.datapath.bpf import abi, syscall
from nodecryptor.datapath.bpf.maps import encode
from nodecryptor.datapath.bpf.maps.pinned import fd_of
from nodecryptor.datapath.bpf.syscall import Fd


class CapacityError(DatapathError):
    """The maps cannot hold the desired state next to the entries they hold now. Raised by
    ``sync`` before it writes anything."""

    def __init__(self, family: int, needed: int, capacity: int):
        self.family, self.needed, self.capacity = family, needed, capacity
        super().__init__(
            f"IPv{family} destinations: {needed} entries needed during the update, "
            f"map capacity {capacity}"
        )


@dataclass(frozen=True)
class SyncStats:
    """Entries changed by one sync (the config entry counts as updated when it changed)."""

    added: int = 0
    updated: int = 0
    removed: int = 0

    def __add__(self, other: "SyncStats") -> "SyncStats":
        return SyncStats(
            self.added + other.added, self.updated + other.updated, self.removed + other.removed
        )


def _current(fd: Fd, spec: abi.MapSpec) -> dict[bytes, bytes]:
    return {bytes(k): bytes(v) for k, v in syscall.map_items(fd, spec.key, spec.value)}


def _upsert(
    fd: Fd, spec: abi.MapSpec, want: dict[bytes, bytes], have: dict[bytes, bytes]
) -> tuple[int, int]:
    added = updated = 0
    for key, value in want.items():
        old = have.get(key)
        if old == value:
            continue
        syscall.map_update(fd, spec.key.from_buffer_copy(key), spec.value.from_buffer_copy(value))
        if old is None:
            added += 1
        else:
            updated += 1
    return added, updated


def _prune(fd: Fd, spec: abi.MapSpec, want: dict[bytes, bytes], have: dict[bytes, bytes]) -> int:
    removed = 0
    for key in have.keys() - want.keys():
        if syscall.map_delete(fd, spec.key.from_buffer_copy(key)):
            removed += 1
    return removed


class _Filter:
    """nc_summary mapped into memory (BPF_F_MMAPABLE): read and rewritten word by word
    without a syscall per word; each aligned 8-byte store is seen whole by the program."""

    def __init__(self, fd: Fd):
        size = abi.FILTER_WORDS * 8
        size += -size % mmap.PAGESIZE
        self._mm = mmap.mmap(
            syscall.fd_number(fd), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self.words = memoryview(self._mm).cast("Q")

    def read(self) -> list[int]:
        return self.words[: abi.FILTER_WORDS].tolist()

    def write(self, have: list[int], want: list[int]) -> None:
        for i, (old, new) in enumerate(zip(have, want)):
            if old != new:
                self.words[i] = new

    def close(self) -> None:
        self.words.release()
        self._mm.close()


def sync(
    map_fds: Mapping[str, Fd],
    desired: DesiredState,
    now_ns: int | None = None,
    capacities: dict[int, int] | None = None,
) -> SyncStats:
    """Make the maps hold exactly ``desired``. Idempotent; a second call changes nothing but
    the config entry's agent_alive_ns. ``capacities`` ({4: n, 6: n}, default: read from the
    maps) bounds what the destination maps may hold while old and new entries coexist:
    CapacityError, before any write, when that is exceeded. Raises DatapathError when the
    kernel refuses a write, with the map named; what was written until then is a superset
    of the previous state (see the module docstring)."""
    if now_ns is None:
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # what bpf_ktime_get_ns reads
    dests = encode.desired_destinations(desired)
    tables = [(abi.MAPS_BY_NAME[name], want) for name, want in dests.items()]
    tables.append((abi.MAPS_BY_NAME[abi.LOCAL_MAP], encode.desired_locals(desired)))
    pods = encode.desired_cilium_pods(desired)
    tables += [
        (abi.MAPS_BY_NAME[abi.PODS_V4_MAP], pods[4]),
        (abi.MAPS_BY_NAME[abi.PODS_V6_MAP], pods[6]),
    ]
    added = updated = removed = 0
    filters = None
    try:
        current = [_current(fd_of(map_fds, spec.name), spec) for spec, _ in tables]
        family_of = {
            name: f for maps_ in (abi.DESTINATION_MAPS, abi.LPM_MAPS) for f, name in maps_.items()
        }
        for (spec, want), have in zip(tables, current):
            needed = len(have.keys() | want.keys())
            if spec.name in family_of:
                family = family_of[spec.name]
                capacity = (capacities or {}).get(family) or syscall.map_info(
                    fd_of(map_fds, spec.name)
                ).max_entries
                if needed > capacity:
                    raise CapacityError(family, needed, capacity)
            elif needed > (held := syscall.map_info(fd_of(map_fds, spec.name)).max_entries):
                raise DatapathError(f"{len(want)} entries for {spec.name}; the map holds {held}")
        filters = _Filter(fd_of(map_fds, abi.SUMMARY_MAP))
        filter_have = filters.read()
        filter_want = encode.desired_filter(desired)
        filter_union = [a | b for a, b in zip(filter_have, filter_want)]
        filters.write(filter_have, filter_union)
        for (spec, want), have in zip(tables, current):
            a, u = _upsert(fd_of(map_fds, spec.name), spec, want, have)
            added, updated = added + a, updated + u
        exempt_fd = fd_of(map_fds, abi.EXEMPT_MAP)
        old_exempt, new_exempt = abi.ExemptRanges(), encode.desired_exempt(desired)
        syscall.map_lookup(exempt_fd, C.c_uint32(0), old_exempt)
        if bytes(old_exempt) != bytes(new_exempt):
            syscall.map_update(exempt_fd, C.c_uint32(0), new_exempt)
            updated += 1
        config_spec = abi.MAPS_BY_NAME[abi.CONFIG_MAP]
        fd = fd_of(map_fds, config_spec.name)
        old = abi.Config()
        syscall.map_lookup(fd, C.c_uint32(0), old)
        new = encode.desired_config(desired, now_ns)
        syscall.map_update(fd, C.c_uint32(0), new)
        if _config_differs(old, new):
            updated += 1
        for (spec, want), have in zip(tables, current):
            removed += _prune(fd_of(map_fds, spec.name), spec, want, have)
        filters.write(filter_union, filter_want)
    except OSError as e:
        raise DatapathError(f"writing BPF maps failed: {syscall.error_text(e)}") from e
    finally:
        if filters is not None:
            filters.close()
    return SyncStats(added, updated, removed)


def copy_counters(src_fd: Fd, dst_fd: Fd) -> None:
    """Carry the per-CPU counters over to a new generation of maps, so a growth or a restart
    does not reset nodecryptor_datapath_packets_total."""
    # An older generation may have fewer counters (reasons are appended): copy what it has.
    for index in range(min(abi.COUNTER_MAX, syscall.map_info(src_fd).max_entries)):
        key = C.c_uint32(index)
        values = syscall.percpu_lookup(src_fd, key, abi.Counter)
        syscall.percpu_update(dst_fd, key, values)


CARRIED_LRUS = (abi.FLOWS_MAP, abi.LEAKS_MAP)
"""LRU maps whose entries a new generation inherits: the exempt flows (an agent restart must
not break established bootstrap connections) and the leak meter."""


def copy_entries(src_fd: Fd, dst_fd: Fd, name: str) -> int:
    """Copy every entry of map ``name`` from one generation to the next; returns the count.
    Entries that change while copying are refreshed by their next packet (bpf/lib/flows.h)."""
    spec = abi.MAPS_BY_NAME[name]
    copied = 0
    for key, value in syscall.map_items(src_fd, spec.key, spec.value):
        syscall.map_update(dst_fd, key, value)
        copied += 1
    return copied


def _config_differs(old: abi.Config, new: abi.Config) -> bool:
    """Compare all fields but the heartbeat, which changes on every sync."""
    a, b = abi.Config.from_buffer_copy(bytes(old)), abi.Config.from_buffer_copy(bytes(new))
    a.agent_alive_ns = b.agent_alive_ns = 0
    return bytes(a) != bytes(b)
