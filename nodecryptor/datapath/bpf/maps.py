"""Writing a DesiredState into the program's maps, and reading the maps back, with raw bpf(2)
only (no compiler): the agent syncs through here and ``nodecryptor bpf dump`` reads through here.

``sync`` is an idempotent diff against what the maps hold. Order matters for traffic in
flight: new and changed destinations, exempt ports and local addresses are written before stale
entries are deleted (a destination never falls out of the tries while it is still wanted), and
the configuration entry is written last, so a program that sees ``enabled`` sees complete
tables.
"""

from __future__ import annotations

import ctypes as C
import ipaddress
import os
import time
from dataclasses import dataclass

from ...errors import DatapathError
from ...model import KIND_NODE_IP, ROLE_CONTROL_PLANE, DesiredState
from ...ports import PROTOCOL_NAMES
from ...settings import FailMode
from . import abi, syscall

_KIND_NAMES = {abi.KIND_NODE_IP: "node-ip", abi.KIND_POD_CIDR: "pod-cidr"}


@dataclass(frozen=True)
class SyncStats:
    """Entries changed by one sync (the config entry counts as updated when it changed)."""

    added: int = 0
    updated: int = 0
    removed: int = 0

    def __add__(self, other: "SyncStats") -> "SyncStats":
        return SyncStats(self.added + other.added, self.updated + other.updated,
                         self.removed + other.removed)


def open_pinned(pin_dir: str) -> dict[str, int]:
    """Open every map pinned under ``pin_dir``: {abi map name: fd}. The caller closes the fds.
    Raises DatapathError naming the first missing pin."""
    fds: dict[str, int] = {}
    for spec in abi.MAP_SPECS:
        path = os.path.join(pin_dir, spec.name)
        try:
            fds[spec.name] = syscall.obj_get(path)
        except OSError as e:
            for fd in fds.values():
                os.close(fd)
            raise DatapathError(f"cannot open pinned map {path}: {os.strerror(e.errno)}") from e
    return fds


# ---- encoding ------------------------------------------------------------------------------

def _dst_key(prefix) -> C.Structure:
    key_type = abi.LpmV4 if prefix.version == 4 else abi.LpmV6
    key = key_type(prefixlen=prefix.prefixlen)
    packed = prefix.network_address.packed
    C.memmove(key.addr, packed, len(packed))
    return key


def _addr_key(addr) -> abi.AddrKey:
    key = abi.AddrKey(family=addr.version)
    packed = addr.packed
    C.memmove(key.addr, packed, len(packed))
    return key


def desired_destinations(desired: DesiredState) -> dict[int, dict[bytes, bytes]]:
    """{4 or 6: {key bytes: value bytes}} for the two LPM tries."""
    out: dict[int, dict[bytes, bytes]] = {4: {}, 6: {}}
    for dest in desired.destinations:
        flags = 0
        if dest.control_plane:
            flags |= abi.DST_F_CONTROL_PLANE
        if dest.prefix in desired.uncovered:
            flags |= abi.DST_F_UNCOVERED
        kind = abi.KIND_NODE_IP if dest.kind == KIND_NODE_IP else abi.KIND_POD_CIDR
        value = abi.DstInfo(kind=kind, flags=flags)
        out[dest.prefix.version][bytes(_dst_key(dest.prefix))] = bytes(value)
    return out


def desired_ports(desired: DesiredState) -> dict[bytes, bytes]:
    """Exempt (protocol, port) entries, ranges expanded. Every exempt port is exempt both as
    destination (towards control-plane nodes) and as source (replies of the local
    control-plane node); the program applies each only where it belongs."""
    out: dict[bytes, bytes] = {}
    flags = bytes(C.c_uint32(abi.EXEMPT_DPORT | abi.EXEMPT_SPORT))
    for rng in desired.plan.exempt_ports:
        for port in range(rng.first, rng.last + 1):
            out[bytes(abi.PortKey(protocol=rng.proto_number, port=port))] = flags
    return out


def desired_locals(desired: DesiredState) -> dict[bytes, bytes]:
    one = bytes(C.c_uint32(1))
    return {bytes(_addr_key(a)): one for a in desired.plan.local_addresses}


def desired_cilium_pods(desired: DesiredState) -> dict[int, dict[bytes, bytes]]:
    """{4 or 6: {key: value}} for nc_pods_v4/v6: the local pod CIDRs whose traffic to remote
    pod CIDRs the program leaves to Cilium (bpf/lib/cilium.h). Empty when taken over."""
    out: dict[int, dict[bytes, bytes]] = {4: {}, 6: {}}
    one = bytes(C.c_uint32(1))
    for cidr in desired.cilium_pod_cidrs:
        out[cidr.version][bytes(_dst_key(cidr))] = one
    return out


