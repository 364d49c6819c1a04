"""Python mirror of bpf/include/nc_abi.h: map layouts, reason codes, cb[] layout.

tests/bpf/test_abi.py compares every struct here with what the compiler derives from the C
header (sizes and offsets), and every constant with its C value.
"""

from __future__ import annotations

import ctypes as C
import enum
from dataclasses import dataclass
from typing import Any

from nodecryptor.datapath.base import VERDICT_DROP, VERDICT_ENCRYPT, VERDICT_EXEMPT, VERDICT_PASS

ABI_VERSION = 3

KIND_NODE_IP = 1
KIND_POD_CIDR = 2
DST_F_CONTROL_PLANE = 1 << 0
DST_F_UNCOVERED = 1 << 1
EXEMPT_DPORT = 1 << 0
EXEMPT_SPORT = 1 << 1
EXEMPT_RANGES_MAX = 64
POLICIES_MAX = 32
SUMMARY_WORDS = 1024
SUMMARY_V6_BASE = SUMMARY_WORDS
BLOOM_BITS = 22
BLOOM_WORDS = 1 << (BLOOM_BITS - 6)
BLOOM_V4_BASE = 2 * SUMMARY_WORDS
BLOOM_V6_BASE = BLOOM_V4_BASE + BLOOM_WORDS
FILTER_WORDS = BLOOM_V6_BASE + BLOOM_WORDS
HASH_K0 = 0x9E3779B1
HASH_K1 = 0x85EBCA77
HASH_K2 = 0xC2B2AE3D
HASH_K3 = 0x27D4EB2F
PLEN_SLOTS = 8
FAIL_OPEN = 0
FAIL_CLOSED = 1
ROLE_WORKER = 0
ROLE_CONTROL_PLANE = 1
INGRESS_OFF = 0
INGRESS_AUDIT = 1
INGRESS_ENFORCE = 2
INGRESS_MODES = {"off": INGRESS_OFF, "audit": INGRESS_AUDIT, "enforce": INGRESS_ENFORCE}
"""settings.IngressEnforcement values and the config entry's ingress_mode they are written as."""
FLOW_INBOUND = 1
FLOW_OUTBOUND = 2
FLOWS_MAX = 65536
"""Exempt bootstrap connections nc_flows remembers (LRU; bpf/lib/flows.h)."""
LEAKS_MAX = 1024
"""(source, port, protocol) entries of the leak meter nc_leaks (LRU)."""

CB_MAGIC = 0x4E430000
CB_REASON = 0
CB_TARGET = 1


class LpmV4(C.Structure):
    _fields_ = [("prefixlen", C.c_uint32), ("addr", C.c_uint8 * 4)]


class LpmV6(C.Structure):
    _fields_ = [("prefixlen", C.c_uint32), ("addr", C.c_uint8 * 16)]


class DstInfo(C.Structure):
    _fields_ = [
        ("kind", C.c_uint8),
        ("flags", C.c_uint8),
        ("reserved", C.c_uint16),
        ("serves", C.c_uint32),
        ("clients", C.c_uint32),
    ]


class PortRange(C.Structure):
    _fields_ = [
        ("protocol", C.c_uint8),
        ("flags", C.c_uint8),
        ("first", C.c_uint16),
        ("last", C.c_uint16),
        ("policy", C.c_uint8),
        ("pad", C.c_uint8),
    ]


class ExemptRanges(C.Structure):
    _fields_ = [("count", C.c_uint32), ("pad", C.c_uint32), ("r", PortRange * EXEMPT_RANGES_MAX)]


class AddrKey(C.Structure):
    _fields_ = [("family", C.c_uint8), ("pad", C.c_uint8 * 3), ("addr", C.c_uint8 * 16)]


