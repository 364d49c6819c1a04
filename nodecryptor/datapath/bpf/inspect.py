"""What the inspection commands (status, explain, bpf dump, cleanup) know about the BPF
datapath, learnt from pinned objects only: no compiler, no BCC, sub-second. They work while the
agent runs, after it died, and on a node where it never ran (reporting "not active").

pyroute2 (via ``attach``) and prometheus_client (via ``collector``) are imported inside the
functions that need them: together they take ~0.4 s to import, and ``bpf dump`` needs neither.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import socket
import time

from nodecryptor.core.settings import Settings
from nodecryptor.datapath.base import VERDICT_PASS, Explanation, PacketQuery
from nodecryptor.datapath.bpf import abi, pins, syscall

CONFIG_MAP = "nc_config_map"


def active(settings: Settings) -> bool:
    """True when nodecryptor's BPF datapath is installed here: a link or the program pinned
    under its root, or its legacy tc filter on a device. (Maps alone, left by an agent that
    died before attaching, enforce nothing; ``cleanup`` removes them all the same.)"""
    if (pins.pinned_link_names(settings.bpffs) or os.path.exists(pins.prog_path(settings.bpffs))
            or pins.pinned_link_names(settings.bpffs, "ingress")):
        return True
    from nodecryptor.datapath.bpf import attach

    return bool(attach.tc_devices()) or bool(attach.tc_devices("ingress"))


def attachments(settings: Settings) -> tuple[str, list]:
    """(mode, attachments) of every device nodecryptor is attached to in this namespace."""
    from nodecryptor.datapath.bpf import attach

    prog_id = pinned_prog_id(settings)
    found = [a for a in (attach.tcx_observe(settings.bpffs, name)
                         for name in pins.pinned_link_names(settings.bpffs)) if a]
    found += [a for a in (attach.tc_observe(name, prog_id) for name in attach.tc_devices()) if a]
    modes = sorted({a.mode for a in found})
    return "+".join(modes), found


def pinned_prog_id(settings: Settings) -> int:
    try:
        fd = syscall.obj_get(pins.prog_path(settings.bpffs))
    except OSError:
        return 0
    try:
        return syscall.prog_info(fd).id
    finally:
        os.close(fd)


def read_config(settings: Settings) -> dict | None:
    """The pinned configuration entry, decoded by maps.decode_config; None when absent."""
    try:
        fd = syscall.obj_get(pins.map_path(settings.bpffs, CONFIG_MAP), read_only=True)
    except OSError:
        return None
    try:
        from nodecryptor.datapath.bpf.maps import decode_config

        value = abi.Config()
        return decode_config(value) if syscall.map_lookup(fd, ctypes.c_uint32(0), value) else None
    finally:
        os.close(fd)


def _wireguard(ifname: str) -> dict:
    try:
        from nodecryptor.node.wireguard import read_state
    except ImportError:
        read_state = None
    if read_state is not None:
        state = read_state(ifname)
        out = {"ifname": state.ifname, "ifindex": state.ifindex, "present": state.present,
               "up": state.up, "mtu": state.mtu, "listen_port": state.listen_port,
               "fwmark": f"0x{state.fwmark:x}", "error": state.error,
               "peers": None if state.peers is None else len(state.peers)}
        return out
    from pyroute2 import IPRoute

    from nodecryptor.datapath.bpf.attach import ifindex_of

    ifindex = ifindex_of(ifname)
    out = {"ifname": ifname, "ifindex": ifindex, "present": bool(ifindex)}
    if ifindex:
        with IPRoute() as ipr:
            link = ipr.link("get", index=ifindex)[0]
            out.update(up=bool(link["flags"] & 1), mtu=link.get_attr("IFLA_MTU"))
    return out


def status(settings: Settings) -> dict:
    from nodecryptor.datapath.bpf import collector

    mode, atts = attachments(settings)
    prog_id = pinned_prog_id(settings)
    config = read_config(settings)
    out: dict = {"datapath": "bpf", "active": bool(atts) or bool(prog_id), "mode": mode or None,
                 "prog_id": prog_id, "pin_dir": pins.maps_dir(settings.bpffs),
                 "devices": [a.to_json() for a in atts]}
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
        out["config"] = {key: config[key] for key in (
            "enabled", "wg_ifindex", "wg_up", "wg_port", "fail_mode", "local_role",
            "max_packet_v4", "max_packet_v6", "prefix_lengths")}
        out["config"].update(wg_mark=f"0x{config['wg_mark']:x}",
                             wg_mark_mask=f"0x{config['wg_mark_mask']:x}")
        out["mss"] = {"v4": config["mss_v4"], "v6": config["mss_v6"]}
        out["ingress_enforcement"] = {
            "supported": True, "mode": config["ingress_mode"],
            "attached": pins.pinned_link_names(settings.bpffs, "ingress")}
        out["agent_alive_age_seconds"] = round(age, 3) if age is not None else None
        if not config["enabled"]:
            problems.append("program disabled (no configuration written yet)")
        if wg.get("ifindex") and config["wg_ifindex"] != wg["ifindex"]:
            problems.append(f"program redirects to ifindex {config['wg_ifindex']} but "
                            f"{settings.wg_interface} is ifindex {wg['ifindex']}")
        if age is not None and age > settings.heartbeat_stale_seconds:
            # Still enforcing (fail-static), but nobody keeps the maps current.
            problems.append(f"agent last applied {age:.0f}s ago")
    try:
        out["counters"] = {name: {"packets": c["packets"], "bytes": c["bytes"]}
                           for name, c in collector.read_pinned_counters(settings.bpffs).items()}
    except OSError as e:
        out["counters_error"] = os.strerror(e.errno) if e.errno else str(e)
    out["ready"] = not problems
    out["reason"] = "; ".join(problems)
    return out


def dump(settings: Settings) -> dict:
    """Decode every pinned map (maps.read) without compiling anything."""
    pin_dir = pins.maps_dir(settings.bpffs)
    if not os.path.isdir(pin_dir):
        return {"pin_dir": pin_dir, "error": "no maps pinned (is the BPF datapath active?)"}
    from nodecryptor.datapath.bpf import maps
    fds = maps.open_pinned(pin_dir)
    try:
        data = maps.read(fds)
    finally:
        for fd in (fds.values() if isinstance(fds, dict) else ()):
            if isinstance(fd, int):
                os.close(fd)
    return {"pin_dir": pin_dir, "prog_id": pinned_prog_id(settings), "maps": data}


def destinations(settings: Settings) -> list[dict]:
    """The pinned destination entries (maps.read_destinations); empty when none are pinned."""
    pin_dir = pins.maps_dir(settings.bpffs)
    if not os.path.isdir(pin_dir):
        return []
    from nodecryptor.datapath.bpf import maps
    fds = maps.open_pinned(pin_dir)
    try:
        return maps.read_destinations(fds)
    finally:
        for fd in (fds.values() if isinstance(fds, dict) else ()):
            if isinstance(fd, int):
                os.close(fd)


def route_for(dst: str) -> tuple[str | None, str | None]:
    """(preferred source address, output device) the kernel picks for ``dst``."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=dst)
        except Exception as e:  # NetlinkError ENETUNREACH & co: the caller names the problem
            raise LookupError(f"no route to {dst}: {e}") from e
        if not routes:
            raise LookupError(f"no route to {dst}")
        route = routes[0]
        src = route.get_attr("RTA_PREFSRC")
        oif = route.get_attr("RTA_OIF")
    device = socket_name(oif) if oif else None
    return src, device


