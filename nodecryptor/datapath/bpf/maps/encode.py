"""Encoding a DesiredState into the bytes the program's maps hold: destination entries, the
exempt ranges, local addresses, Cilium's pod CIDRs, the summary and bloom filters and the
configuration entry. Pure: no syscall; ``diff.sync`` writes what this module computes."""

from __future__ import annotations

import ctypes as C
import ipaddress
import sys

from nodecryptor.core.errors import DatapathError
from nodecryptor.core.model import KIND_NODE_IP, ROLE_CONTROL_PLANE, DesiredState
from nodecryptor.core.ports import PolicyRange
from nodecryptor.core.settings import FailMode
from nodecryptor.datapath.bpf import abi


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
        name: {} for name in (*abi.DESTINATION_MAPS.values(), *abi.LPM_MAPS.values())
    }
    slots = {family: set(prefix_lengths(desired, family)[: abi.PLEN_SLOTS]) for family in (4, 6)}
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
        table = (abi.DESTINATION_MAPS if dest.prefix.prefixlen in slots[family] else abi.LPM_MAPS)[
            family
        ]
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
        raise DatapathError(
            f"{len(names)} exemption policies; the program holds at most {abi.POLICIES_MAX}"
        )
    return {name: i for i, name in enumerate(names)}


def policy_ranges(desired: DesiredState) -> list[PolicyRange]:
    """Every exemption policy's ranges in bit order: what nc_exempt holds, one entry each."""
    plan = desired.plan
    seen: dict[PolicyRange, None] = {}
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
        raise DatapathError(
            f"{len(ranges)} exempt port ranges; the program holds at most {abi.EXEMPT_RANGES_MAX}"
        )
    bits = policy_bits(desired)
    out = abi.ExemptRanges(count=len(ranges))
    for i, rng in enumerate(ranges):
        out.r[i] = abi.PortRange(
            protocol=rng.range.proto_number,
            flags=abi.EXEMPT_DPORT | abi.EXEMPT_SPORT,
            first=rng.first,
            last=rng.last,
            policy=bits[rng.policy],
        )
    return out


def prefix_lengths(desired: DesiredState, family: int) -> list[int]:
    """Distinct prefix lengths of one family, longest first: the order the program tries."""
    return sorted(
        {d.prefix.prefixlen for d in desired.destinations if d.prefix.version == family},
        reverse=True,
    )


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
        words = [int.from_bytes(packed[i : i + 4], sys.byteorder) for i in range(0, 16, 4)]
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
        local_role=(
            abi.ROLE_CONTROL_PLANE if desired.plan.role == ROLE_CONTROL_PLANE else abi.ROLE_WORKER
        ),
        fail_mode=abi.FAIL_OPEN if desired.fail_mode == FailMode.OPEN else abi.FAIL_CLOSED,
        wg_up=1 if wg.usable else 0,
        mss_v4=desired.mss_v4,
        mss_v6=desired.mss_v6,
        wg_port=desired.wg_port,
        ingress_mode=abi.INGRESS_MODES.get(desired.ingress_enforcement, abi.INGRESS_AUDIT),
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


def _netmask_words(lengths: list[int]) -> list[int]:
    """Per IPv6 prefix length the four 32-bit words of its netmask as the program loads them
    (network order bytes read in the machine's byte order)."""
    out = []
    for plen in lengths:
        packed = ipaddress.IPv6Network(f"::/{plen}").netmask.packed
        out += [int.from_bytes(packed[i : i + 4], sys.byteorder) for i in range(0, 16, 4)]
    return out