class Config(C.Structure):
    _fields_ = [
        ("wg_ifindex", C.c_uint32),
        ("enabled", C.c_uint8),
        ("local_role", C.c_uint8),
        ("fail_mode", C.c_uint8),
        ("wg_up", C.c_uint8),
        ("mss_v4", C.c_uint16),
        ("mss_v6", C.c_uint16),
        ("wg_port", C.c_uint16),
        ("ingress_mode", C.c_uint8),
        ("pad0", C.c_uint8),
        ("wg_mark", C.c_uint32),
        ("wg_mark_mask", C.c_uint32),
        ("max_packet_v4", C.c_uint32),
        ("max_packet_v6", C.c_uint32),
        ("agent_alive_ns", C.c_uint64),
        ("n_plen_v4", C.c_uint8),
        ("n_plen_v6", C.c_uint8),
        ("lpm_v4", C.c_uint8),
        ("lpm_v6", C.c_uint8),
        ("pad1", C.c_uint32),
        ("plen_v4", C.c_uint8 * PLEN_SLOTS),
        ("plen_v6", C.c_uint8 * PLEN_SLOTS),
        ("mask_v6", C.c_uint32 * (4 * PLEN_SLOTS)),
    ]


class FragKey(C.Structure):
    _fields_ = [
        ("family", C.c_uint8),
        ("protocol", C.c_uint8),
        ("pad", C.c_uint16),
        ("id", C.c_uint32),
        ("src", C.c_uint8 * 16),
        ("dst", C.c_uint8 * 16),
    ]


class FragVal(C.Structure):
    _fields_ = [("reason", C.c_uint32)]


class FlowKey(C.Structure):
    _fields_ = [
        ("family", C.c_uint8),
        ("protocol", C.c_uint8),
        ("local_port", C.c_uint16),
        ("remote_port", C.c_uint16),
        ("pad", C.c_uint16),
        ("local", C.c_uint8 * 16),
        ("remote", C.c_uint8 * 16),
    ]


class FlowVal(C.Structure):
    _fields_ = [("origin", C.c_uint32), ("pad", C.c_uint32)]


class LeakKey(C.Structure):
    _fields_ = [
        ("family", C.c_uint8),
        ("protocol", C.c_uint8),
        ("dport", C.c_uint16),
        ("src", C.c_uint8 * 16),
    ]


class LeakVal(C.Structure):
    _fields_ = [("last_ns", C.c_uint64), ("packets", C.c_uint64)]


class Counter(C.Structure):
    _fields_ = [("packets", C.c_uint64), ("bytes", C.c_uint64)]


class Reason(enum.IntEnum):
    DISABLED = 0
    WG_MARK = 1
    NOT_IP = 2
    NOT_CLUSTER = 3
    ND = 4
    WG_PORT = 5
    EXEMPT_DPORT = 6
    EXEMPT_SPORT = 7
    ENCRYPT = 8
    FRAG_EXEMPT = 9
    FRAG_ENCRYPT = 10
    FRAG_UNKNOWN = 11
    WG_DOWN_DROP = 12
    UNCOVERED_DROP = 13
    WG_DOWN_OPEN = 14
    UNCOVERED_OPEN = 15
    MALFORMED = 16
    CILIUM_POD = 17
    # ingress (nc_ingress), appended after the first events
    IN_DISABLED = 20
    IN_NOT_CLUSTER = 21
    IN_ND = 22
    IN_WG_PORT = 23
    IN_EXEMPT_REQUEST = 24
    IN_EXEMPT_REPLY = 25
    IN_FRAG_EXEMPT = 26
    IN_LEAK_OFF = 27
    IN_LEAK_AUDIT = 28
    IN_LEAK_DROP = 29


MAX_VERDICT = 18
"""The end of the first block of reasons (the egress ones); the ingress reasons follow the
first events, so a reason is any member of Reason, not every index below a bound."""


class Event(enum.IntEnum):
    MSS_CLAMPED = 18
    OVERSIZE = 19
    REPLY_NO_FLOW = 30
    FLOW_ADDED = 31
    IN_MSS_CLAMPED = 32


