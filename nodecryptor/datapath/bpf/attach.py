"""Attaching the program to the egress hook of underlay devices, and listing those hooks.

tcx (kernel 6.6+) is preferred: a link at the HEAD of the egress chain (BPF_F_BEFORE without an
anchor), pinned under ``<root>/links/<ifname>`` so the program keeps enforcing when the agent
dies (fail-static). A restart swaps the program inside the same link (BPF_LINK_UPDATE), so the
hook is never empty; a link whose device went away (ENOLINK, or a different ifindex because the
device was re-created) is unpinned and replaced.

Without tcx: a clsact qdisc and a direct-action bpf filter on egress at priority 1 with
nodecryptor's own handle and name, replaced in place on restart. A filter that runs before it
(same priority listed first, or any tcx program, since tcx runs before all clsact filters) can
end classification with TC_ACT_OK, so it is reported as shadowing. In this mode Cilium's
``bpf-filter-priority`` must be 2 or more, so its filter runs after nodecryptor's.

Only nodecryptor's own objects are ever changed: links pinned under its root, filters with its
handle *and* name. Every function takes plain values and returns plain data.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from dataclasses import asdict, dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nodecryptor.core.log import kv
from nodecryptor.datapath.bpf import pins, syscall

log = logging.getLogger(__name__)

MODE_TCX = "tcx"
MODE_TC = "tc"

TC_HANDLE = 0x4E43  # "NC"
TC_NAME = "nodecryptor"
TC_PRIO = 1
TC_EGRESS_PARENT = 0xFFFFFFF3  # clsact egress (ffff:fff3)
TC_INGRESS_PARENT = 0xFFFFFFF2  # clsact ingress (ffff:fff2)
EGRESS = "egress"
INGRESS = "ingress"
"""Directions: the egress program (nc_egress) and the ingress program
(nc_ingress) are attached with the same discipline; every function takes ``direction``."""


def _tcx_type(direction: str) -> int:
    return syscall.BPF_TCX_INGRESS if direction == INGRESS else syscall.BPF_TCX_EGRESS


def _tc_parent(direction: str) -> int:
    return TC_INGRESS_PARENT if direction == INGRESS else TC_EGRESS_PARENT


@dataclass(frozen=True)
class Attachment:
    """One device's hook as nodecryptor sees it."""

    device: str
    ifindex: int
    mode: str  # MODE_TCX | MODE_TC
    prog_id: int = 0
    link_id: int = 0
    handle: int = 0
    prio: int = 0
    position: int = 0
    """Index of nodecryptor's program in the hook's chain (0 = runs first)."""
    defunct: bool = False
    shadowed_by: str = ""
    """What runs before nodecryptor and could end classification (empty: nothing)."""

    def to_json(self) -> dict:
        out = {"name": self.device, **asdict(self)}
        del out["device"]
        if self.mode == MODE_TCX:
            out.pop("handle")
            out.pop("prio")
        else:
            out.pop("link_id")
            out["handle"] = f"0x{self.handle:x}"
        return out


def choose_mode(requested: str, tcx_ok: bool, tcx_why: str) -> tuple[str, str]:
    """("tcx"|"tc", why) from the requested mode ("auto", "tcx", "tc") and the tcx probe."""
    if requested == MODE_TC:
        return MODE_TC, "legacy tc requested"
    if tcx_ok:
        return MODE_TCX, tcx_why
    return MODE_TC, f"no tcx ({tcx_why}); legacy clsact filter"


def ifindex_of(ifname: str) -> int:
    """Current ifindex of a device in this network namespace; 0 when it does not exist."""
    try:
        return socket.if_nametoindex(ifname)
    except OSError:
        return 0


# ---- tcx -----------------------------------------------------------------------------------


def _tcx_position(ifindex: int, link_id: int, direction: str = EGRESS) -> tuple[int, list[int]]:
    chain = syscall.prog_query(ifindex, _tcx_type(direction))
    ids = chain["link_ids"]
    pos = ids.index(link_id) if link_id in ids else -1
    return pos, chain["prog_ids"][: max(pos, 0)]


