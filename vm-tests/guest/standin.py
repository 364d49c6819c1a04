"""Loader of the stand-in program (standin.c) with the Datapath shape the VM driver needs.

Used only when ``nodecryptor.datapath.bpf.backend`` cannot be imported, so the VM harness still
proves the kernel facts (BCC compiles in the guest, legacy clsact attach on 6.1, redirect into
kernel WireGuard, MSS clamping) while the real backend is being written. It attaches the same way
the real backend does on kernels without tcx: clsact egress filter, prio 1, direct-action.
"""

from __future__ import annotations

import ctypes as C
import os
import time

from pyroute2 import IPRoute

from nodecryptor.datapath.base import Observation
from nodecryptor.datapath.bpf import abi
from nodecryptor.model import DesiredState

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
TC_EGRESS_PARENT = "ffff:fff3"  # clsact's egress hook
FILTER_PRIO = 1
FILTER_HANDLE = 0x4E43  # "NC": our own handle, so we only ever delete our filter


class StandinDatapath:
    name = "bpf-standin"

    def __init__(self):
        self.bpf = None
        self.fn = None
        self.compile_seconds = 0.0
        self.devices: list[int] = []

    def start(self) -> "StandinDatapath":
        from bcc import BPF  # the harness's own loader; the product keeps bcc in program.py

        started = time.monotonic()
        self.bpf = BPF(src_file=os.path.join(HERE, "standin.c").encode(),
                       cflags=[f"-I{REPO}/bpf/include"])
        self.fn = self.bpf.load_func(b"nc_standin_egress", BPF.SCHED_CLS)
        self.compile_seconds = time.monotonic() - started
        return self

    def apply(self, desired: DesiredState) -> None:
        dst = self.bpf[b"nc_dst_v4"]
        for d in desired.destinations:
            if d.prefix.version != 4:
                continue
            key = dst.Key(d.prefix.prefixlen, (C.c_uint8 * 4)(*d.prefix.network_address.packed))
            flags = abi.DST_F_CONTROL_PLANE if d.control_plane else 0
            dst[key] = dst.Leaf(abi.KIND_NODE_IP if d.kind == "node-ip" else abi.KIND_POD_CIDR,
                                flags, 0)
        exempt = self.bpf[b"nc_exempt"]
        for rng in desired.plan.exempt_ports:
            for port in range(rng.first, rng.last + 1):
                exempt[exempt.Key(rng.proto_number, 0, port)] = C.c_uint32(abi.EXEMPT_DPORT)
        cfg = self.bpf[b"nc_config_map"]
        leaf = cfg.Leaf()
        leaf.wg_ifindex = desired.wg.ifindex
        leaf.enabled = 1
        leaf.wg_up = 1
        leaf.mss_v4 = desired.mss_v4
        leaf.wg_port = desired.wg.listen_port
        leaf.wg_mark = desired.wg_mark
        leaf.wg_mark_mask = desired.wg_mark_mask
        cfg[C.c_uint32(0)] = leaf
        with IPRoute() as ipr:
            for dev in desired.devices:
                if dev.ifindex in self.devices:
                    continue
                try:
                    ipr.tc("add", "clsact", dev.ifindex)
                except Exception as e:  # EEXIST: another program already created clsact
                    if getattr(e, "code", None) != 17:
                        raise
                ipr.tc("add-filter", "bpf", dev.ifindex, FILTER_HANDLE, fd=self.fn.fd,
                       name=self.fn.name, parent=TC_EGRESS_PARENT, prio=FILTER_PRIO,
                       classid=1, direct_action=True)
                self.devices.append(dev.ifindex)

    def observe(self) -> Observation:
        return Observation(datapath=self.name, attached=bool(self.devices),
                           ready=bool(self.devices),
                           details={"attach_mode": "clsact", "devices": self.devices,
                                    "compile_seconds": round(self.compile_seconds, 2)})

    def close(self) -> None:
        pass

    def cleanup(self) -> None:
        with IPRoute() as ipr:
            for ifindex in self.devices:
                try:
                    ipr.tc("del-filter", "bpf", ifindex, FILTER_HANDLE,
                           parent=TC_EGRESS_PARENT, prio=FILTER_PRIO)
                except Exception:  # device already gone with its netns: nothing to remove
                    pass
        self.devices = []

