"""Writing a DesiredState into the program's maps, and reading the maps back, with raw bpf(2)
only (no compiler): the agent syncs through here and ``nodecryptor bpf dump`` reads through here.

``sync`` is an idempotent diff against what the maps hold, checked against the maps' capacity
before anything is written (``CapacityError``: the caller grows the maps instead). Order matters
for traffic in flight, and makes an interrupted sync leave a superset of the previous state:

1. filter bits (summary and bloom, see nc_abi.h) of new destinations are set (the filters
   stay a superset of the maps);
2. new and changed destinations and local addresses are written;
3. the exempt ranges, then the configuration entry (prefix lengths to look up, ``enabled``), so
   a program that sees a prefix length or ``enabled`` finds complete tables;
4. stale destinations and addresses are deleted (never before the new ones exist);
5. the filters are made exact.

This module is also the one place that decodes the maps (``read``, ``decode_config``) for
``bpf dump``, ``status`` and the agent.
"""

from __future__ import annotations

import ctypes as C
import ipaddress
import mmap
import os
import sys
import time
from dataclasses import dataclass

from nodecryptor.core.errors import DatapathError
from nodecryptor.core.model import KIND_NODE_IP, ROLE_CONTROL_PLANE, DesiredState
from nodecryptor.core.ports import PROTOCOL_NAMES
from nodecryptor.core.settings import FailMode
from nodecryptor.datapath.bpf import abi, syscall

_KIND_NAMES = {abi.KIND_NODE_IP: "node-ip", abi.KIND_POD_CIDR: "pod-cidr"}


class CapacityError(DatapathError):
    """The maps cannot hold the desired state next to the entries they hold now. Raised by
    ``sync`` before it writes anything."""

    def __init__(self, family: int, needed: int, capacity: int):
        self.family, self.needed, self.capacity = family, needed, capacity
        super().__init__(f"IPv{family} destinations: {needed} entries needed during the update, "
                         f"map capacity {capacity}")


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


def desired_destinations(desired: DesiredState) -> dict[str, dict[bytes, bytes]]:
    """{map name: {key bytes: value bytes}} for the destination hashes and LPM tries: an entry
    goes to its family's hash when its prefix length has a slot (the PLEN_SLOTS longest
    lengths of the family), else to the family's trie."""
    out: dict[str, dict[bytes, bytes]] = {
        name: {} for name in (*abi.DESTINATION_MAPS.values(), *abi.LPM_MAPS.values())}
    slots = {family: set(prefix_lengths(desired, family)[:abi.PLEN_SLOTS]) for family in (4, 6)}
    bits = policy_bits(desired)
    for dest in desired.destinations:
        flags = 0
        if dest.control_plane:
            flags |= abi.DST_F_CONTROL_PLANE
        if dest.prefix in desired.uncovered:
            flags |= abi.DST_F_UNCOVERED
        kind = abi.KIND_NODE_IP if dest.kind == KIND_NODE_IP else abi.KIND_POD_CIDR
        serves = 0
        for r in dest.exempt_ports:
            serves |= 1 << bits[r.policy]
        clients = 0
        for name in dest.client_of:
            clients |= 1 << bits[name]
        value = abi.DstInfo(kind=kind, flags=flags, serves=serves, clients=clients)
        family = dest.prefix.version
        table = (abi.DESTINATION_MAPS if dest.prefix.prefixlen in slots[family]
                 else abi.LPM_MAPS)[family]
        out[table][bytes(_dst_key(dest.prefix))] = bytes(value)
    return out


def destination_counts(desired: DesiredState) -> dict[int, int]:
    """Destinations by family, what the destination maps must hold."""
    counts = {4: 0, 6: 0}
    for dest in desired.destinations:
        counts[dest.prefix.version] += 1
    return counts


def policy_bits(desired: DesiredState) -> dict[str, int]:
    """Policy name -> its bit in the destination masks and exempt ranges (the plan's order)."""
    names = desired.plan.policies
    if len(names) > abi.POLICIES_MAX:
        raise DatapathError(f"{len(names)} exemption policies; the program holds at most "
                            f"{abi.POLICIES_MAX}")
    return {name: i for i, name in enumerate(names)}