def desired_config(desired: DesiredState, now_ns: int) -> abi.Config:
    wg = desired.wg
    return abi.Config(
        wg_ifindex=wg.ifindex if wg.present else 0,
        enabled=1 if desired.enabled else 0,
        local_role=(abi.ROLE_CONTROL_PLANE if desired.plan.role == ROLE_CONTROL_PLANE
                    else abi.ROLE_WORKER),
        fail_mode=abi.FAIL_OPEN if desired.fail_mode == FailMode.OPEN else abi.FAIL_CLOSED,
        wg_up=1 if wg.usable else 0,
        mss_v4=desired.mss_v4,
        mss_v6=desired.mss_v6,
        wg_port=desired.wg_port,
        wg_mark=desired.wg_mark,
        wg_mark_mask=desired.wg_mark_mask,
        max_packet_v4=desired.max_packet_v4,
        max_packet_v6=desired.max_packet_v6,
        agent_alive_ns=now_ns,
    )


# ---- diffing -------------------------------------------------------------------------------

def _current(fd: int, spec: abi.MapSpec) -> dict[bytes, bytes]:
    return {bytes(k): bytes(v) for k, v in syscall.map_items(fd, spec.key, spec.value)}


def _upsert(fd: int, spec: abi.MapSpec, want: dict[bytes, bytes],
            have: dict[bytes, bytes]) -> tuple[int, int]:
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


def _prune(fd: int, spec: abi.MapSpec, want: dict[bytes, bytes],
           have: dict[bytes, bytes]) -> int:
    removed = 0
    for key in have.keys() - want.keys():
        if syscall.map_delete(fd, spec.key.from_buffer_copy(key)):
            removed += 1
    return removed


def _fd(map_fds: dict[str, int], name: str) -> int:
    try:
        return map_fds[name]
    except KeyError:
        raise DatapathError(f"map {name} missing from the loaded program's maps") from None


def sync(map_fds: dict[str, int], desired: DesiredState, now_ns: int | None = None) -> SyncStats:
    """Make the maps hold exactly ``desired``. Idempotent; a second call changes nothing but
    the config entry's agent_alive_ns. Raises DatapathError when the kernel refuses a write
    (e.g. a full map), with the map named."""
    if now_ns is None:
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # what bpf_ktime_get_ns reads
    dests = desired_destinations(desired)
    tables = [
        (abi.MAPS_BY_NAME["nc_dst_v4"], dests[4]),
        (abi.MAPS_BY_NAME["nc_dst_v6"], dests[6]),
        (abi.MAPS_BY_NAME["nc_exempt"], desired_ports(desired)),
        (abi.MAPS_BY_NAME["nc_local"], desired_locals(desired)),
    ]
    pods = desired_cilium_pods(desired)
    tables += [(abi.MAPS_BY_NAME["nc_pods_v4"], pods[4]), (abi.MAPS_BY_NAME["nc_pods_v6"], pods[6])]
    added = updated = removed = 0
    try:
        current = [_current(_fd(map_fds, spec.name), spec) for spec, _ in tables]
        for (spec, want), have in zip(tables, current):
            a, u = _upsert(_fd(map_fds, spec.name), spec, want, have)
            added, updated = added + a, updated + u
        for (spec, want), have in zip(tables, current):
            removed += _prune(_fd(map_fds, spec.name), spec, want, have)
        config_spec = abi.MAPS_BY_NAME["nc_config_map"]
        fd = _fd(map_fds, config_spec.name)
        old = abi.Config()
        syscall.map_lookup(fd, C.c_uint32(0), old)
        new = desired_config(desired, now_ns)
        syscall.map_update(fd, C.c_uint32(0), new)
        if _config_differs(old, new):
            updated += 1
    except OSError as e:
        raise DatapathError(f"writing BPF maps failed: {os.strerror(e.errno)}") from e
    return SyncStats(added, updated, removed)


def _config_differs(old: abi.Config, new: abi.Config) -> bool:
    """Compare all fields but the heartbeat, which changes on every sync."""
    return any(getattr(old, name) != getattr(new, name)
               for name, _ in abi.Config._fields_ if name != "agent_alive_ns")


# ---- reading -------------------------------------------------------------------------------

def _prefix_of(key) -> str:
    size = 4 if isinstance(key, abi.LpmV4) else 16
    addr = ipaddress.ip_address(bytes(key.addr)[:size])
    return str(ipaddress.ip_network(f"{addr}/{key.prefixlen}", strict=False))