def socket_name(ifindex: int) -> str | None:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return None


def _prog_for_device(settings: Settings, device: str) -> tuple[int, str, int]:
    """(prog_id, mode, link_id) of the program nodecryptor attached to ``device``; prog_id 0
    when none is attached there."""
    from nodecryptor.datapath.bpf import attach

    att = attach.tcx_observe(settings.bpffs, device)
    if att is not None and not att.defunct:
        return att.prog_id, attach.MODE_TCX, att.link_id
    if attach.tc_observe(device) is not None:
        return pinned_prog_id(settings), attach.MODE_TC, 0
    return 0, "", 0


def _open_prog(settings: Settings, prog_id: int) -> int:
    """An fd of the attached program. The pinned program is opened when it is the attached
    one: opening a pin needs no more than the agent's capabilities, while opening by id
    (BPF_PROG_GET_FD_BY_ID) needs CAP_SYS_ADMIN."""
    try:
        fd = syscall.obj_get(pins.prog_path(settings.bpffs))
    except OSError:
        return syscall.prog_fd_by_id(prog_id)
    if syscall.prog_info(fd).id == prog_id:
        return fd
    os.close(fd)
    return syscall.prog_fd_by_id(prog_id)


def _open_explain_prog(settings: Settings, prog_fd: int) -> int | None:
    """An fd of the dry-run twin of the attached program (``prog_fd``): the pinned
    ``prog-explain``, accepted only when every map it reads is one of the attached program's
    (it has no counters map: it never counts). None
    when there is no such pin (an agent from before the twin existed, or a restart between
    attaching and pinning)."""
    try:
        fd = syscall.obj_get(pins.explain_prog_path(settings.bpffs))
    except OSError:
        return None
    try:
        theirs = set(syscall.prog_map_ids(fd))
        if theirs and theirs <= set(syscall.prog_map_ids(prog_fd)):
            return fd
    except OSError:
        pass
    os.close(fd)
    return None