def policy_ranges(desired: DesiredState) -> list:
    """Every exemption policy's ranges (exemptions.PolicyRange) in bit order: what nc_exempt
    holds, one entry each."""
    plan = desired.plan
    seen: dict = {}
    for r in plan.serves:
        seen.setdefault(r, None)
    for dest in plan.destinations:
        for r in dest.exempt_ports:
            seen.setdefault(r, None)
    bits = policy_bits(desired)
    return sorted(seen, key=lambda r: (bits[r.policy], r.protocol, r.first, r.last))


def desired_exempt(desired: DesiredState) -> abi.ExemptRanges:
    """The exempt ranges as the program scans them, each tagged with its policy's bit. Every
    range is exempt both as destination port (towards the policy's serving nodes, when the
    destination's ``serves`` mask has the bit) and as source port (replies from the local
    node's addresses, when the destination's ``clients`` mask has it)."""
    ranges = policy_ranges(desired)
    if len(ranges) > abi.EXEMPT_RANGES_MAX:
        raise DatapathError(f"{len(ranges)} exempt port ranges; the program holds at most "
                            f"{abi.EXEMPT_RANGES_MAX}")
    bits = policy_bits(desired)
    out = abi.ExemptRanges(count=len(ranges))
    for i, rng in enumerate(ranges):
        out.r[i] = abi.PortRange(protocol=rng.range.proto_number,
                                 flags=abi.EXEMPT_DPORT | abi.EXEMPT_SPORT,
                                 first=rng.first, last=rng.last, policy=bits[rng.policy])
    return out


def prefix_lengths(desired: DesiredState, family: int) -> list[int]:
    """Distinct prefix lengths of one family, longest first: the order the program tries."""
    return sorted({d.prefix.prefixlen for d in desired.destinations
                   if d.prefix.version == family}, reverse=True)


def _fold(top32: int) -> int:
    return (top32 >> 16) ^ (top32 & 0xFFFF)


def summary_bits(prefix) -> range | list[int]:
    """Summary bit indices (0..65535, per family) a prefix overlaps; see nc_abi.h."""
    net = int(prefix.network_address)
    if prefix.version == 4:
        top = net >> 16
        if prefix.prefixlen >= 16:
            return [top]
        return range(top, top + (1 << (16 - prefix.prefixlen)))
    top = net >> 96
    if prefix.prefixlen >= 32:
        return [_fold(top)]
    if prefix.prefixlen <= 16:
        return range(1 << 16)  # every fold value occurs
    return sorted({_fold(t) for t in range(top, top + (1 << (32 - prefix.prefixlen)))})


_U32 = 0xFFFFFFFF


def bloom_bits(prefix) -> tuple[int, int]:
    """The two bloom filter bits of one destination entry, as nc_bloom_maybe computes them."""
    net, plen = int(prefix.network_address), prefix.prefixlen
    if prefix.version == 4:
        mixed = (net + plen) & _U32
    else:
        # The program mixes the address words as it loads them: in the machine's byte order.
        packed = prefix.network_address.packed
        words = [int.from_bytes(packed[i:i + 4], sys.byteorder) for i in range(0, 16, 4)]
        mixed = plen
        for word, k in zip(words, (abi.HASH_K0, abi.HASH_K1, abi.HASH_K2, abi.HASH_K3)):
            mixed ^= (word * k) & _U32
    shift = 32 - abi.BLOOM_BITS
    return ((mixed * abi.HASH_K0) & _U32) >> shift, ((mixed * abi.HASH_K2) & _U32) >> shift