def tcx_observe(bpffs: str, ifname: str, direction: str = EGRESS) -> Attachment | None:
    """The pinned link of ``ifname``; None when there is no pin."""
    path = pins.link_path(bpffs, ifname, direction)
    try:
        link = syscall.obj_get(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    with link:
        info = syscall.link_info(link)
    current = ifindex_of(ifname)
    # A link whose device is gone reports ifindex 0; a re-created device has a new ifindex.
    defunct = info.tcx_ifindex == 0 or info.tcx_ifindex != current
    att = Attachment(
        device=ifname,
        ifindex=info.tcx_ifindex,
        mode=MODE_TCX,
        prog_id=info.prog_id,
        link_id=info.id,
        defunct=defunct,
    )
    if defunct:
        return att
    pos, before = _tcx_position(current, info.id, direction)
    shadow = (
        f"tcx program(s) {before} run before nodecryptor on {ifname} {direction}" if pos > 0 else ""
    )
    return Attachment(**{**asdict(att), "position": pos, "shadowed_by": shadow})


def tcx_attach(bpffs: str, ifname: str, prog_fd: syscall.Fd, direction: str = EGRESS) -> Attachment:
    """Make ``prog_fd`` the program of ``ifname``'s pinned tcx link: swap it in place when the
    link is alive, else (re)create the link at the head of the chain and pin it."""
    ifindex = ifindex_of(ifname)
    if not ifindex:
        raise OSError(errno.ENODEV, f"device {ifname!r} does not exist")
    path = pins.link_path(bpffs, ifname, direction)
    current = tcx_observe(bpffs, ifname, direction)
    if current is not None and not current.defunct:
        if current.prog_id == syscall.prog_info(prog_fd).id:
            return current  # already running this program: nothing to do
        with syscall.obj_get(path) as link:
            try:
                syscall.link_update(link, prog_fd)
                log.debug(
                    "tcx program swapped in place", extra=kv(device=ifname, link_id=current.link_id)
                )
                return tcx_observe(bpffs, ifname, direction)
            except OSError as e:
                if e.errno != errno.ENOLINK:
                    raise
    if current is not None:
        log.info(
            "pinned tcx link is defunct (device deleted or re-created); replacing it",
            extra=kv(
                device=ifname,
                old_link_id=current.link_id,
                old_ifindex=current.ifindex,
                ifindex=ifindex,
            ),
        )
        pins.unlink(path)
    # The pin becomes the link's only reference once this object is closed.
    with syscall.tcx_link_create(
        prog_fd, ifindex, _tcx_type(direction), syscall.BPF_F_BEFORE
    ) as link:
        try:
            syscall.obj_pin(link, path)
        except OSError:
            syscall.link_detach(link)
            raise
    att = tcx_observe(bpffs, ifname, direction)
    log.info(
        "tcx link created at the head of the chain",
        extra=kv(
            device=ifname, direction=direction, ifindex=ifindex, link_id=att.link_id if att else 0
        ),
    )
    return att


def tcx_detach(bpffs: str, ifname: str, direction: str = EGRESS) -> bool:
    """Detach and unpin ``ifname``'s link. Missing is success (False)."""
    path = pins.link_path(bpffs, ifname, direction)
    try:
        link = syscall.obj_get(path)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    with link:
        try:
            syscall.link_detach(link)
        except OSError as e:
            # ENOLINK / EINVAL: already defunct, nothing attached any more.
            if e.errno not in (errno.ENOLINK, errno.EINVAL):
                raise
    pins.unlink(path)
    log.info("tcx link detached", extra=kv(device=ifname, direction=direction))
    return True


# ---- legacy tc -----------------------------------------------------------------------------


def _filters(ipr: IPRoute, ifindex: int, direction: str = EGRESS) -> list[dict]:
    """The hook's filters in classification order (headers without a handle left out)."""
    out = []
    for msg in ipr.get_filters(index=ifindex, parent=_tc_parent(direction)):
        if not msg["handle"]:
            continue
        name = msg.get_nested("TCA_OPTIONS", "TCA_BPF_NAME")
        out.append(
            {
                "prio": msg["info"] >> 16,
                "handle": msg["handle"],
                "kind": msg.get_attr("TCA_KIND"),
                "name": name,
                "prog_id": _tc_bpf_id(msg),
            }
        )
    return out


_NLMSG_HDR, _TCMSG = 16, 20
_TCA_OPTIONS, _TCA_BPF_ID = 2, 11
_NLA_TYPE_MASK = 0x3FFF  # without the nested / byte-order flags


def _nlas(data: bytes, start: int, end: int):
    """(type, value start, value end) of the netlink attributes in data[start:end]."""
    while start + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, start)
        if length < 4:
            return
        yield kind & _NLA_TYPE_MASK, start + 4, min(start + length, end)
        start += (length + 3) & ~3


