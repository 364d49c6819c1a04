"""The whole egress hook of an underlay device, as ``nodecryptor status`` shows it: every tcx
program in order with its name and id (BPF_PROG_QUERY: Debian's bpftool and iproute2 cannot
show tcx), then the legacy clsact filters, with nodecryptor's own entry marked. So an operator
sees Cilium's ``cil_to_netdev`` running behind nodecryptor.

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


def egress_chain(ifname: str, own_prog_id: int = 0, own_name: str = "nc_egress") -> dict:
    """The egress hook of ``ifname``: {"device", "ifindex", "tcx": [...] or None, "tc": [...],
    "runs_first"}. Entries are in the order the kernel runs them (tcx before clsact)."""
    ifindex = attach.ifindex_of(ifname)
    out: dict = {"device": ifname, "ifindex": ifindex, "tcx": None, "tc": [], "runs_first": None}
    if not ifindex:
        out["error"] = "device absent"
        return out
    hook = attach.query(ifindex)
    known = {own_prog_id: own_name} if own_prog_id else {}
    if hook.get("tcx") is not None:
        out["tcx"] = []
        for entry in hook["tcx"]:
            name, err = _name(entry["prog_id"], known)
            item = {"position": entry["position"], "prog_id": entry["prog_id"],
                    "link_id": entry["link_id"], "name": name,
                    "nodecryptor": bool(own_prog_id) and entry["prog_id"] == own_prog_id}
            if err:
                item["name_error"] = err
            out["tcx"].append(item)
    else:
        out["tcx_unavailable"] = hook.get("tcx_unavailable")
    out["tc"] = [{"position": i, "prio": f["prio"], "handle": f["handle"], "kind": f["kind"],
                  "name": f["name"], "nodecryptor": f["ours"]} for i, f in enumerate(hook["tc"])]
    first = (out["tcx"] or out["tc"] or [None])[0]
    out["runs_first"] = first and (first.get("name") or f"prog {first.get('prog_id')}")
    return out


def describe(chain: dict) -> list[str]:
    """Text lines for ``nodecryptor status``."""
    lines = []
    if chain.get("error"):
        return [f"  {chain['device']}: {chain['error']}"]
    if chain.get("tcx") is not None:
        lines.append(f"  {chain['device']} tcx egress: "
                     + (" -> ".join(f"{e.get('name') or '?'}(id {e['prog_id']})"
                                    + ("*" if e["nodecryptor"] else "") for e in chain["tcx"])
                        or "empty"))
    for f in chain.get("tc", []):
        lines.append(f"  {chain['device']} tc egress prio {f['prio']} handle {f['handle']} "
                     f"{f['kind']} {f['name'] or ''}" + (" *" if f["nodecryptor"] else ""))
    return lines
