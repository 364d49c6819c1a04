"""bpf/include/nc_abi.h and nodecryptor/datapath/bpf/abi.py describe the same ABI.

The C side is asked by the compiler itself: a tiny BCC program stores sizeof/offsetof of every
struct field and the value of every constant into an array map, and one BPF_PROG_TEST_RUN
fills it. The real program's maps are compared with abi.MAP_SPECS (type, key/value size,
entries, flags, and the field layout BCC derives for each key and value).
"""

from __future__ import annotations

import ctypes as C
import os

import pytest

from conftest import have_bcc, require
from nodecryptor.policy import exemptions
from nodecryptor.datapath.bpf import abi, program, syscall, testrun
from nodecryptor.core.settings import MAX_EXEMPT_PORT_RANGES, MapSizes, Settings

pytestmark = [pytest.mark.privileged, pytest.mark.bpf]

# abi.py struct → C struct name in nc_abi.h
STRUCTS = {
    abi.LpmV4: "nc_lpm_v4",
    abi.LpmV6: "nc_lpm_v6",
    abi.DstInfo: "nc_dst_info",
    abi.PortRange: "nc_port_range",
    abi.ExemptRanges: "nc_exempt_ranges",
    abi.AddrKey: "nc_addr_key",
    abi.Config: "nc_config",
    abi.FragKey: "nc_frag_key",
    abi.FragVal: "nc_frag_val",
    abi.Counter: "nc_counter",
    abi.FlowKey: "nc_flow_key",
    abi.FlowVal: "nc_flow_val",
    abi.LeakKey: "nc_leak_key",
    abi.LeakVal: "nc_leak_val",
}

# C constant → Python value
CONSTANTS = {
    "NC_ABI_VERSION": abi.ABI_VERSION,
    "NC_KIND_NODE_IP": abi.KIND_NODE_IP,
    "NC_KIND_POD_CIDR": abi.KIND_POD_CIDR,
    "NC_DST_F_CONTROL_PLANE": abi.DST_F_CONTROL_PLANE,
    "NC_DST_F_UNCOVERED": abi.DST_F_UNCOVERED,
    "NC_EXEMPT_DPORT": abi.EXEMPT_DPORT,
    "NC_EXEMPT_SPORT": abi.EXEMPT_SPORT,
    "NC_FAIL_OPEN": abi.FAIL_OPEN,
    "NC_FAIL_CLOSED": abi.FAIL_CLOSED,
    "NC_ROLE_WORKER": abi.ROLE_WORKER,
    "NC_ROLE_CONTROL_PLANE": abi.ROLE_CONTROL_PLANE,
    "NC_CB_MAGIC": abi.CB_MAGIC,
    "NC_CB_REASON": abi.CB_REASON,
    "NC_CB_TARGET": abi.CB_TARGET,
    "NC_R_MAX_VERDICT": abi.MAX_VERDICT,
    "NC_COUNTER_MAX": abi.COUNTER_MAX,
    "TC_ACT_UNSPEC": abi.TC_ACT_UNSPEC,
    "TC_ACT_OK": abi.TC_ACT_OK,
    "TC_ACT_SHOT": abi.TC_ACT_SHOT,
    "TC_ACT_REDIRECT": abi.TC_ACT_REDIRECT,
    "BPF_MAP_TYPE_HASH": abi.BPF_MAP_TYPE_HASH,
    "BPF_MAP_TYPE_ARRAY": abi.BPF_MAP_TYPE_ARRAY,
    "BPF_MAP_TYPE_PERCPU_ARRAY": abi.BPF_MAP_TYPE_PERCPU_ARRAY,
    "BPF_MAP_TYPE_LRU_HASH": abi.BPF_MAP_TYPE_LRU_HASH,
    "NC_EXEMPT_RANGES_MAX": abi.EXEMPT_RANGES_MAX,
    "NC_POLICIES_MAX": abi.POLICIES_MAX,
    "NC_SUMMARY_WORDS": abi.SUMMARY_WORDS,
    "NC_SUMMARY_V6_BASE": abi.SUMMARY_V6_BASE,
    "NC_BLOOM_BITS": abi.BLOOM_BITS,
    "NC_BLOOM_WORDS": abi.BLOOM_WORDS,
    "NC_BLOOM_V4_BASE": abi.BLOOM_V4_BASE,
    "NC_BLOOM_V6_BASE": abi.BLOOM_V6_BASE,
    "NC_FILTER_WORDS": abi.FILTER_WORDS,
    "NC_HASH_K0": abi.HASH_K0,
    "NC_HASH_K1": abi.HASH_K1,
    "NC_HASH_K2": abi.HASH_K2,
    "NC_HASH_K3": abi.HASH_K3,
    "BPF_F_MMAPABLE": abi.BPF_F_MMAPABLE,
    "NC_PLEN_SLOTS": abi.PLEN_SLOTS,
    "BPF_MAP_TYPE_LPM_TRIE": abi.BPF_MAP_TYPE_LPM_TRIE,
    "BPF_F_NO_PREALLOC": abi.BPF_F_NO_PREALLOC,
    "NC_PODS_MAX": abi.PODS_MAX,
    "NC_INGRESS_OFF": abi.INGRESS_OFF,
    "NC_INGRESS_AUDIT": abi.INGRESS_AUDIT,
    "NC_INGRESS_ENFORCE": abi.INGRESS_ENFORCE,
    "NC_FLOW_INBOUND": abi.FLOW_INBOUND,
    "NC_FLOW_OUTBOUND": abi.FLOW_OUTBOUND,
    "NC_FLOWS_MAX": abi.FLOWS_MAX,
    "NC_LEAKS_MAX": abi.LEAKS_MAX,
}
CONSTANTS.update({f"NC_R_{r.name}": r.value for r in abi.Reason})
CONSTANTS.update({f"NC_EV_{e.name}": e.value for e in abi.Event})