def desired_filter(desired: DesiredState) -> list[int]:
    """The words of nc_summary: the summary bits (v4 words 0..1023, v6 1024..2047), then the
    bloom filters (v4, v6) of the destination entries."""
    words = [0] * abi.FILTER_WORDS
    for dest in desired.destinations:
        v4 = dest.prefix.version == 4
        base = 0 if v4 else abi.SUMMARY_V6_BASE
        for bit in summary_bits(dest.prefix):
            words[base + (bit >> 6)] |= 1 << (bit & 63)
        bloom = abi.BLOOM_V4_BASE if v4 else abi.BLOOM_V6_BASE
        for bit in bloom_bits(dest.prefix):
            words[bloom + (bit >> 6)] |= 1 << (bit & 63)
    return words


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
    v4, v6 = prefix_lengths(desired, 4), prefix_lengths(desired, 6)
    slots = abi.PLEN_SLOTS
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
        ingress_mode=_INGRESS_MODES.get(desired.ingress_enforcement, abi.INGRESS_AUDIT),
        wg_mark=desired.wg_mark,
        wg_mark_mask=desired.wg_mark_mask,
        max_packet_v4=desired.max_packet_v4,
        max_packet_v6=desired.max_packet_v6,
        agent_alive_ns=now_ns,
        n_plen_v4=min(len(v4), slots),
        n_plen_v6=min(len(v6), slots),
        lpm_v4=1 if len(v4) > slots else 0,
        lpm_v6=1 if len(v6) > slots else 0,
        plen_v4=(C.c_uint8 * slots)(*v4[:slots]),
        plen_v6=(C.c_uint8 * slots)(*v6[:slots]),
        mask_v6=(C.c_uint32 * (4 * slots))(*_netmask_words(v6[:slots])),
    )


_INGRESS_MODES = {"off": abi.INGRESS_OFF, "audit": abi.INGRESS_AUDIT,
                  "enforce": abi.INGRESS_ENFORCE}
_INGRESS_NAMES = {v: k for k, v in _INGRESS_MODES.items()}


def _netmask_words(lengths: list[int]) -> list[int]:
    """Per IPv6 prefix length the four 32-bit words of its netmask as the program loads them
    (network order bytes read in the machine's byte order)."""
    out = []
    for plen in lengths:
        packed = ipaddress.IPv6Network(f"::/{plen}").netmask.packed
        out += [int.from_bytes(packed[i:i + 4], sys.byteorder) for i in range(0, 16, 4)]
    return out


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


class _Filter:
    """nc_summary mapped into memory (BPF_F_MMAPABLE): read and rewritten word by word
    without a syscall per word; each aligned 8-byte store is seen whole by the program."""

    def __init__(self, fd: int):
        size = abi.FILTER_WORDS * 8
        size += -size % mmap.PAGESIZE
        self._mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.words = memoryview(self._mm).cast("Q")

    def read(self) -> list[int]:
        return self.words[:abi.FILTER_WORDS].tolist()

    def write(self, have: list[int], want: list[int]) -> None:
        for i, (old, new) in enumerate(zip(have, want)):
            if old != new:
                self.words[i] = new

    def close(self) -> None:
        self.words.release()
        self._mm.close()


