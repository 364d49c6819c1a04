"""``nodecryptor status`` for the BPF datapath: attachments, the configuration entry, the
WireGuard device, counters and what is wrong; and ``status --leaks``, the ingress leak meter.

prometheus_client (via ``collector``) and pyroute2 are imported inside the functions that need
them, so that the other inspection commands do not pay for them.
"""

from __future__ import annotations

import time
from typing import Any

from nodecryptor.core.settings import Settings
from nodecryptor.datapath.bpf import abi, pins, syscall
from nodecryptor.datapath.bpf.inspect.pinned import attachments, pinned_prog_id, read_config
from nodecryptor.datapath.bpf.maps import decode


def _wireguard(ifname: str) -> dict[str, Any]:
    try:
        from nodecryptor.node.wireguard import read_state
    except ImportError:
        return _link_only(ifname)
    state = read_state(ifname)
    return {
        "ifname": state.ifname,
        "ifindex": state.ifindex,
        "present": state.present,
        "up": state.up,
        "mtu": state.mtu,
        "listen_port": state.listen_port,
        "fwmark": f"0x{state.fwmark:x}",
        "error": state.error,
        "peers": None if state.peers is None else len(state.peers),
    }


def _link_only(ifname: str) -> dict[str, Any]:
    """What the link says of the device, when the WireGuard reader cannot be imported."""
    from pyroute2 import IPRoute

    from nodecryptor.datapath.bpf.attach import ifindex_of

    ifindex = ifindex_of(ifname)
    out: dict[str, Any] = {"ifname": ifname, "ifindex": ifindex, "present": bool(ifindex)}
    if ifindex:
        with IPRoute() as ipr:
            link = ipr.link("get", index=ifindex)[0]
            out.update(up=bool(link["flags"] & 1), mtu=link.get_attr("IFLA_MTU"))
    return out


def status(settings: Settings) -> dict[str, Any]:
    from nodecryptor.datapath.bpf import collector

    mode, atts = attachments(settings)
    prog_id = pinned_prog_id(settings)
    config = read_config(settings)
    out: dict[str, Any] = {
        "datapath": "bpf",
        "active": bool(atts) or bool(prog_id),
        "mode": mode or None,
        "prog_id": prog_id,
        "pin_dir": pins.maps_dir(settings.bpffs),
        "devices": [a.to_json() for a in atts],
    }
    problems = []
    if not atts:
        problems.append("not attached to any device")
    for a in atts:
        if a.defunct:
            problems.append(f"tcx link on {a.device} is defunct (device deleted or re-created)")
        elif a.shadowed_by:
            problems.append(f"shadowed on {a.device}: {a.shadowed_by}")
    wg = _wireguard(settings.wg_interface)
    out["wireguard"] = wg
    if config is None:
        problems.append("configuration map not pinned or empty")
    else:
        alive_ns = config["agent_alive_ns"]
        age = (time.monotonic_ns() - alive_ns) / 1e9 if alive_ns else None
        out["config"] = {
            key: config[key]
            for key in (
                "enabled",
                "wg_ifindex",
                "wg_up",
                "wg_port",
                "fail_mode",
                "local_role",
                "max_packet_v4",
                "max_packet_v6",
                "prefix_lengths",
            )
        }
        out["config"].update(
            wg_mark=f"0x{config['wg_mark']:x}", wg_mark_mask=f"0x{config['wg_mark_mask']:x}"
        )
        out["mss"] = {"v4": config["mss_v4"], "v6": config["mss_v6"]}
        out["ingress_enforcement"] = {
            "supported": True,
            "mode": config["ingress_mode"],
            "attached": pins.pinned_link_names(settings.bpffs, "ingress"),
        }
        out["agent_alive_age_seconds"] = round(age, 3) if age is not None else None
        if not config["enabled"]:
            problems.append("program disabled (no configuration written yet)")
        if wg.get("ifindex") and config["wg_ifindex"] != wg["ifindex"]:
            problems.append(
                f"program redirects to ifindex {config['wg_ifindex']} but "
                f"{settings.wg_interface} is ifindex {wg['ifindex']}"
            )
        if age is not None and age > settings.heartbeat_stale_seconds:
            # Still enforcing (fail-static), but nobody keeps the maps current.
            problems.append(f"agent last applied {age:.0f}s ago")
    try:
        out["counters"] = {
            name: {"packets": c["packets"], "bytes": c["bytes"]}
            for name, c in collector.read_pinned_counters(settings.bpffs).items()
        }
    except OSError as e:
        out["counters_error"] = syscall.error_text(e)
    out["ready"] = not problems
    out["reason"] = "; ".join(problems)
    return out


def read_leaks(settings: Settings, limit: int = 100) -> dict[str, Any]:
    """The leak meter (nc_leaks, an LRU of abi.LEAKS_MAX entries): the most recent clear-text
    (source, protocol, destination port) from cluster peers, newest first, with packets and
    seconds since the last one; plus the ingress mode the program runs with."""
    try:
        leaks_map = syscall.obj_get(pins.map_path(settings.bpffs, abi.LEAKS_MAP), read_only=True)
    except OSError as e:
        return {
            "datapath": "bpf",
            "supported": False,
            "reason": f"no leak meter pinned ({syscall.error_text(e)}): no agent with "
            "ingress classification has run here",
            "leaks": [],
        }
    with leaks_map:
        rows = decode.read_leaks(leaks_map)
    config = read_config(settings) or {}
    return {
        "datapath": "bpf",
        "supported": True,
        "ingress_enforcement": config.get("ingress_mode", "unknown"),
        "capacity": abi.LEAKS_MAX,
        "entries": len(rows),
        "leaks": rows[:limit],
    }