# What the map names expand to must be the names abi.MAP_SPECS pins.
MAP_NAME_MACROS = {
    "NC_MAP_DST_V4": "nc_dst_v4",
    "NC_MAP_DST_V6": "nc_dst_v6",
    "NC_MAP_EXEMPT": "nc_exempt",
    "NC_MAP_LOCAL": "nc_local",
    "NC_MAP_CONFIG": "nc_config_map",
    "NC_MAP_COUNTERS": "nc_counters",
    "NC_MAP_FRAGS": "nc_frags",
    "NC_MAP_PODS_V4": "nc_pods_v4",
    "NC_MAP_PODS_V6": "nc_pods_v6",
    "NC_MAP_SUMMARY": "nc_summary",
    "NC_MAP_DST_LPM_V4": "nc_dst_lpm_v4",
    "NC_MAP_DST_LPM_V6": "nc_dst_lpm_v6",
    "NC_MAP_FLOWS": "nc_flows",
    "NC_MAP_LEAKS": "nc_leaks",
}


def _c_probes() -> list[tuple[str, str, int]]:
    """(label, C expression, expected value) for every layout fact and constant."""
    probes = []
    for py, cname in STRUCTS.items():
        probes.append((f"sizeof {cname}", f"sizeof(struct {cname})", C.sizeof(py)))
        for field, _ in py._fields_:
            probes.append(
                (
                    f"{cname}.{field} offset",
                    f"offsetof(struct {cname}, {field})",
                    getattr(py, field).offset,
                )
            )
            probes.append(
                (
                    f"{cname}.{field} size",
                    f"sizeof(((struct {cname} *)0)->{field})",
                    getattr(py, field).size,
                )
            )
    for name, value in CONSTANTS.items():
        probes.append((name, f"(long long)({name})", value))
    return probes


def _probe_program(probes) -> str:
    stores = "\n".join(f"\tv->v[{i}] = {expr};" for i, (_, expr, _) in enumerate(probes))
    return f"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/stddef.h>