def read_destinations(map_fds: dict[str, int]) -> list[dict]:
    out = []
    for name in ("nc_dst_v4", "nc_dst_v6"):
        spec = abi.MAPS_BY_NAME[name]
        for key, value in syscall.map_items(_fd(map_fds, name), spec.key, spec.value):
            out.append({"prefix": _prefix_of(key),
                        "kind": _KIND_NAMES.get(value.kind, f"unknown-{value.kind}"),
                        "control_plane": bool(value.flags & abi.DST_F_CONTROL_PLANE),
                        "uncovered": bool(value.flags & abi.DST_F_UNCOVERED)})
    out.sort(key=lambda d: (ipaddress.ip_network(d["prefix"]).version,
                            ipaddress.ip_network(d["prefix"])))
    return out


def read_exempt_ports(map_fds: dict[str, int]) -> list[dict]:
    """Exempt entries collapsed back into ranges of equal protocol and flags."""
    spec = abi.MAPS_BY_NAME["nc_exempt"]
    entries = sorted((k.protocol, k.port, v.value)
                     for k, v in syscall.map_items(_fd(map_fds, spec.name), spec.key, spec.value))
    ranges: list[dict] = []
    for proto, port, flags in entries:
        last = ranges[-1] if ranges else None
        if (last and last["_proto"] == proto and last["_flags"] == flags
                and last["last"] == port - 1):
            last["last"] = port
            continue
        ranges.append({"_proto": proto, "_flags": flags,
                       "protocol": PROTOCOL_NAMES.get(proto, str(proto)), "first": port,
                       "last": port, "dport": bool(flags & abi.EXEMPT_DPORT),
                       "sport": bool(flags & abi.EXEMPT_SPORT)})
    for r in ranges:
        del r["_proto"], r["_flags"]
    return ranges


def read_local_addresses(map_fds: dict[str, int]) -> list[str]:
    spec = abi.MAPS_BY_NAME["nc_local"]
    out = []
    for key in syscall.map_keys(_fd(map_fds, spec.name), spec.key):
        size = 4 if key.family == 4 else 16
        out.append(str(ipaddress.ip_address(bytes(key.addr)[:size])))
    return sorted(out, key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))


def read_cilium_pods(map_fds: dict[str, int]) -> list[str]:
    """Local pod CIDRs whose pod-to-pod traffic is left to Cilium."""
    out = []
    for name in ("nc_pods_v4", "nc_pods_v6"):
        spec = abi.MAPS_BY_NAME[name]
        out += [_prefix_of(k) for k in syscall.map_keys(_fd(map_fds, name), spec.key)]
    return out


def read_config(map_fds: dict[str, int]) -> dict:
    cfg = abi.Config()
    syscall.map_lookup(_fd(map_fds, "nc_config_map"), C.c_uint32(0), cfg)
    out = {name: getattr(cfg, name) for name, _ in abi.Config._fields_ if name != "pad0"}
    out["local_role"] = ("control-plane" if cfg.local_role == abi.ROLE_CONTROL_PLANE
                         else "worker")
    out["fail_mode"] = "open" if cfg.fail_mode == abi.FAIL_OPEN else "closed"
    out["enabled"] = bool(cfg.enabled)
    out["wg_up"] = bool(cfg.wg_up)
    return out


def read_counters(map_fds: dict[str, int]) -> dict[str, dict]:
    """{reason or event name: {"packets", "bytes", "kind", "verdict"}}, summed over CPUs."""
    fd = _fd(map_fds, "nc_counters")
    out: dict[str, dict] = {}
    for index in range(abi.COUNTER_MAX):
        per_cpu = syscall.percpu_lookup(fd, C.c_uint32(index), abi.Counter)
        entry = {"packets": sum(c.packets for c in per_cpu),
                 "bytes": sum(c.bytes for c in per_cpu)}
        if index < abi.MAX_VERDICT:
            reason = abi.Reason(index)
            entry.update(kind="reason", verdict=abi.REASON_VERDICTS[reason])
            out[abi.REASON_NAMES[reason]] = entry
        else:
            entry.update(kind="event", verdict="")
            out[abi.EVENT_NAMES[abi.Event(index)]] = entry
    return out


def read(map_fds: dict[str, int]) -> dict:
    """Every map decoded (what ``nodecryptor bpf dump`` prints)."""
    try:
        frag_spec = abi.MAPS_BY_NAME["nc_frags"]
        return {
            "config": read_config(map_fds),
            "destinations": read_destinations(map_fds),
            "exempt_ports": read_exempt_ports(map_fds),
            "local_addresses": read_local_addresses(map_fds),
            "cilium_pod_cidrs": read_cilium_pods(map_fds),
            "counters": read_counters(map_fds),
            "fragments_tracked": sum(1 for _ in syscall.map_keys(_fd(map_fds, frag_spec.name),
                                                                  frag_spec.key)),
        }
    except OSError as e:
        raise DatapathError(f"reading BPF maps failed: {os.strerror(e.errno)}") from e