COUNTER_MAX = 33
INGRESS_REASONS = frozenset(r for r in Reason if r.name.startswith("IN_"))
"""Reasons of the ingress program; the others are the egress program's."""
REASON_VALUES = frozenset(int(r) for r in Reason)


def direction_of(reason: Reason) -> str:
    return "ingress" if reason in INGRESS_REASONS else "egress"


PODS_MAX = 64
"""Entries of each local pod CIDR trie (nc_pods_v4/v6): a node has one or a few pod CIDRs."""

# Reason names as they appear in explain output, metrics labels and bpf dump.
REASON_NAMES = {
    Reason.DISABLED: "disabled",
    Reason.WG_MARK: "wireguard-output",
    Reason.NOT_IP: "not-ip",
    Reason.NOT_CLUSTER: "not-cluster-destination",
    Reason.ND: "ipv6-neighbour-discovery",
    Reason.WG_PORT: "wireguard-port",
    Reason.EXEMPT_DPORT: "exempt-control-plane-port",
    Reason.EXEMPT_SPORT: "exempt-control-plane-reply",
    Reason.ENCRYPT: "cluster-destination",
    Reason.FRAG_EXEMPT: "fragment-of-exempt",
    Reason.FRAG_ENCRYPT: "fragment-of-encrypted",
    Reason.FRAG_UNKNOWN: "fragment-first-unseen",
    Reason.WG_DOWN_DROP: "wireguard-down-fail-closed",
    Reason.UNCOVERED_DROP: "no-peer-covers-fail-closed",
    Reason.WG_DOWN_OPEN: "wireguard-down-fail-open",
    Reason.UNCOVERED_OPEN: "no-peer-covers-fail-open",
    Reason.MALFORMED: "malformed-cluster-packet",
    Reason.CILIUM_POD: "cilium-pod-to-pod",
    Reason.IN_DISABLED: "ingress-disabled",
    Reason.IN_NOT_CLUSTER: "ingress-not-from-cluster-peer",
    Reason.IN_ND: "ingress-ipv6-neighbour-discovery",
    Reason.IN_WG_PORT: "ingress-wireguard-port",
    Reason.IN_EXEMPT_REQUEST: "ingress-exempt-control-plane-request",
    Reason.IN_EXEMPT_REPLY: "ingress-exempt-control-plane-reply",
    Reason.IN_FRAG_EXEMPT: "ingress-fragment-of-passed",
    Reason.IN_LEAK_OFF: "ingress-cleartext-enforcement-off",
    Reason.IN_LEAK_AUDIT: "ingress-cleartext-audited",
    Reason.IN_LEAK_DROP: "ingress-cleartext-dropped",
}
EVENT_NAMES = {
    Event.MSS_CLAMPED: "mss-clamped",
    Event.OVERSIZE: "oversize",
    Event.REPLY_NO_FLOW: "exempt-reply-without-flow",
    Event.FLOW_ADDED: "exempt-flow-added",
    Event.IN_MSS_CLAMPED: "ingress-mss-clamped",
}