def sync(map_fds: dict[str, int], desired: DesiredState, now_ns: int | None = None,
         capacities: dict[int, int] | None = None) -> SyncStats:
    """Make the maps hold exactly ``desired``. Idempotent; a second call changes nothing but
    the config entry's agent_alive_ns. ``capacities`` ({4: n, 6: n}, default: read from the
    maps) bounds what the destination maps may hold while old and new entries coexist:
    CapacityError, before any write, when that is exceeded. Raises DatapathError when the
    kernel refuses a write, with the map named; what was written until then is a superset
    of the previous state (see the module docstring)."""
    if now_ns is None:
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # what bpf_ktime_get_ns reads
    dests = desired_destinations(desired)
    tables = [(abi.MAPS_BY_NAME[name], want) for name, want in dests.items()]
    tables.append((abi.MAPS_BY_NAME["nc_local"], desired_locals(desired)))
    pods = desired_cilium_pods(desired)
    tables += [(abi.MAPS_BY_NAME["nc_pods_v4"], pods[4]),
               (abi.MAPS_BY_NAME["nc_pods_v6"], pods[6])]
    added = updated = removed = 0
    filters = None
    try:
        current = [_current(_fd(map_fds, spec.name), spec) for spec, _ in tables]
        family_of = {name: f for maps_ in (abi.DESTINATION_MAPS, abi.LPM_MAPS)
                     for f, name in maps_.items()}
        for (spec, want), have in zip(tables, current):
            needed = len(have.keys() | want.keys())
            if spec.name in family_of:
                family = family_of[spec.name]
                capacity = ((capacities or {}).get(family)
                            or syscall.map_info(_fd(map_fds, spec.name)).max_entries)
                if needed > capacity:
                    raise CapacityError(family, needed, capacity)
            elif needed > (held := syscall.map_info(_fd(map_fds, spec.name)).max_entries):
                raise DatapathError(f"{len(want)} entries for {spec.name}; the map holds "
                                    f"{held}")
        filters = _Filter(_fd(map_fds, "nc_summary"))
        filter_have = filters.read()
        filter_want = desired_filter(desired)
        filter_union = [a | b for a, b in zip(filter_have, filter_want)]
        filters.write(filter_have, filter_union)
        for (spec, want), have in zip(tables, current):
            a, u = _upsert(_fd(map_fds, spec.name), spec, want, have)
            added, updated = added + a, updated + u
        exempt_fd = _fd(map_fds, "nc_exempt")
        old_exempt, new_exempt = abi.ExemptRanges(), desired_exempt(desired)
        syscall.map_lookup(exempt_fd, C.c_uint32(0), old_exempt)
        if bytes(old_exempt) != bytes(new_exempt):
            syscall.map_update(exempt_fd, C.c_uint32(0), new_exempt)
            updated += 1
        config_spec = abi.MAPS_BY_NAME["nc_config_map"]
        fd = _fd(map_fds, config_spec.name)
        old = abi.Config()
        syscall.map_lookup(fd, C.c_uint32(0), old)
        new = desired_config(desired, now_ns)
        syscall.map_update(fd, C.c_uint32(0), new)
        if _config_differs(old, new):
            updated += 1
        for (spec, want), have in zip(tables, current):
            removed += _prune(_fd(map_fds, spec.name), spec, want, have)
        filters.write(filter_union, filter_want)
    except OSError as e:
        raise DatapathError(f"writing BPF maps failed: {os.strerror(e.errno)}") from e
    finally:
        if filters is not None:
            filters.close()
    return SyncStats(added, updated, removed)


def copy_counters(src_fd: int, dst_fd: int) -> None:
    """Carry the per-CPU counters over to a new generation of maps, so a growth or a restart
    does not reset nodecryptor_datapath_packets_total."""
    # An older generation may have fewer counters (reasons are appended): copy what it has.
    for index in range(min(abi.COUNTER_MAX, syscall.map_info(src_fd).max_entries)):
        key = C.c_uint32(index)
        values = syscall.percpu_lookup(src_fd, key, abi.Counter)
        syscall.percpu_update(dst_fd, key, values)


CARRIED_LRUS = ("nc_flows", "nc_leaks")
"""LRU maps whose entries a new generation inherits: the exempt flows (an agent restart must
not break established bootstrap connections) and the leak meter."""


def copy_entries(src_fd: int, dst_fd: int, name: str) -> int:
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


# ---- reading -------------------------------------------------------------------------------

def _prefix_of(key) -> str:
    size = 4 if isinstance(key, abi.LpmV4) else 16
    addr = ipaddress.ip_address(bytes(key.addr)[:size])
    return str(ipaddress.ip_network(f"{addr}/{key.prefixlen}", strict=False))


def read_destinations(map_fds: dict[str, int]) -> list[dict]:
    out = []
    for name in (*abi.DESTINATION_MAPS.values(), *abi.LPM_MAPS.values()):
        spec = abi.MAPS_BY_NAME[name]
        for key, value in syscall.map_items(_fd(map_fds, name), spec.key, spec.value):
            out.append({"prefix": _prefix_of(key),
                        "kind": _KIND_NAMES.get(value.kind, f"unknown-{value.kind}"),
                        "control_plane": bool(value.flags & abi.DST_F_CONTROL_PLANE),
                        "uncovered": bool(value.flags & abi.DST_F_UNCOVERED),
                        "serves_mask": value.serves, "clients_mask": value.clients})
    out.sort(key=lambda d: (ipaddress.ip_network(d["prefix"]).version,
                            ipaddress.ip_network(d["prefix"])))
    return out


def read_exempt_ports(map_fds: dict[str, int]) -> list[dict]:
    ranges = abi.ExemptRanges()
    syscall.map_lookup(_fd(map_fds, "nc_exempt"), C.c_uint32(0), ranges)
    out = []
    for r in ranges.r[:min(ranges.count, abi.EXEMPT_RANGES_MAX)]:
        out.append({"protocol": PROTOCOL_NAMES.get(r.protocol, str(r.protocol)),
                    "first": r.first, "last": r.last,
                    "dport": bool(r.flags & abi.EXEMPT_DPORT),
                    "sport": bool(r.flags & abi.EXEMPT_SPORT),
                    "policy_bit": r.policy})
    return out


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


