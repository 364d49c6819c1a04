"""The Cilium stand-in's BPF programs (standin_bpf.c): loading, attaching where Cilium attaches,
keeping their maps current, and reloading them as a restarting cilium-agent does.

Attachment follows Cilium: ``cil_to_netdev`` at the TAIL of the underlay's tcx egress chain
(appended, no anchor) and ``cil_from_container`` on the pod veth's tcx ingress; without tcx,
clsact filters (egress prio 2 behind nodecryptor's prio 1, ingress prio 1). A reload compiles
fresh programs and swaps them into the same links (BPF_LINK_UPDATE) or filters (replace), so a
program at the head of the chain stays at the head. BCC is imported here only: this is the
development lab, not the agent.
"""

from __future__ import annotations

import ctypes as C
import ipaddress
import logging
import os
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nodecryptor.datapath.bpf import syscall
from nodecryptor.core.log import kv

log = logging.getLogger("nodecryptor_testkit.lab.standin")

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin_bpf.c")
MARK_MAGIC_IDENTITY = 0x0F00
"""Cilium's identity mark magic: under mask 0x0F00 it differs from WireGuard's 0x0E00, so
nodecryptor must not mistake it for WireGuard's own output."""
IDENTITY = 0x1234
CLSACT_EGRESS = 0xFFFFFFF3
CLSACT_INGRESS = 0xFFFFFFF2
FILTER_HANDLE = 0xC1
COUNTERS = ("lxc_redirect", "netdev_seen", "netdev_to_wireguard")


class _Lpm4(C.Structure):
    _fields_ = [("prefixlen", C.c_uint32), ("addr", C.c_uint8 * 4)]


class _Lpm6(C.Structure):
    _fields_ = [("prefixlen", C.c_uint32), ("addr", C.c_uint8 * 16)]


class _Config(C.Structure):
    _fields_ = [
        ("wg_ifindex", C.c_uint32),
        ("underlay_ifindex", C.c_uint32),
        ("mark", C.c_uint32),
        ("redirect", C.c_uint32),
    ]