#include "nc_abi.h"
struct nc_probe_values {{ __s64 v[{len(probes)}]; }};
BPF_ARRAY(nc_probe_out, struct nc_probe_values, 1);
int nc_probe(struct __sk_buff *skb)
{{
	int zero = 0;
	struct nc_probe_values *v = nc_probe_out.lookup(&zero);
	if (!v)
		return 0;
{stores}
	return 0;
}}
"""


@pytest.fixture(scope="module")
def bcc_module():
    require(os.geteuid() == 0, "needs root")
    ok, why = have_bcc()
    require(ok, why)
    import bcc  # the test inspects what BCC derives; the agent never does this

    return bcc


def test_layouts_and_constants_match_c(bcc_module):
    probes = _c_probes()
    include = program.bpf_dir() / "include"
    module = bcc_module.BPF(text=_probe_program(probes).encode(), cflags=[f"-I{include}"])
    try:
        fn = module.load_func(b"nc_probe", bcc_module.BPF.SCHED_CLS)
        syscall.prog_test_run(fn.fd, testrun.ethernet(0x0800, bytes(40)))
        values = list(module[b"nc_probe_out"][C.c_int(0)].v)
    finally:
        module.cleanup()
    mismatches = [
        f"{label}: C {got} != Python {want}"
        for (label, _, want), got in zip(probes, values)
        if got != want
    ]
    assert not mismatches, "\n".join(mismatches)


def test_map_name_macros_match_specs():
    header = (program.bpf_dir() / "include" / "nc_abi.h").read_text()
    for macro, name in MAP_NAME_MACROS.items():
        assert f"#define {macro} {name}" in header
    assert set(MAP_NAME_MACROS.values()) == set(abi.MAPS_BY_NAME)


def test_exempt_flag_limit_is_the_program_limit():
    """--control-plane-exempt-ports (the built-in policy) is validated against one policy's
    range limit, and the policies' limits are what nc_exempt and the masks hold."""
    assert MAX_EXEMPT_PORT_RANGES == exemptions.MAX_RANGES_PER_POLICY
    assert exemptions.MAX_RANGES == abi.EXEMPT_RANGES_MAX
    assert exemptions.MAX_POLICIES == abi.POLICIES_MAX == 32  # one bit each of a __u32


def test_reason_tables_complete():
    assert set(abi.REASON_NAMES) == set(abi.Reason) == set(abi.REASON_VERDICTS)
    assert set(abi.EVENT_NAMES) == set(abi.Event)
    assert len(set(abi.REASON_NAMES.values()) | set(abi.EVENT_NAMES.values())) == abi.COUNTER_MAX
    # Every counter index is exactly one reason or one event; the ingress reasons and later
    # events were appended after the first events (when ingress classification came).
    indices = sorted([int(r) for r in abi.Reason] + [int(e) for e in abi.Event])
    assert indices == list(range(abi.COUNTER_MAX))
    assert max(r for r in abi.Reason if abi.direction_of(r) == "egress") + 1 == abi.MAX_VERDICT


def test_program_maps_match_specs(bcc_module):
    sizes = MapSizes(destinations_v4=1000, destinations_v6=2000, local_addresses=40, fragments=500)
    loaded = program.load(Settings(map_sizes=sizes))
    try:
        for spec in abi.MAP_SPECS:
            fd = loaded.map_fds[spec.name]
            info = syscall.map_info(fd)
            assert (
                info.type,
                info.key_size,
                info.value_size,
                info.max_entries,
                info.map_flags,
            ) == (
                spec.map_type,
                spec.key_size,
                spec.value_size,
                spec.max_entries(sizes),
                spec.flags,
            ), spec.name
            table = loaded._bpf[spec.name.encode()]
            leaf = (
                table.Leaf._type_ if spec.map_type == abi.BPF_MAP_TYPE_PERCPU_ARRAY else table.Leaf
            )
            for ours, theirs in ((spec.key, table.Key), (spec.value, leaf)):
                assert C.sizeof(ours) == C.sizeof(theirs), spec.name
                if hasattr(ours, "_fields_"):
                    assert [(f, getattr(ours, f).offset) for f, _ in ours._fields_] == [
                        (f, getattr(theirs, f).offset) for f, _ in theirs._fields_
                    ], spec.name
    finally:
        loaded.close()