def decode_config(cfg: abi.Config) -> dict:
    """The configuration entry as plain data: the one decoding of it (``bpf dump``, ``status``
    and the agent all read it through here)."""
    out = {name: getattr(cfg, name) for name, _ in abi.Config._fields_
           if not name.startswith(("pad", "plen_", "n_plen_", "lpm_"))}
    out["local_role"] = ("control-plane" if cfg.local_role == abi.ROLE_CONTROL_PLANE
                         else "worker")
    out["fail_mode"] = "open" if cfg.fail_mode == abi.FAIL_OPEN else "closed"
    out["enabled"] = bool(cfg.enabled)
    out["ingress_mode"] = _INGRESS_NAMES.get(cfg.ingress_mode, f"unknown-{cfg.ingress_mode}")
    out["wg_up"] = bool(cfg.wg_up)
    out["prefix_lengths"] = {
        "v4": list(cfg.plen_v4[:min(cfg.n_plen_v4, abi.PLEN_SLOTS)]),
        "v6": list(cfg.plen_v6[:min(cfg.n_plen_v6, abi.PLEN_SLOTS)])}
    out["lpm"] = {"v4": bool(cfg.lpm_v4), "v6": bool(cfg.lpm_v6)}
    return out


def read_config(map_fds: dict[str, int]) -> dict:
    cfg = abi.Config()
    syscall.map_lookup(_fd(map_fds, "nc_config_map"), C.c_uint32(0), cfg)
    return decode_config(cfg)


def counters_of(fd: int) -> dict[str, dict]:
    """{reason or event name: {"packets", "bytes", "kind", "verdict"}} of a counters map fd,
    summed over CPUs; kind is "reason" or "event". The collector reads through here too."""
    out: dict[str, dict] = {}
    for index in range(abi.COUNTER_MAX):
        per_cpu = syscall.percpu_lookup(fd, C.c_uint32(index), abi.Counter)
        entry = {"packets": sum(c.packets for c in per_cpu),
                 "bytes": sum(c.bytes for c in per_cpu)}
        if index in abi.REASON_VALUES:
            reason = abi.Reason(index)
            entry.update(kind="reason", verdict=abi.REASON_VERDICTS[reason])
            out[abi.REASON_NAMES[reason]] = entry
        else:
            entry.update(kind="event", verdict="")
            out[abi.EVENT_NAMES[abi.Event(index)]] = entry
    return out


def read_counters(map_fds: dict[str, int]) -> dict[str, dict]:
    return counters_of(_fd(map_fds, "nc_counters"))


def read(map_fds: dict[str, int]) -> dict:
    """Every map decoded (what ``nodecryptor bpf dump`` prints)."""
    try:
        frag_spec = abi.MAPS_BY_NAME["nc_frags"]
        capacity = {f"v{family}": syscall.map_info(_fd(map_fds, name)).max_entries
                    for family, name in abi.DESTINATION_MAPS.items()}
        return {
            "destination_capacity": capacity,
            "config": read_config(map_fds),
            "destinations": read_destinations(map_fds),
            "exempt_ports": read_exempt_ports(map_fds),
            "local_addresses": read_local_addresses(map_fds),
            "cilium_pod_cidrs": read_cilium_pods(map_fds),
            "counters": read_counters(map_fds),
            "fragments_tracked": sum(1 for _ in syscall.map_keys(_fd(map_fds, frag_spec.name),
                                                                  frag_spec.key)),
            "exempt_flows_tracked": sum(1 for _ in syscall.map_keys(
                _fd(map_fds, "nc_flows"), abi.MAPS_BY_NAME["nc_flows"].key)),
            "leaks_tracked": sum(1 for _ in syscall.map_keys(
                _fd(map_fds, "nc_leaks"), abi.MAPS_BY_NAME["nc_leaks"].key)),
        }
    except OSError as e:
        raise DatapathError(f"reading BPF maps failed: {os.strerror(e.errno)}") from e

