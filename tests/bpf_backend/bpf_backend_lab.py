"""Building blocks of the BPF backend tests: entering a network namespace from this process,
tiny raw BPF programs (no compiler), a two-node lab joined by a veth underlay with a real
WireGuard device (wireguard-go) on each side, a tcpdump capture, and the desired state the
policy computes for node A.

Everything created here is removed by the ``close()``/context-manager paths, also on failure.
"""

from __future__ import annotations

import ctypes as C
import ipaddress
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from nodecryptor_testkit.netns import entered as netns_entered
from nodecryptor.policy import cilium
from nodecryptor.datapath.bpf import syscall
from nodecryptor.core.model import Device, NodeInfo, WgPeer, WgState
from nodecryptor.policy.plan import admission_limits, compute_desired, compute_plan
from nodecryptor.core.settings import Settings
from nodecryptor_testkit import netns as netns_mod

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CP_LABEL = "node-role.kubernetes.io/control-plane"
WG_PORT = 51871
WG_MARK = 0xE00
WG_IFNAME = "cilium_wg0"


in_netns = netns_entered  # this thread in a network namespace for a block


# ---- raw programs ----------------------------------------------------------------------------


class _ProgLoadAttr(C.Structure):
    _fields_ = [
        ("prog_type", C.c_uint32),
        ("insn_cnt", C.c_uint32),
        ("insns", C.c_uint64),
        ("license", C.c_uint64),
        ("log_level", C.c_uint32),
        ("log_size", C.c_uint32),
        ("log_buf", C.c_uint64),
        ("kern_version", C.c_uint32),
        ("prog_flags", C.c_uint32),
        ("prog_name", C.c_char * 16),
        ("prog_ifindex", C.c_uint32),
        ("expected_attach_type", C.c_uint32),
    ]


BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3


def load_ret_prog(retval: int, name: str = "nc_test_ret") -> syscall.BpfObject:
    """Load a SCHED_CLS program that only returns ``retval``."""
    insns = (C.c_uint8 * 16)()
    # r0 = retval (BPF_ALU64 | BPF_MOV | BPF_K), exit (BPF_JMP | BPF_EXIT)
    mov = bytes([0xB7, 0x00, 0, 0]) + C.c_int32(retval).value.to_bytes(4, "little", signed=True)
    ext = bytes([0x95, 0, 0, 0, 0, 0, 0, 0])
    C.memmove(insns, mov + ext, 16)
    lic = C.create_string_buffer(b"GPL")
    attr = _ProgLoadAttr(
        prog_type=BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt=2,
        insns=C.addressof(insns),
        license=C.addressof(lic),
        prog_name=name.encode()[:15],
    )
    return syscall.BpfObject(syscall._bpf(BPF_PROG_LOAD, attr))


def prog_id(fd: syscall.Fd) -> int:
    return syscall.prog_info(fd).id


# ---- commands in a namespace -----------------------------------------------------------------


def sh(*cmd: str, netns: str | None = None, check: bool = True) -> str:
    return netns_mod.run(*cmd, netns=netns, check=check).stdout


