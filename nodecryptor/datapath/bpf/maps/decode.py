"""Decoding the program's maps into plain data: the one decoder of every map (``bpf dump``,
``status``, ``status --leaks``, the metrics collector and the agent all read through here)."""

from __future__ import annotations

import ctypes as C
import ipaddress
import time
from collections.abc import Mapping
from typing import Any

from nodecryptor.core.errors import DatapathError
from nodecryptor.core.ports import IP_PROTOCOL_NAMES, PROTOCOL_NAMES
from nodecryptor.datapath.bpf import abi, syscall
from nodecryptor.datapath.bpf.maps.pinned import fd_of
from nodecryptor.datapath.bpf.syscall import Fd

_KIND_NAMES = {abi.KIND_NODE_IP: "node-ip", abi.KIND_POD_CIDR: "pod-cidr"}
_INGRESS_NAMES = {v: k for k, v in abi.INGRESS_MODES.items()}


def _prefix_of(key) -> str:
    size = 4 if isinstance(key, abi.LpmV4) else 16
    addr = ipaddress.ip_address(bytes(key.addr)[:size])
    return str(ipaddress.ip_network(f"{addr}/{key.prefixlen}", strict=False))


def read_destinations(map_fds: Mapping[str, Fd]) -> list[dict]:
    out = []
    for name in (*abi.DESTINATION_MAPS.values(), *abi.LPM_MAPS.values()):
        spec = abi.MAPS_BY_NAME[name]
        for key, value in syscall.map_items(fd_of(map_fds, name), spec.key, spec.value):
            out.append(
                {
                    "prefix": _prefix_of(key),
                    "kind": _KIND_NAMES.get(value.kind, f"unknown-{value.kind}"),
                    "control_plane": bool(value.flags & abi.DST_F_CONTROL_PLANE),
                    "uncovered": bool(value.flags & abi.DST_F_UNCOVERED),
                    "serves_mask": value.serves,
                    "clients_mask": value.clients,
                }
            )
    out.sort(
        key=lambda d: (ipaddress.ip_network(d["prefix"]).version, ipaddress.ip_network(d["prefix"]))
    )
    return out


def read_exempt_ports(map_fds: Mapping[str, Fd]) -> list[dict]:
    ranges = abi.ExemptRanges()
    syscall.map_lookup(fd_of(map_fds, abi.EXEMPT_MAP), C.c_uint32(0), ranges)
    out = []
    for r in ranges.r[: min(ranges.count, abi.EXEMPT_RANGES_MAX)]:
        out.append(
            {
                "protocol": PROTOCOL_NAMES.get(r.protocol, str(r.protocol)),
                "first": r.first,
                "last": r.last,
                "dport": bool(r.flags & abi.EXEMPT_DPORT),
                "sport": bool(r.flags & abi.EXEMPT_SPORT),
                "policy_bit": r.policy,
            }
        )
    return out


def read_local_addresses(map_fds: Mapping[str, Fd]) -> list[str]:
    spec = abi.MAPS_BY_NAME[abi.LOCAL_MAP]
    out = []
    for key in syscall.map_keys(fd_of(map_fds, spec.name), spec.key):
        size = 4 if key.family == 4 else 16
        out.append(str(ipaddress.ip_address(bytes(key.addr)[:size])))
    return sorted(out, key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))


def read_cilium_pods(map_fds: Mapping[str, Fd]) -> list[str]:
    """Local pod CIDRs whose pod-to-pod traffic is left to Cilium."""
    out = []
    for name in (abi.PODS_V4_MAP, abi.PODS_V6_MAP):
        spec = abi.MAPS_BY_NAME[name]
        out += [_prefix_of(k) for k in syscall.map_keys(fd_of(map_fds, name), spec.key)]
    return out


def decode_config(cfg: abi.Config) -> dict:
    """The configuration entry as plain data: the one decoding of it (``bpf dump``, ``status``
    and the agent all read it through here)."""
    out = {
        field[0]: getattr(cfg, field[0])
        for field in abi.Config._fields_
        if not field[0].startswith(("pad", "plen_", "n_plen_", "lpm_"))
    }
    out["local_role"] = "control-plane" if cfg.local_role == abi.ROLE_CONTROL_PLANE else "worker"
    out["fail_mode"] = "open" if cfg.fail_mode == abi.FAIL_OPEN else "closed"
    out["enabled"] = bool(cfg.enabled)
    out["ingress_mode"] = _INGRESS_NAMES.get(cfg.ingress_mode, f"unknown-{cfg.ingress_mode}")
    out["wg_up"] = bool(cfg.wg_up)
    out["prefix_lengths"] = {
        "v4": list(cfg.plen_v4[: min(cfg.n_plen_v4, abi.PLEN_SLOTS)]),
        "v6": list(cfg.plen_v6[: min(cfg.n_plen_v6, abi.PLEN_SLOTS)]),
    }
    out["lpm"] = {"v4": bool(cfg.lpm_v4), "v6": bool(cfg.lpm_v6)}
    return out