def _tc_bpf_id(msg) -> int:
    """The program id of a bpf filter (TCA_OPTIONS/TCA_BPF_ID), read from the raw message:
    pyroute2 does not decode that attribute. 0 when absent."""
    data, base = msg.data, msg.offset
    end = base + msg["header"]["length"]
    for kind, first, last in _nlas(data, base + _NLMSG_HDR + _TCMSG, end):
        if kind == _TCA_OPTIONS:
            for inner, value, stop in _nlas(data, first, last):
                if inner == _TCA_BPF_ID and stop - value >= 4:
                    return struct.unpack_from("=I", data, value)[0]
    return 0


def _is_ours(f: dict) -> bool:
    return f["kind"] == "bpf" and f["handle"] == TC_HANDLE and f["name"] == TC_NAME


def _tc_observe(
    ipr: IPRoute, ifname: str, ifindex: int, prog_id: int = 0, direction: str = EGRESS
) -> Attachment | None:
    try:
        filters = _filters(ipr, ifindex, direction)
    except NetlinkError as e:
        if e.code in (errno.EINVAL, errno.ENOENT, errno.ENODEV):  # no clsact / no device
            return None
        raise
    ours = [i for i, f in enumerate(filters) if _is_ours(f)]
    if not ours:
        return None
    pos = ours[0]
    shadows = [
        f"filter prio {f['prio']} handle 0x{f['handle']:x} "
        f"({' '.join(x for x in (f['kind'], f['name']) if x)})"
        for f in filters[:pos]
    ]
    ok, _ = syscall.tcx_supported()
    if ok:
        chain = syscall.prog_query(ifindex, _tcx_type(direction))
        if chain["prog_ids"]:
            shadows.append(f"tcx program(s) {chain['prog_ids']} (tcx runs before clsact)")
    return Attachment(
        device=ifname,
        ifindex=ifindex,
        mode=MODE_TC,
        prog_id=prog_id,
        handle=TC_HANDLE,
        prio=TC_PRIO,
        position=pos,
        shadowed_by="; ".join(shadows),
    )


def tc_observe(ifname: str, prog_id: int = 0, direction: str = EGRESS) -> Attachment | None:
    ifindex = ifindex_of(ifname)
    if not ifindex:
        return None
    with IPRoute() as ipr:
        return _tc_observe(ipr, ifname, ifindex, prog_id, direction)


