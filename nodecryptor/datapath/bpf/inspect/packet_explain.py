"""``nodecryptor explain`` for the BPF datapath: the dry-run twin of the attached program
(egress or ingress) runs a packet built from the query through BPF_PROG_TEST_RUN, on the live
maps, and its recorded verdict is the answer."""

from __future__ import annotations

import dataclasses
import errno
import socket

from nodecryptor.core.settings import Settings
from nodecryptor.datapath.base import VERDICT_PASS, Explanation, PacketQuery
from nodecryptor.datapath.bpf import abi, pins, syscall
from nodecryptor.datapath.bpf.inspect.pinned import pinned_prog_id
from nodecryptor.datapath.bpf.syscall import BpfObject


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


def _open_prog(settings: Settings, prog_id: int) -> BpfObject:
    """The attached program, opened. The pinned program is opened when it is the attached
    one: opening a pin needs no more than the agent's capabilities, while opening by id
    (BPF_PROG_GET_FD_BY_ID) needs CAP_SYS_ADMIN."""
    try:
        pinned = syscall.obj_get(pins.prog_path(settings.bpffs))
    except OSError:
        return syscall.prog_fd_by_id(prog_id)
    if syscall.prog_info(pinned).id == prog_id:
        return pinned
    pinned.close()
    return syscall.prog_fd_by_id(prog_id)


def _open_explain_prog(settings: Settings, prog: BpfObject) -> BpfObject | None:
    """The dry-run twin of the attached program (``prog``): the pinned
    ``prog-explain``, accepted only when every map it reads is one of the attached program's
    (it has no counters map: it never counts). None
    when there is no such pin (an agent from before the twin existed, or a restart between
    attaching and pinning)."""
    try:
        twin = syscall.obj_get(pins.explain_prog_path(settings.bpffs))
    except OSError:
        return None
    try:
        theirs = set(syscall.prog_map_ids(twin))
        if theirs and theirs <= set(syscall.prog_map_ids(prog)):
            return twin
    except OSError:
        pass
    twin.close()
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
    base = {
        "src": src,
        "dst": q.dst,
        "proto": q.proto,
        "sport": q.sport,
        "dport": q.dport,
        "mark": f"0x{q.mark:x}",
    }
    ifindex = attach.ifindex_of(device) if device else 0
    prog_id, mode, link_id = _prog_for_device(settings, device) if device else (0, "", 0)
    if not prog_id:
        return Explanation(
            VERDICT_PASS,
            f"not-attached: nodecryptor has no program on {device}",
            "bpf",
            device,
            base,
        )
    try:
        prog = _open_prog(settings, prog_id)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return Explanation(VERDICT_PASS, f"program {prog_id} vanished", "bpf", device, base)
        raise
    with prog:
        twin = _open_explain_prog(settings, prog)
        try:
            # Without the twin the attached program itself answers: same verdict, but the
            # one packet is counted (explain frames are never fragments, so nothing else).
            runner = twin if twin is not None else prog
            packet = testrun.packet_for_query(q, src)
            result = testrun.run(runner, packet, mark=q.mark, ifindex=ifindex)
            explain_id = syscall.prog_info(twin).id if twin is not None else 0
        finally:
            if twin is not None:
                twin.close()
    reason = abi.REASON_NAMES.get(abi.Reason(result.reason), str(result.reason))
    details = {
        **base,
        "prog_id": prog_id,
        "mode": mode,
        "retval": result.retval,
        "explain_prog_id": explain_id,
        "counted": explain_id == 0,
    }
    if link_id:
        details["link_id"] = link_id
    if result.target:
        details["redirect_ifindex"] = result.target
        details["redirect_device"] = socket_name(result.target)
    return Explanation(result.verdict, reason, "bpf", device, details)


def explain_ingress(settings: Settings, q: PacketQuery) -> Explanation:
    """What nc_ingress does with a packet arriving from ``q.src`` for ``q.dst`` (a local
    address): the pinned dry-run twin (``prog-explain-ingress``) runs on the live maps and
    changes no counter, flow, fragment or leak entry. Verdicts: pass (an audited leak is a pass
    whose reason says so), exempt, drop."""
    from nodecryptor.datapath.bpf import testrun

    if q.src is None:
        raise LookupError("--direction ingress needs --src (the peer the packet comes from)")
    base = {
        "direction": "ingress",
        "src": q.src,
        "dst": q.dst,
        "proto": q.proto,
        "sport": q.sport,
        "dport": q.dport,
    }
    prog_id = pinned_prog_id(settings)
    if not prog_id:
        return Explanation(
            VERDICT_PASS, "not-attached: nodecryptor has no program pinned", "bpf", None, base
        )
    try:
        twin = syscall.obj_get(pins.explain_ingress_prog_path(settings.bpffs))
    except OSError:
        return Explanation(
            VERDICT_PASS,
            "not-attached: no ingress program pinned (an agent from before ingress classification)",
            "bpf",
            None,
            base,
        )
    with twin:
        with _open_prog(settings, prog_id) as prog:
            # The twin must read the attached program's maps, not a stale generation's.
            if not set(syscall.prog_map_ids(twin)) <= set(syscall.prog_map_ids(prog)):
                return Explanation(
                    VERDICT_PASS,
                    "not-attached: the pinned ingress twin belongs to another map generation",
                    "bpf",
                    None,
                    base,
                )
        result = testrun.run(twin, testrun.packet_for_query(q, q.src))
        twin_id = syscall.prog_info(twin).id
    reason = abi.REASON_NAMES.get(abi.Reason(result.reason), str(result.reason))
    details = {
        **base,
        "prog_id": prog_id,
        "explain_prog_id": twin_id,
        "retval": result.retval,
        "counted": False,
    }
    devices = pins.pinned_link_names(settings.bpffs, "ingress")
    return Explanation(result.verdict, reason, "bpf", ",".join(devices) or None, details)