REASON_VERDICTS = {
    Reason.DISABLED: VERDICT_PASS,
    Reason.WG_MARK: VERDICT_PASS,
    Reason.NOT_IP: VERDICT_PASS,
    Reason.NOT_CLUSTER: VERDICT_PASS,
    Reason.ND: VERDICT_PASS,
    Reason.WG_PORT: VERDICT_PASS,
    Reason.EXEMPT_DPORT: VERDICT_EXEMPT,
    Reason.EXEMPT_SPORT: VERDICT_EXEMPT,
    Reason.ENCRYPT: VERDICT_ENCRYPT,
    Reason.FRAG_EXEMPT: VERDICT_EXEMPT,
    Reason.FRAG_ENCRYPT: VERDICT_ENCRYPT,
    Reason.FRAG_UNKNOWN: VERDICT_ENCRYPT,
    Reason.WG_DOWN_DROP: VERDICT_DROP,
    Reason.UNCOVERED_DROP: VERDICT_DROP,
    Reason.WG_DOWN_OPEN: VERDICT_PASS,
    Reason.UNCOVERED_OPEN: VERDICT_PASS,
    Reason.MALFORMED: VERDICT_ENCRYPT,
    Reason.CILIUM_POD: VERDICT_PASS,
    Reason.IN_DISABLED: VERDICT_PASS,
    Reason.IN_NOT_CLUSTER: VERDICT_PASS,
    Reason.IN_ND: VERDICT_PASS,
    Reason.IN_WG_PORT: VERDICT_PASS,
    Reason.IN_EXEMPT_REQUEST: VERDICT_EXEMPT,
    Reason.IN_EXEMPT_REPLY: VERDICT_EXEMPT,
    Reason.IN_FRAG_EXEMPT: VERDICT_EXEMPT,
    Reason.IN_LEAK_OFF: VERDICT_PASS,
    Reason.IN_LEAK_AUDIT: VERDICT_PASS,
    Reason.IN_LEAK_DROP: VERDICT_DROP,
}

# nodecryptor_cleartext_packets_total{direction, verdict}: cluster traffic seen in the clear.
# Bounded labels: two directions, three verdicts.
CLEARTEXT_VERDICTS = {
    Reason.EXEMPT_DPORT: ("egress", "exempt"),
    Reason.EXEMPT_SPORT: ("egress", "exempt"),
    Reason.FRAG_EXEMPT: ("egress", "exempt"),
    Reason.IN_EXEMPT_REQUEST: ("ingress", "exempt"),
    Reason.IN_EXEMPT_REPLY: ("ingress", "exempt"),
    Reason.IN_FRAG_EXEMPT: ("ingress", "exempt"),
    Reason.IN_LEAK_AUDIT: ("ingress", "audit"),
    Reason.IN_LEAK_DROP: ("ingress", "drop"),
}

# tc return codes. TCX_NEXT and TC_ACT_UNSPEC are both -1: "continue with the next program",
# which is what every pass-through returns so Cilium's own program still runs.
TC_ACT_UNSPEC = -1
TCX_NEXT = -1
TC_ACT_OK = 0
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7

# bpf_map_type values used here (include/uapi/linux/bpf.h)
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_F_NO_PREALLOC = 1
BPF_F_MMAPABLE = 1 << 10


@dataclass(frozen=True)
class MapSpec:
    """How a map must look; a pinned map that differs in any field is recreated."""

    name: str
    map_type: int
    key: type[Any]
    """The ctypes type of a key."""
    value: type[Any]
    size_setting: str | None
    """Field of settings.MapSizes giving the (initial) capacity; None = fixed size below."""
    fixed_entries: int = 0
    flags: int = 0

    @property
    def key_size(self) -> int:
        return C.sizeof(self.key)

    @property
    def value_size(self) -> int:
        return C.sizeof(self.value)

    def max_entries(self, sizes) -> int:
        return getattr(sizes, self.size_setting) if self.size_setting else self.fixed_entries


# The maps' names as the C program under bpf/ declares them: the one place
# Python spells them; everything else refers to these constants.
DST_V4_MAP = "nc_dst_v4"
DST_V6_MAP = "nc_dst_v6"
DST_LPM_V4_MAP = "nc_dst_lpm_v4"
DST_LPM_V6_MAP = "nc_dst_lpm_v6"
EXEMPT_MAP = "nc_exempt"
LOCAL_MAP = "nc_local"
CONFIG_MAP = "nc_config_map"
COUNTERS_MAP = "nc_counters"
FRAGS_MAP = "nc_frags"
PODS_V4_MAP = "nc_pods_v4"
PODS_V6_MAP = "nc_pods_v6"
FLOWS_MAP = "nc_flows"
LEAKS_MAP = "nc_leaks"
SUMMARY_MAP = "nc_summary"