def explain(settings: Settings, q: PacketQuery) -> Explanation:
    """Run the dry-run twin of the program attached to the device on a packet built from
    ``q`` (BPF_PROG_TEST_RUN) and say what it would do. The twin decides with the live maps
    but changes no counter or fragment state; whether a run is dry is a property of the
    program, never of the packet (skb->cb[] of real traffic is not trusted)."""
    from nodecryptor.datapath.bpf import attach, testrun

    src, device = q.src, q.device
    if src is None or device is None:
        route_src, route_dev = route_for(q.dst)
        src = src or route_src
        device = device or route_dev
    if src is None:
        raise LookupError(f"no local source address for {q.dst}; pass --src")
    q = dataclasses.replace(q, src=src, device=device)
    base = {"src": src, "dst": q.dst, "proto": q.proto, "sport": q.sport, "dport": q.dport,
            "mark": f"0x{q.mark:x}"}
    ifindex = attach.ifindex_of(device) if device else 0
    prog_id, mode, link_id = _prog_for_device(settings, device) if device else (0, "", 0)
    if not prog_id:
        return Explanation(VERDICT_PASS, f"not-attached: nodecryptor has no program on {device}",
                           "bpf", device, base)
    try:
        prog_fd = _open_prog(settings, prog_id)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return Explanation(VERDICT_PASS, f"program {prog_id} vanished", "bpf", device, base)
        raise
    try:
        explain_fd = _open_explain_prog(settings, prog_fd)
        try:
            # Without the twin the attached program itself answers: same verdict, but the
            # one packet is counted (explain frames are never fragments, so nothing else).
            run_fd = explain_fd if explain_fd is not None else prog_fd
            packet = testrun.packet_for_query(q, src)
            result = testrun.run(run_fd, packet, mark=q.mark, ifindex=ifindex)
            explain_id = syscall.prog_info(explain_fd).id if explain_fd is not None else 0
        finally:
            if explain_fd is not None:
                os.close(explain_fd)
    finally:
        os.close(prog_fd)
    reason = result.reason
    if isinstance(reason, int):
        reason = abi.REASON_NAMES.get(abi.Reason(reason), str(reason))
    details = {**base, "prog_id": prog_id, "mode": mode, "retval": result.retval,
               "explain_prog_id": explain_id, "counted": explain_id == 0}
    if link_id:
        details["link_id"] = link_id
    if result.target:
        details["redirect_ifindex"] = result.target
        details["redirect_device"] = socket_name(result.target)
    return Explanation(result.verdict, str(reason), "bpf", device, details)


def cleanup(settings: Settings) -> dict:
    """Remove every tcx link, tc filter and pin nodecryptor created; nothing else."""
    from nodecryptor.datapath.bpf import attach

    links = [name for name in pins.pinned_link_names(settings.bpffs)
             if attach.tcx_detach(settings.bpffs, name)]
    filters = [name for name, ifindex in attach.tc_devices().items()
               if attach.tc_detach(name, ifindex)]
    # The ingress program's hooks (issue 15).
    in_links = [name for name in pins.pinned_link_names(settings.bpffs, "ingress")
                if attach.tcx_detach(settings.bpffs, name, "ingress")]
    in_filters = [name for name, ifindex in attach.tc_devices("ingress").items()
                  if attach.tc_detach(name, ifindex, "ingress")]
    removed = pins.remove_all(settings.bpffs)
    return {"datapath": "bpf", "tcx_links": links, "tc_filters": filters, "pins": removed,
            "ingress_tcx_links": in_links, "ingress_tc_filters": in_filters}


