"""A whole tc hook (egress or ingress) of a device, as ``nodecryptor status`` shows it: every
tcx program in order with its name, id and owner (BPF_PROG_QUERY: Debian's bpftool and iproute2
cannot show tcx), then the legacy clsact filters, with nodecryptor's own entries marked. So an
operator sees Cilium's ``cil_to_netdev`` running behind ``nc_egress`` and ``cil_from_netdev``
behind ``nc_ingress``.

Reads only; names need BPF_PROG_GET_FD_BY_ID, which the kernel allows only with CAP_SYS_ADMIN:
without it a program is listed by id, with the name of nodecryptor's own pinned program only.
"""

from __future__ import annotations

import errno
import os

from nodecryptor.datapath.bpf import attach, syscall


def _name(prog_id: int, known: dict[int, str]) -> tuple[str | None, str | None]:
    """(name, error) of a program by id."""
    if prog_id in known:
        return known[prog_id], None
    try:
        prog = syscall.prog_fd_by_id(prog_id)
    except OSError as e:
        why = "needs CAP_SYS_ADMIN" if e.errno == errno.EPERM else os.strerror(e.errno)
        return None, why
    with prog:
        return syscall.prog_info(prog).name.decode(errors="replace") or None, None


CILIUM_PREFIX = "cil_"
"""Cilium names every program it attaches cil_* (cil_to_netdev, cil_from_netdev, ...)."""


def owner(name: str | None, ours: bool) -> str:
    """Who a program on the hook belongs to: nodecryptor (by program id, never by name: a
    name is anybody's to choose), cilium (by its naming convention), other, or unknown when
    the name could not be read."""
    if ours:
        return "nodecryptor"
    if name is None:
        return "unknown"
    return "cilium" if name.startswith(CILIUM_PREFIX) else "other"


def hook_chain(ifname: str, direction: str = "egress", own: dict[int, str] | None = None) -> dict:
    """The ``direction`` hook of ``ifname``: {"device", "direction", "ifindex", "tcx": [...] or
    None, "tc": [...], "runs_first"}. ``own`` maps nodecryptor's program ids to their names.
    Entries are in the order the kernel runs them (tcx before clsact)."""
    ifindex = attach.ifindex_of(ifname)
    out: dict = {
        "device": ifname,
        "direction": direction,
        "ifindex": ifindex,
        "tcx": None,
        "tc": [],
        "runs_first": None,
    }
    if not ifindex:
        out["error"] = "device absent"
        return out
    hook = attach.query(ifindex, direction)
    known = {i: n for i, n in (own or {}).items() if i}
    if hook.get("tcx") is not None:
        out["tcx"] = []
        for entry in hook["tcx"]:
            name, err = _name(entry["prog_id"], known)
            ours = entry["prog_id"] in known
            item = {
                "position": entry["position"],
                "prog_id": entry["prog_id"],
                "link_id": entry["link_id"],
                "name": name,
                "nodecryptor": ours,
                "owner": owner(name, ours),
            }
            if err:
                item["name_error"] = err
            out["tcx"].append(item)
    else:
        out["tcx_unavailable"] = hook.get("tcx_unavailable")
    out["tc"] = [
        {
            "position": i,
            "prio": f["prio"],
            "handle": f["handle"],
            "kind": f["kind"],
            "name": f["name"],
            "prog_id": f.get("prog_id") or 0,
            "nodecryptor": f["ours"],
            "owner": owner(f["name"], f["ours"]),
        }
        for i, f in enumerate(hook["tc"])
    ]
    first = (out["tcx"] or out["tc"] or [None])[0]
    out["runs_first"] = first and (first.get("name") or f"prog {first.get('prog_id')}")
    return out


def egress_chain(ifname: str, own_prog_id: int = 0, own_name: str = "nc_egress") -> dict:
    """The egress hook of ``ifname`` with one own program (the lab's view)."""
    return hook_chain(ifname, "egress", {own_prog_id: own_name})


def describe(chain: dict) -> list[str]:
    """Text lines for ``nodecryptor status``: one per hook, programs in the order they run,
    each with its owner; nodecryptor's marked ``*``."""
    lines = []
    direction = chain.get("direction", "egress")
    if chain.get("error"):
        return [f"  {chain['device']} {direction}: {chain['error']}"]
    if chain.get("tcx") is not None:
        lines.append(
            f"  {chain['device']} tcx {direction}: "
            + (
                " -> ".join(
                    f"{e.get('name') or '?'}(id {e['prog_id']}, "
                    f"{e.get('owner', '?')})" + ("*" if e["nodecryptor"] else "")
                    for e in chain["tcx"]
                )
                or "empty"
            )
        )
    for f in chain.get("tc", []):
        lines.append(
            f"  {chain['device']} tc {direction} prio {f['prio']} handle {f['handle']} "
            f"{f['kind']} {f['name'] or ''} ({f.get('owner', '?')})"
            + (" *" if f["nodecryptor"] else "")
        )
    return lines
