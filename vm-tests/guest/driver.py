"""Datapath driver: runs inside node A's network namespace and applies nodecryptor there.

The scenario starts it once per datapath (``ip netns exec <A> python driver.py``) and talks to
it with one JSON object per line on stdin/stdout, so the BPF program is compiled once (a minute
or more under TCG) and re-applied with different settings (MSS clamping on and off) in place,
and Python with pyroute2 is imported once (~20 s under TCG) for both datapaths.

Requests: {"op": "start", "datapath": "bpf"|"iprule", "nodes": [...], "local": name,
"device": underlay, "bpffs": path}, {"op": "apply", "clamp": bool}, {"op": "observe"},
{"op": "cleanup"} (removes the datapath; another "start" may follow), {"op": "hello"} (answered
once imports are done), {"op": "cilium", "action": "start"|"reload"|"stop"} (the lab's Cilium
stand-in, nodecryptor_testkit/lab/standin_datapath.py: cil_to_netdev behind nodecryptor, a
clsact filter at prio 2 on a kernel without tcx, reloaded in place), {"op": "quit"}.
Every reply is {"ok": bool, ...}; an error reply carries "error" and the traceback's last line.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import subprocess
import sys
import time
import traceback

from nodecryptor.core import log as nclog
from nodecryptor.policy import plan as policy
from nodecryptor.node import wireguard
from nodecryptor.core.model import Device, NodeInfo, WgPeer, WgState
from nodecryptor.core.settings import Settings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def node_from_json(obj: dict) -> NodeInfo:
    # The guest has no API server: one JSON object stands for the node's CiliumNode and its v1
    # Node alike: its labels (roles come from the Node's labels by default) and its addresses
    # (node addresses are trusted only as the v1 Node's status.addresses list them).
    labels = tuple(sorted(obj.get("labels", {}).items()))
    addresses = tuple(("InternalIP", ipaddress.ip_address(a)) for a in obj["addresses"])
    return NodeInfo(
        name=obj["name"],
        labels=labels,
        node_labels=labels,
        addresses=addresses,
        node_addresses=addresses,
        pod_cidrs=tuple(ipaddress.ip_network(c) for c in obj.get("pod_cidrs", ())),
        wg_public_key=obj.get("wg_public_key"),
    )


def underlay_device(name: str) -> Device:
    with open(f"/sys/class/net/{name}/ifindex") as f:
        ifindex = int(f.read())
    with open(f"/sys/class/net/{name}/mtu") as f:
        mtu = int(f.read())
    return Device(name=name, ifindex=ifindex, mtu=mtu)


class Driver:
    def __init__(self):
        self.datapath = None
        self.impl = ""
        self.settings: Settings | None = None
        self.snapshot: dict[str, NodeInfo] = {}
        self.local = ""
        self.device = ""
        self.wg_error = ""
        self.cilium_dp = None

    def start(self, req: dict) -> dict:
        self.settings = Settings(
            node_name=req["local"],
            bpffs=req["bpffs"],
            devices=(req["device"],),
            datapath=req["datapath"],
        )
        self.snapshot = {n["name"]: node_from_json(n) for n in req["nodes"]}
        self.local = req["local"]
        self.device = req["device"]
        started = time.monotonic()
        reply: dict = {"ok": True}
        if req["datapath"] == "bpf":
            from nodecryptor.datapath.bpf import syscall

            tcx_ok, tcx_why = syscall.tcx_supported()
            reply["tcx"] = {"supported": tcx_ok, "why": tcx_why}
            self.datapath, self.impl = self._bpf(reply)
        else:
            from nodecryptor.datapath.iprule.backend import IpRuleDatapath

            self.datapath, self.impl = IpRuleDatapath(self.settings), "nodecryptor"
            self.datapath.start()
        reply.update(impl=self.impl, start_seconds=round(time.monotonic() - started, 2))
        return reply

    def _bpf(self, reply: dict):
        # No fallback: if bpf/nodecryptor.c does not compile or load on this kernel, start
        # fails with the loader's error and every BPF test fails naming it (the verifier's
        # log is on stderr, which the scenario attaches to the error).
        from nodecryptor.datapath.bpf.backend import BpfDatapath

        datapath = BpfDatapath(self.settings)
        datapath.start()
        return datapath, "nodecryptor"

    def wg_state(self) -> tuple[WgState, str]:
        """The device as nodecryptor's reader sees it; if the reader fails, as ``wg show``
        reports it, so the datapath checks still run (the failure is reported)."""
        ifname = self.settings.wg_interface
        try:
            return wireguard.read_state(ifname), ""
        except Exception as e:  # recorded in the reply; the test marks it
            error = f"{type(e).__name__}: {e}"
        dump = subprocess.run(
            ["wg", "show", ifname, "dump"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
        _, _, port, fwmark = dump[0].split("\t")
        peers = []
        for line in dump[1:]:
            fields = line.split("\t")
            peers.append(
                WgPeer(
                    public_key=fields[0],
                    endpoint=fields[2],
                    allowed_ips=tuple(ipaddress.ip_network(a) for a in fields[3].split(",")),
                )
            )
        dev = underlay_device(ifname)
        state = WgState(
            ifname=ifname,
            ifindex=dev.ifindex,
            present=True,
            up=True,
            mtu=dev.mtu,
            listen_port=int(port),
            fwmark=int(fwmark, 16) if fwmark != "off" else 0,
            peers=tuple(peers),
        )
        return state, error

    def desired(self, clamp: bool):
        plan = policy.compute_plan(self.snapshot, self.local, self.settings)
        wg, self.wg_error = self.wg_state()
        desired = policy.compute_desired(plan, wg, [underlay_device(self.device)], self.settings)
        if not clamp:
            # The knob of the MTU experiment: the same state without MSS clamping.
            desired = dataclasses.replace(desired, mss_v4=0, mss_v6=0)
        return desired

    def apply(self, req: dict) -> dict:
        desired = self.desired(req.get("clamp", True))
        started = time.monotonic()
        self.datapath.apply(desired)
        return {
            "ok": True,
            "apply_seconds": time.monotonic() - started,
            "mss_v4": desired.mss_v4,
            "max_packet_v4": desired.max_packet_v4,
            "wg": {
                "ifindex": desired.wg.ifindex,
                "mtu": desired.wg.mtu,
                "listen_port": desired.wg.listen_port,
                "fwmark": desired.wg.fwmark,
                "peers": len(desired.wg.peers or ()),
            },
            "destinations": [d.to_json() for d in desired.destinations],
            "uncovered": sorted(str(p) for p in desired.uncovered),
            "wireguard_reader_error": self.wg_error,
        }

    def observe(self, _req: dict) -> dict:
        obs = self.datapath.observe()
        return {
            "ok": True,
            "datapath": obs.datapath,
            "attached": obs.attached,
            "ready": obs.ready,
            "reason": obs.reason,
            "details": json.loads(json.dumps(obs.details, default=str)),
            "counters": obs.counters,
        }

    def cilium(self, req: dict) -> dict:
        """The Cilium stand-in on the underlay: start (tail of the hook), reload in place, stop."""
        action = req["action"]
        started = time.monotonic()
        if action == "start":
            if REPO not in sys.path:
                sys.path.insert(0, REPO)
            from nodecryptor_testkit.lab.standin_datapath import StandinDatapath as Cilium

            self.cilium_dp = Cilium(req.get("device", "eth0"), None, "cilium_wg0", native=True)
            self.cilium_dp.start()
            out = {"tcx": self.cilium_dp.tcx, "links": self.cilium_dp.link_ids()}
        elif action == "reload":
            out = self.cilium_dp.reload()
        else:
            if self.cilium_dp is not None:
                self.cilium_dp.close()
                self.cilium_dp = None
            return {"ok": True}
        out.update(
            ok=True,
            seconds=round(time.monotonic() - started, 2),
            prog_ids=self.cilium_dp.prog_ids(),
        )
        return out

    def cleanup(self, _req: dict) -> dict:
        if self.datapath is not None:
            self.datapath.cleanup()
            self.datapath = None
        return {"ok": True}


def main() -> int:
    # The agent's own structured logs (compile times, attach mode) go to the driver log.
    nclog.setup("text", "info", stream=sys.stderr)
    driver = Driver()
    ops = {
        "start": driver.start,
        "apply": driver.apply,
        "observe": driver.observe,
        "cleanup": driver.cleanup,
        "hello": lambda _req: {"ok": True},
        "cilium": driver.cilium,
        "quit": lambda _req: {"ok": True},
    }
    for line in sys.stdin:
        req = json.loads(line)
        try:
            reply = ops[req["op"]](req)
        except Exception as e:  # report every failure to the scenario, which records it
            reply = {
                "ok": False,
                "error": f"{type(e).__name__}: {e}",
                "trace": traceback.format_exc(limit=6),
            }
        print(json.dumps(reply), flush=True)
        if req["op"] == "quit":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