def _ifindex(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


def _key(net) -> C.Structure:
    key = (_Lpm4 if net.version == 4 else _Lpm6)(prefixlen=net.prefixlen)
    packed = net.network_address.packed
    C.memmove(key.addr, packed, len(packed))
    return key


class StandinDatapath:
    def __init__(self, underlay: str, pod_dev: str | None, wg_ifname: str, native: bool):
        """``pod_dev`` None: no pod on this node (the VM's node A), only cil_to_netdev."""
        self.underlay = underlay
        self.pod_dev = pod_dev
        self.wg_ifname = wg_ifname
        self.native = native
        self.module = None
        self.tcx, _ = syscall.tcx_supported()
        self.links: dict[str, int] = {}
        """hook name -> tcx link fd (held open: the links live as long as the stand-in)."""
        self.local: tuple = ()
        self.remote: tuple = ()
        self.reloads = 0

    # ---- programs ----
    def _load(self):
        from bcc import BPF  # the lab's own loader; the agent keeps bcc in program.py

        module = BPF(src_file=SOURCE.encode())
        fns = {
            name: module.load_func(name.encode(), BPF.SCHED_CLS)
            for name in ("cil_to_netdev", "cil_from_container")
        }
        return module, fns

    def start(self) -> None:
        self.module, fns = self._load()
        self._fill(self.module)
        self._attach(fns, first=True)

    def reload(self) -> dict:
        """A Cilium restart: new programs, same links. Returns the link ids before and after."""
        before = self.link_ids()
        counted = self.counters()
        module, fns = self._load()
        self._fill(module)
        self._attach(fns, first=False)
        old, self.module = self.module, module
        old.cleanup()
        self.reloads += 1
        after = self.link_ids()
        log.info(
            "datapath reloaded in place",
            extra=kv(links_before=before, links_after=after, reloads=self.reloads, **counted),
        )
        return {"before": before, "after": after}

    def _attach(self, fns: dict, first: bool) -> None:
        hooks = (
            (
                "netdev",
                self.underlay,
                fns["cil_to_netdev"],
                syscall.BPF_TCX_EGRESS,
                CLSACT_EGRESS,
                2,
            ),
            (
                "lxc",
                self.pod_dev,
                fns["cil_from_container"],
                syscall.BPF_TCX_INGRESS,
                CLSACT_INGRESS,
                1,
            ),
        )
        for hook, dev, fn, attach_type, parent, prio in hooks:
            if dev is None:
                continue
            ifindex = _ifindex(dev)
            if not ifindex:
                raise RuntimeError(f"stand-in datapath: device {dev} does not exist")
            if self.tcx:
                if hook in self.links:
                    syscall.link_update(self.links[hook], fn.fd)
                else:
                    # No BPF_F_BEFORE/AFTER and no anchor: appended at the tail, as Cilium does.
                    self.links[hook] = syscall.tcx_link_create(fn.fd, ifindex, attach_type, flags=0)
            else:
                with IPRoute() as ipr:
                    try:
                        ipr.tc("add", "clsact", ifindex)
                    except NetlinkError as e:
                        if e.code != 17:  # EEXIST
                            raise
                    ipr.tc(
                        "replace-filter",
                        "bpf",
                        ifindex,
                        FILTER_HANDLE,
                        fd=fn.fd,
                        name=fn.name.decode(),
                        parent=parent,
                        prio=prio,
                        direct_action=True,
                    )

    def link_ids(self) -> dict[str, int]:
        """tcx link ids by hook (empty with legacy tc filters, which are replaced in place)."""
        return {hook: syscall.link_info(fd).id for hook, fd in self.links.items()}

    def prog_ids(self) -> dict[str, int]:
        if self.module is None:
            return {}
        return {
            name: syscall.prog_info(self.module.funcs[name.encode()].fd).id
            for name in ("cil_to_netdev", "cil_from_container")
            if name.encode() in self.module.funcs
        }

    # ---- maps ----
    def sync(self, local, remote) -> None:
        """Local and remote pod CIDRs; the WireGuard and underlay ifindex are re-read each time
        (cilium_wg0 is re-created by reboots)."""
        self.local, self.remote = tuple(local), tuple(remote)
        if self.module is not None:
            self._fill(self.module)

    def _fill(self, module) -> None:
        for name, nets in (("sd_local", self.local), ("sd_remote", self.remote)):
            for fam in (4, 6):
                table = module[f"{name}{fam}".encode()]
                want = {bytes(_key(n)) for n in nets if n.version == fam}
                have = {bytes(k) for k in table.keys()}
                for k in have - want:
                    del table[table.Key.from_buffer_copy(k)]
                for k in want - have:
                    table[table.Key.from_buffer_copy(k)] = C.c_uint32(1)
        cfg = module[b"sd_config"]
        cfg[C.c_int(0)] = cfg.Leaf(
            _ifindex(self.wg_ifname),
            _ifindex(self.underlay),
            MARK_MAGIC_IDENTITY | (IDENTITY << 16),
            int(self.native),
        )

    def counters(self) -> dict[str, int]:
        if self.module is None:
            return {}
        table = self.module[b"sd_counts"]
        return {name: sum(table[C.c_int(i)]) for i, name in enumerate(COUNTERS)}

    def close(self) -> None:
        for link in self.links.values():
            link.close()  # unpinned links go with their last fd
        self.links.clear()
        if not self.tcx:
            for dev, parent, prio in (
                (self.underlay, CLSACT_EGRESS, 2),
                (self.pod_dev, CLSACT_INGRESS, 1),
            ):
                ifindex = _ifindex(dev) if dev else 0
                if ifindex:
                    with IPRoute() as ipr:
                        try:
                            ipr.tc(
                                "del-filter",
                                "bpf",
                                ifindex,
                                FILTER_HANDLE,
                                parent=parent,
                                prio=prio,
                            )
                        except NetlinkError:
                            pass
        if self.module is not None:
            self.module.cleanup()
            self.module = None


def cidrs(values) -> list:
    return [ipaddress.ip_network(v) for v in values]