def tc_attach(
    ifname: str, prog_fd: syscall.Fd, prog_id: int = 0, direction: str = EGRESS
) -> Attachment:
    """Ensure the clsact qdisc and replace nodecryptor's filter of ``direction`` in place."""
    ifindex = ifindex_of(ifname)
    if not ifindex:
        raise OSError(errno.ENODEV, f"device {ifname!r} does not exist")
    with IPRoute() as ipr:
        try:
            ipr.tc("add", "clsact", ifindex)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        # "replace" would overwrite any filter with this handle and priority: refuse when it
        # is not nodecryptor's (another tool picked the same handle).
        try:
            taken = [
                f
                for f in _filters(ipr, ifindex, direction)
                if f["handle"] == TC_HANDLE and f["prio"] == TC_PRIO and not _is_ours(f)
            ]
        except NetlinkError:
            taken = []
        if taken:
            raise OSError(
                errno.EEXIST,
                f"a foreign filter ({taken[0]['kind']} "
                f"{taken[0]['name'] or 'unnamed'}) holds handle "
                f"0x{TC_HANDLE:x} prio {TC_PRIO} on {ifname}",
            )
        ipr.tc(
            "replace-filter",
            "bpf",
            ifindex,
            TC_HANDLE,
            fd=syscall.fd_number(prog_fd),
            name=TC_NAME,
            parent=_tc_parent(direction),
            prio=TC_PRIO,
            direct_action=True,
        )
        att = _tc_observe(ipr, ifname, ifindex, prog_id, direction)
    log.debug("tc filter replaced", extra=kv(device=ifname, handle=hex(TC_HANDLE)))
    return att


def _tc_delete(ipr: IPRoute, ifindex: int, direction: str = EGRESS) -> None:
    try:
        ipr.tc("del-filter", "bpf", ifindex, TC_HANDLE, parent=_tc_parent(direction), prio=TC_PRIO)
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            raise


def tc_devices(direction: str = EGRESS) -> dict[str, int]:
    """Devices of this namespace that carry nodecryptor's filter: {ifname: ifindex}."""
    found = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            ifindex = link["index"]
            try:
                filters = _filters(ipr, ifindex, direction)
            except NetlinkError:
                continue
            if any(_is_ours(f) for f in filters):
                found[link.get_attr("IFLA_IFNAME")] = ifindex
    return found


def tc_programs(direction: str = EGRESS) -> dict[str, int]:
    """{ifname: program id} of nodecryptor's own filters of ``direction`` in this namespace."""
    found = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            try:
                filters = _filters(ipr, link["index"], direction)
            except NetlinkError:
                continue
            for f in filters:
                if _is_ours(f) and f["prog_id"]:
                    found[link.get_attr("IFLA_IFNAME")] = f["prog_id"]
    return found


def tc_detach(ifname: str, ifindex: int | None = None, direction: str = EGRESS) -> bool:
    """Remove nodecryptor's filter (only one with its handle and name). Leaves the clsact qdisc:
    other programs may use it. Missing is success (False)."""
    ifindex = ifindex or ifindex_of(ifname)
    if not ifindex:
        return False
    with IPRoute() as ipr:
        try:
            filters = _filters(ipr, ifindex, direction)
        except NetlinkError:
            return False
        if not any(_is_ours(f) for f in filters):
            return False
        _tc_delete(ipr, ifindex, direction)
    log.info(
        "tc filter removed", extra=kv(device=ifname, direction=direction, handle=hex(TC_HANDLE))
    )
    return True


# ---- listing ---------------------------------------------------------------------------------


def query(ifindex: int, direction: str = EGRESS) -> dict:
    """The whole hook of a device in ``direction``: the tcx chain in order (program and link
    ids, as Debian's bpftool and iproute2 cannot show it) and the legacy clsact filters."""
    out: dict = {"ifindex": ifindex, "direction": direction, "tcx": None, "tc": []}
    ok, why = syscall.tcx_supported()
    if ok:
        chain = syscall.prog_query(ifindex, _tcx_type(direction))
        out["tcx"] = [
            {"position": i, "prog_id": prog, "link_id": link}
            for i, (prog, link) in enumerate(zip(chain["prog_ids"], chain["link_ids"]))
        ]
        out["tcx_revision"] = chain["revision"]
    else:
        out["tcx_unavailable"] = why
    with IPRoute() as ipr:
        try:
            out["tc"] = [
                {**f, "handle": f"0x{f['handle']:x}", "ours": _is_ours(f)}
                for f in _filters(ipr, ifindex, direction)
            ]
        except NetlinkError:
            out["tc"] = []
    return out