def nodecryptor_cli(
    *args: str, netns: str | None = None, mount_pid: int | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess:
    """Run the CLI the way an operator would, inside the node's namespaces (with
    ``mount_pid`` also in its mount namespace, where its WireGuard UAPI socket is)."""
    prefix: list[str] = []
    if mount_pid:
        prefix = ["nsenter", "-t", str(mount_pid), "-m", "-n"]
    elif netns:
        prefix = ["ip", "netns", "exec", netns]
    # PYTHONPATH: the editable install's finder does not resolve the package from every cwd.
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run(
        prefix + [sys.executable, "-m", "nodecryptor.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ---- the two-node lab ------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    netns: str
    ip: str
    pod_cidr: str
    pod_ip: str
    control_plane: bool = False
    wg_pid: int = 0
    wg_private: str = ""
    wg_public: str = ""

    def info(self) -> NodeInfo:
        labels = ((CP_LABEL, ""),) if self.control_plane else ()
        # The v1 Node (the trusted role source) carries the same labels as the CiliumNode.
        address = (("InternalIP", ipaddress.ip_address(self.ip)),)
        return NodeInfo(
            name=self.name,
            labels=labels,
            node_labels=labels,
            addresses=address,
            node_addresses=address,
            pod_cidrs=(ipaddress.ip_network(self.pod_cidr),),
            wg_public_key=self.wg_public,
        )


def _wg_keys() -> tuple[str, str]:
    private = subprocess.run(
        ["wg", "genkey"], capture_output=True, text=True, check=True
    ).stdout.strip()
    public = subprocess.run(
        ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
    ).stdout.strip()
    return private, public


class TwoNodeLab:
    """Node A (worker, where nodecryptor runs) and node B (control-plane) in two namespaces
    joined by a veth pair ``eth0``/``eth0``, each with ``cilium_wg0`` from wireguard-go peering
    the other (fwmark 0xe00 as Cilium 1.18 sets it). B's pod address lives on its loopback;
    A routes B's pod CIDR via B's node address over eth0, as native routing does."""

    def __init__(self, make_netns, wireguard: bool = True):
        self.a = Node("node-a", make_netns("a"), "192.168.77.1", "10.244.1.0/24", "10.244.1.7")
        self.b = Node(
            "node-b",
            make_netns("b"),
            "192.168.77.2",
            "10.244.2.0/24",
            "10.244.2.7",
            control_plane=True,
        )
        self._procs: list[subprocess.Popen] = []
        self._wg_tmp = tempfile.mkdtemp(prefix="nct-wg-")
        try:
            self._underlay()
            if wireguard:
                for node in (self.a, self.b):
                    node.wg_private, node.wg_public = _wg_keys()
                for node, peer in ((self.a, self.b), (self.b, self.a)):
                    self._wireguard(node, peer)
        except BaseException:
            self.close()
            raise

    def _underlay(self, first: bool = True) -> None:
        a, b = self.a, self.b
        sh(
            "ip",
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            b.netns,
            netns=a.netns,
        )
        for node in (a, b):
            sh("ip", "addr", "add", f"{node.ip}/24", "dev", "eth0", netns=node.netns)
            sh("ip", "link", "set", "eth0", "up", netns=node.netns)
            if first:
                sh("ip", "addr", "add", f"{node.pod_ip}/32", "dev", "lo", netns=node.netns)
                for conf in ("all", "default"):
                    sh("sysctl", "-qw", f"net.ipv4.conf.{conf}.rp_filter=0", netns=node.netns)
        sh("ip", "route", "add", b.pod_cidr, "via", b.ip, "dev", "eth0", netns=a.netns)
        sh("ip", "route", "add", a.pod_cidr, "via", a.ip, "dev", "eth0", netns=b.netns)

    def recreate_underlay(self) -> None:
        """Delete the veth pair and create it again (new ifindex), addresses and routes too."""
        sh("ip", "link", "del", "eth0", netns=self.a.netns)
        self._underlay(first=False)

    def _wireguard(self, node: Node, peer: Node) -> None:
        os.makedirs("/var/run/wireguard", exist_ok=True)
        # ip netns exec gives the command its own mount namespace: a tmpfs on the UAPI socket
        # directory keeps the two cilium_wg0 sockets apart.
        log = open(os.path.join(self._wg_tmp, f"{node.name}.log"), "w")
        proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                node.netns,
                "sh",
                "-c",
                f"mount -t tmpfs tmpfs /var/run/wireguard && exec wireguard-go -f {WG_IFNAME}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self._procs.append(proc)
        node.wg_pid = proc.pid
        deadline = time.time() + 10
        # /var/run is an absolute symlink to /run, which would resolve in our own mount namespace.
        while not os.path.exists(f"/proc/{proc.pid}/root/run/wireguard/{WG_IFNAME}.sock"):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"wireguard-go did not start in {node.netns}")
            time.sleep(0.05)
        keyfile = os.path.join(self._wg_tmp, f"{node.name}.key")
        with open(keyfile, "w") as f:
            f.write(node.wg_private)
        subprocess.run(
            [
                "nsenter",
                "-t",
                str(proc.pid),
                "-m",
                "-n",
                "wg",
                "set",
                WG_IFNAME,
                "listen-port",
                str(WG_PORT),
                "fwmark",
                hex(WG_MARK),
                "private-key",
                keyfile,
                "peer",
                peer.wg_public,
                "endpoint",
                f"{peer.ip}:{WG_PORT}",
                "allowed-ips",
                f"{peer.ip}/32,{peer.pod_cidr}",
            ],
            check=True,
        )
        sh("ip", "link", "set", WG_IFNAME, "up", netns=node.netns)
        sh("sysctl", "-qw", f"net.ipv4.conf.{WG_IFNAME}.rp_filter=0", netns=node.netns)

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        subprocess.run(["rm", "-rf", self._wg_tmp])

    # ---- what nodecryptor on A is given ----

    def settings(self, bpffs: str, **kw) -> Settings:
        return Settings(node_name=self.a.name, bpffs=bpffs, wg_interface=WG_IFNAME, **kw)

    def desired(self, settings: Settings):
        """The DesiredState the policy computes for A (call inside A's namespace)."""
        return desired_for(settings, self.a, self.b)


def desired_for(settings: Settings, a: Node, b: Node):
    """What the agent on A would compute from the two CiliumNodes and A's devices."""
    import socket

    snapshot = {n.name: n.info() for n in (a, b)}
    plan = compute_plan(snapshot, a.name, settings)
    peer = WgPeer(
        public_key=b.wg_public,
        allowed_ips=(ipaddress.ip_network(f"{b.ip}/32"), ipaddress.ip_network(b.pod_cidr)),
        endpoint=f"{b.ip}:{WG_PORT}",
    )
    wg = WgState(
        ifname=WG_IFNAME,
        ifindex=socket.if_nametoindex(WG_IFNAME),
        present=True,
        up=True,
        mtu=1420,
        listen_port=WG_PORT,
        fwmark=WG_MARK,
        peers=(peer,),
    )
    device = Device(name="eth0", ifindex=socket.if_nametoindex("eth0"), mtu=1500)
    desired = compute_desired(plan, wg, (device,), settings)
    # As the reconciler does: A's pod CIDR to B's pod CIDR stays Cilium's (policy/cilium.py).
    facts = cilium.detect(wg, (), [ipaddress.ip_address(b.ip)], [ipaddress.ip_network(b.pod_cidr)])
    return cilium.apply(desired, facts, settings.take_over_pod_to_pod, admission_limits(settings))


def hold_datapath_main(argv: list[str]) -> int:
    """``python bpf_backend_lab.py hold SPEC_JSON``: run inside node A's namespace, start the
    BPF datapath, apply A's desired state, print "applied <prog_id>" and wait to be killed (the
    stand-in for an agent that dies)."""
    import dataclasses
    import json

    from nodecryptor.datapath.bpf.backend import BpfDatapath

    from nodecryptor.datapath.bpf import attach

    spec = json.loads(argv[0])
    a, b = Node(**spec["a"]), Node(**spec["b"])
    settings = Settings(node_name=a.name, bpffs=spec["bpffs"], wg_interface=WG_IFNAME)
    if spec.get("fragments"):
        # Another program text (a compile flag): the stand-in for an upgraded agent, which
        # loads a new generation instead of keeping the running program's.
        settings = dataclasses.replace(
            settings, map_sizes=dataclasses.replace(settings.map_sizes, fragments=spec["fragments"])
        )
    # "die" kills this process (SIGKILL, nothing runs after it) at one point of the lifecycle:
    # "after-start" (an agent that never reaches its first apply: OOM, API outage) or
    # "before-egress" (between the ingress and the egress swap of the first apply).
    die = spec.get("die", "")
    if die == "before-egress":
        real_attach = attach.tcx_attach

        def attach_or_die(bpffs, ifname, prog_fd, direction=attach.EGRESS):
            if direction == attach.EGRESS:
                print("dying before the egress swap", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return real_attach(bpffs, ifname, prog_fd, direction)

        attach.tcx_attach = attach_or_die
    datapath = BpfDatapath(settings)
    datapath.start()
    if die == "after-start":
        print(f"started {datapath.prog_id}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    datapath.apply(desired_for(settings, a, b))
    print(f"applied {datapath.prog_id}", flush=True)
    while True:
        time.sleep(3600)


class Capture:
    """tcpdump on a device in a namespace, outgoing packets only, written to a pcap file."""

    def __init__(self, netns: str, device: str, path: str, bpf_filter: str = "ip"):
        self.path = path
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                netns,
                "tcpdump",
                "-i",
                device,
                "-Q",
                "out",
                "-nn",
                "-U",
                "--immediate-mode",
                "-w",
                path,
                bpf_filter,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        # tcpdump says "listening on" once the capture is armed.
        line = self.proc.stderr.readline()
        if "listening" not in line:
            self.stop()
            raise RuntimeError(f"tcpdump did not start: {line}")

    def stop(self) -> list[str]:
        if self.proc.poll() is None:
            time.sleep(0.3)  # let the last packets reach the file
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stderr.close()
        out = subprocess.run(["tcpdump", "-nn", "-r", self.path], capture_output=True, text=True)
        return out.stdout.splitlines()


if __name__ == "__main__":
    if sys.argv[1:2] == ["hold"]:
        sys.exit(hold_datapath_main(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} hold SPEC_JSON")