def explain_ingress(settings: Settings, q: PacketQuery) -> Explanation:
    """What nc_ingress does with a packet arriving from ``q.src`` for ``q.dst`` (a local
    address): the pinned dry-run twin (``prog-explain-ingress``) runs on the live maps and
    changes no counter, flow, fragment or leak entry. Verdicts: pass (an audited leak is a pass
    whose reason says so), exempt, drop."""
    from nodecryptor.datapath.bpf import testrun

    if q.src is None:
        raise LookupError("--direction ingress needs --src (the peer the packet comes from)")
    base = {"direction": "ingress", "src": q.src, "dst": q.dst, "proto": q.proto,
            "sport": q.sport, "dport": q.dport}
    prog_id = pinned_prog_id(settings)
    if not prog_id:
        return Explanation(VERDICT_PASS, "not-attached: nodecryptor has no program pinned",
                           "bpf", None, base)
    try:
        fd = syscall.obj_get(pins.explain_ingress_prog_path(settings.bpffs))
    except OSError:
        return Explanation(VERDICT_PASS, "not-attached: no ingress program pinned (an agent "
                           "from before issue 15)", "bpf", None, base)
    try:
        prog_fd = _open_prog(settings, prog_id)
        try:
            # The twin must read the attached program's maps, not a stale generation's.
            if not set(syscall.prog_map_ids(fd)) <= set(syscall.prog_map_ids(prog_fd)):
                return Explanation(VERDICT_PASS, "not-attached: the pinned ingress twin belongs "
                                   "to another map generation", "bpf", None, base)
        finally:
            os.close(prog_fd)
        result = testrun.run(fd, testrun.packet_for_query(q, q.src))
        twin_id = syscall.prog_info(fd).id
    finally:
        os.close(fd)
    reason = abi.REASON_NAMES.get(abi.Reason(result.reason), str(result.reason))
    details = {**base, "prog_id": prog_id, "explain_prog_id": twin_id, "retval": result.retval,
               "counted": False}
    devices = pins.pinned_link_names(settings.bpffs, "ingress")
    return Explanation(result.verdict, reason, "bpf", ",".join(devices) or None, details)


LEAKS_MAP = "nc_leaks"


def read_leaks(settings: Settings, limit: int = 100) -> dict:
    """The leak meter (nc_leaks, an LRU of abi.LEAKS_MAX entries): the most recent clear-text
    (source, protocol, destination port) from cluster peers, newest first, with packets and
    seconds since the last one; plus the ingress mode the program runs with."""
    import ipaddress

    spec = abi.MAPS_BY_NAME[LEAKS_MAP]
    try:
        fd = syscall.obj_get(pins.map_path(settings.bpffs, LEAKS_MAP), read_only=True)
    except OSError as e:
        return {"datapath": "bpf", "supported": False,
                "reason": f"no leak meter pinned ({os.strerror(e.errno)}): no agent of issue "
                          "15 or later has run here", "leaks": []}
    try:
        items = list(syscall.map_items(fd, spec.key, spec.value))
    finally:
        os.close(fd)
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # what bpf_ktime_get_ns reads
    protocols = {6: "tcp", 17: "udp", 132: "sctp", 1: "icmp", 58: "icmpv6"}
    rows = []
    for key, val in items:
        size = 4 if key.family == 4 else 16
        rows.append({"src": str(ipaddress.ip_address(bytes(key.src)[:size])),
                     "protocol": protocols.get(key.protocol, str(key.protocol)),
                     "dport": key.dport, "packets": val.packets,
                     "seconds_ago": round(max(0, now - val.last_ns) / 1e9, 1),
                     "_last": val.last_ns})
    rows.sort(key=lambda r: r["_last"], reverse=True)
    for r in rows:
        del r["_last"]
    config = read_config(settings) or {}
    return {"datapath": "bpf", "supported": True,
            "ingress_enforcement": config.get("ingress_mode", "unknown"),
            "capacity": abi.LEAKS_MAX,
            "entries": len(rows), "leaks": rows[:limit]}