MAP_SPECS = (
    MapSpec(
        DST_V4_MAP, BPF_MAP_TYPE_HASH, LpmV4, DstInfo, "destinations_v4", flags=BPF_F_NO_PREALLOC
    ),
    MapSpec(
        DST_V6_MAP, BPF_MAP_TYPE_HASH, LpmV6, DstInfo, "destinations_v6", flags=BPF_F_NO_PREALLOC
    ),
    MapSpec(
        DST_LPM_V4_MAP,
        BPF_MAP_TYPE_LPM_TRIE,
        LpmV4,
        DstInfo,
        "destinations_v4",
        flags=BPF_F_NO_PREALLOC,
    ),
    MapSpec(
        DST_LPM_V6_MAP,
        BPF_MAP_TYPE_LPM_TRIE,
        LpmV6,
        DstInfo,
        "destinations_v6",
        flags=BPF_F_NO_PREALLOC,
    ),
    MapSpec(EXEMPT_MAP, BPF_MAP_TYPE_ARRAY, C.c_uint32, ExemptRanges, None, fixed_entries=1),
    MapSpec(LOCAL_MAP, BPF_MAP_TYPE_HASH, AddrKey, C.c_uint32, "local_addresses"),
    MapSpec(CONFIG_MAP, BPF_MAP_TYPE_ARRAY, C.c_uint32, Config, None, fixed_entries=1),
    MapSpec(
        COUNTERS_MAP,
        BPF_MAP_TYPE_PERCPU_ARRAY,
        C.c_uint32,
        Counter,
        None,
        fixed_entries=COUNTER_MAX,
    ),
    MapSpec(FRAGS_MAP, BPF_MAP_TYPE_LRU_HASH, FragKey, FragVal, "fragments"),
    # bpf/lib/cilium.h: local pod CIDRs whose traffic to remote pod CIDRs is Cilium's.
    MapSpec(
        PODS_V4_MAP,
        BPF_MAP_TYPE_LPM_TRIE,
        LpmV4,
        C.c_uint32,
        None,
        fixed_entries=PODS_MAX,
        flags=BPF_F_NO_PREALLOC,
    ),
    MapSpec(
        PODS_V6_MAP,
        BPF_MAP_TYPE_LPM_TRIE,
        LpmV6,
        C.c_uint32,
        None,
        fixed_entries=PODS_MAX,
        flags=BPF_F_NO_PREALLOC,
    ),
    # bpf/lib/flows.h and ingress.h: exempt bootstrap flows and the leak meter.
    MapSpec(FLOWS_MAP, BPF_MAP_TYPE_LRU_HASH, FlowKey, FlowVal, None, fixed_entries=FLOWS_MAX),
    MapSpec(LEAKS_MAP, BPF_MAP_TYPE_LRU_HASH, LeakKey, LeakVal, None, fixed_entries=LEAKS_MAX),
    MapSpec(
        SUMMARY_MAP,
        BPF_MAP_TYPE_ARRAY,
        C.c_uint32,
        C.c_uint64,
        None,
        fixed_entries=FILTER_WORDS,
        flags=BPF_F_MMAPABLE,
    ),
)
DESTINATION_MAPS = {4: DST_V4_MAP, 6: DST_V6_MAP}
"""The maps whose capacity follows the cluster (grown by loading a new generation)."""
LPM_MAPS = {4: DST_LPM_V4_MAP, 6: DST_LPM_V6_MAP}
"""Entries of prefix lengths beyond the PLEN_SLOTS longest of their family (same capacity)."""
MAPS_BY_NAME = {m.name: m for m in MAP_SPECS}


def abi_dir(bpffs: str) -> str:
    """Versioned directory: a layout change starts from a fresh directory instead of meeting
    maps of the wrong shape. The maps live in generation directories below it (pins.py)."""
    return f"{bpffs.rstrip('/')}/nodecryptor/v{ABI_VERSION}"


def nodecryptor_root(bpffs: str) -> str:
    return f"{bpffs.rstrip('/')}/nodecryptor"