def read_config(map_fds: Mapping[str, Fd]) -> dict:
    cfg = abi.Config()
    syscall.map_lookup(fd_of(map_fds, abi.CONFIG_MAP), C.c_uint32(0), cfg)
    return decode_config(cfg)


def counters_of(fd: Fd) -> dict[str, dict]:
    """{reason or event name: {"packets", "bytes", "kind", "verdict"}} of a counters map fd,
    summed over CPUs; kind is "reason" or "event". The collector reads through here too."""
    out: dict[str, dict] = {}
    for index in range(abi.COUNTER_MAX):
        per_cpu = syscall.percpu_lookup(fd, C.c_uint32(index), abi.Counter)
        entry = {"packets": sum(c.packets for c in per_cpu), "bytes": sum(c.bytes for c in per_cpu)}
        if index in abi.REASON_VALUES:
            reason = abi.Reason(index)
            entry.update(kind="reason", verdict=abi.REASON_VERDICTS[reason])
            out[abi.REASON_NAMES[reason]] = entry
        else:
            entry.update(kind="event", verdict="")
            out[abi.EVENT_NAMES[abi.Event(index)]] = entry
    return out


def read_counters(map_fds: Mapping[str, Fd]) -> dict[str, dict]:
    return counters_of(fd_of(map_fds, abi.COUNTERS_MAP))


def read(map_fds: Mapping[str, Fd]) -> dict:
    """Every map decoded (what ``nodecryptor bpf dump`` prints)."""
    try:
        frag_spec = abi.MAPS_BY_NAME[abi.FRAGS_MAP]
        capacity = {
            f"v{family}": syscall.map_info(fd_of(map_fds, name)).max_entries
            for family, name in abi.DESTINATION_MAPS.items()
        }
        return {
            "destination_capacity": capacity,
            "config": read_config(map_fds),
            "destinations": read_destinations(map_fds),
            "exempt_ports": read_exempt_ports(map_fds),
            "local_addresses": read_local_addresses(map_fds),
            "cilium_pod_cidrs": read_cilium_pods(map_fds),
            "counters": read_counters(map_fds),
            "fragments_tracked": sum(
                1 for _ in syscall.map_keys(fd_of(map_fds, frag_spec.name), frag_spec.key)
            ),
            "exempt_flows_tracked": sum(
                1
                for _ in syscall.map_keys(
                    fd_of(map_fds, abi.FLOWS_MAP), abi.MAPS_BY_NAME[abi.FLOWS_MAP].key
                )
            ),
            "leaks_tracked": sum(
                1
                for _ in syscall.map_keys(
                    fd_of(map_fds, abi.LEAKS_MAP), abi.MAPS_BY_NAME[abi.LEAKS_MAP].key
                )
            ),
        }
    except OSError as e:
        raise DatapathError(f"reading BPF maps failed: {syscall.error_text(e)}") from e


def read_leaks(leaks_map: Fd, now_ns: int | None = None) -> list[dict[str, Any]]:
    """The leak meter's entries (source, protocol, destination port, packets and seconds since
    the last one), newest first."""
    if now_ns is None:
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # what bpf_ktime_get_ns reads
    spec = abi.MAPS_BY_NAME[abi.LEAKS_MAP]
    items = sorted(
        syscall.map_items(leaks_map, spec.key, spec.value),
        key=lambda item: item[1].last_ns,
        reverse=True,
    )
    rows = []
    for key, val in items:
        size = 4 if key.family == 4 else 16
        rows.append(
            {
                "src": str(ipaddress.ip_address(bytes(key.src)[:size])),
                "protocol": IP_PROTOCOL_NAMES.get(key.protocol, str(key.protocol)),
                "dport": key.dport,
                "packets": val.packets,
                "seconds_ago": round(max(0, now_ns - val.last_ns) / 1e9, 1),
            }
        )
    return rows
