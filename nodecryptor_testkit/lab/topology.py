"""Build the lab's network: an underlay bridge, node namespaces, pods, addresses and routes.

Every function takes the namespaces explicitly and records what it creates in the LabState
before relying on it, so a failure half-way leaves nothing behind that ``state.reap`` does not
know about. Each node also gets a *holder* process: a ``sleep`` inside the node's network
namespace and a private mount namespace with its own tmpfs on /var/run/wireguard (wireguard-go
keeps its UAPI socket there, and two nodes' ``cilium_wg0.sock`` would otherwise collide). Each
node also has a bpffs instance of its own. Every long-lived process of the node is started
inside the holder's namespaces.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from .. import netns as netns_mod
from .spec import UNDERLAY_MTU, UNDERLAY_V4, UNDERLAY_V6, LabSpec, NodeSpec
from .state import LabState


class LabError(RuntimeError):
    """Building or driving the lab failed; the message names the step and the object."""


@dataclass
class NodeHandle:
    spec: NodeSpec
    netns: str
    pod_netns: str
    holder: subprocess.Popen
    bpffs: str
    workdir: str

    @property
    def holder_pid(self) -> int:
        return self.holder.pid

    def enter(self) -> list[str]:
        """argv prefix that runs a command inside this node (network + private mounts)."""
        return ["nsenter", "-t", str(self.holder_pid), "-m", "-n", "--"]


def sh(
    *cmd: str, netns: str | None = None, check: bool = True, timeout: float = 30.0
) -> subprocess.CompletedProcess:
    try:
        return netns_mod.run(*cmd, netns=netns, check=check, timeout=timeout)
    except subprocess.CalledProcessError as e:
        where = f" in {netns}" if netns else ""
        raise LabError(f"{' '.join(cmd)}{where} failed: {(e.stderr or '').strip()}") from None


def make_netns(state: LabState, tag: str) -> str:
    name = netns_mod.create(tag)
    state.add_netns(name)
    return name


def _sysctls(ns: str, forwarding: bool) -> None:
    # Decrypted packets arrive on cilium_wg0, which has no address: strict or loose reverse-path
    # filtering would drop them, so Cilium needs rp_filter 0 on "all"; mirror that.
    settings = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
    if forwarding:
        settings += ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
    sh("sysctl", "-q", "-w", *settings, netns=ns)


def build_underlay(state: LabState) -> str:
    """The shared L2 segment: a bridge ``br0`` in a namespace of its own."""
    ns = make_netns(state, "ul")
    sh("ip", "link", "add", "br0", "type", "bridge", netns=ns)
    # No IPv6 on the bridge itself: it must not answer or originate anything.
    sh("sysctl", "-q", "-w", "net.ipv6.conf.br0.disable_ipv6=1", netns=ns)
    sh("ip", "link", "set", "br0", "up", netns=ns)
    return ns


def plug(underlay: str, ns: str, port: str, v4: str, v6: str) -> None:
    """A veth from the bridge (``port``) to ``eth0`` in ``ns`` with the given addresses."""
    sh(
        "ip",
        "link",
        "add",
        port,
        "mtu",
        str(UNDERLAY_MTU),
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns,
        netns=underlay,
    )
    sh("ip", "link", "set", port, "master", "br0", "up", netns=underlay)
    sh("ip", "link", "set", "eth0", "mtu", str(UNDERLAY_MTU), "up", netns=ns)
    sh("ip", "addr", "add", f"{v4}/{UNDERLAY_V4.prefixlen}", "dev", "eth0", netns=ns)
    # nodad: the address is usable at once instead of after duplicate-address detection.
    sh("ip", "addr", "add", f"{v6}/{UNDERLAY_V6.prefixlen}", "dev", "eth0", "nodad", netns=ns)


def build_pod(state: LabState, node: NodeSpec, node_ns: str) -> str:
    pod = make_netns(state, f"{node.name}pod")
    sh(
        "ip",
        "link",
        "add",
        "pod0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod,
        netns=node_ns,
    )
    sh(
        "ip",
        "addr",
        "add",
        f"{node.pod_gateway_v4}/{node.pod_cidr_v4.prefixlen}",
        "dev",
        "pod0",
        netns=node_ns,
    )
    sh(
        "ip",
        "addr",
        "add",
        f"{node.pod_gateway_v6}/{node.pod_cidr_v6.prefixlen}",
        "dev",
        "pod0",
        "nodad",
        netns=node_ns,
    )
    sh("ip", "link", "set", "pod0", "up", netns=node_ns)
    sh("ip", "link", "set", "eth0", "up", netns=pod)
    sh(
        "ip",
        "addr",
        "add",
        f"{node.pod_ipv4}/{node.pod_cidr_v4.prefixlen}",
        "dev",
        "eth0",
        netns=pod,
    )
    sh(
        "ip",
        "addr",
        "add",
        f"{node.pod_ipv6}/{node.pod_cidr_v6.prefixlen}",
        "dev",
        "eth0",
        "nodad",
        netns=pod,
    )
    sh("ip", "route", "add", "default", "via", str(node.pod_gateway_v4), netns=pod)
    sh("ip", "-6", "route", "add", "default", "via", str(node.pod_gateway_v6), netns=pod)
    return pod


def mount_bpffs(state: LabState, path: str) -> None:
    """A bpffs instance of the node's own. It is mounted where the host sees it too, so the lab
    can read the node's pinned maps directly (the holder's mount namespace, created after, has
    it as well); the state lists it so a crashed run's mount is removed."""
    os.makedirs(path, exist_ok=True)
    state.add_directory(path)
    sh("mount", "-t", "bpf", "bpf", path)


def start_holder(state: LabState, node_ns: str) -> subprocess.Popen:
    """Start the node's holder (see module docstring); returns its PID once mounts are done."""
    script = (
        "set -e; mkdir -p /var/run/wireguard; mount -t tmpfs lab-wg /var/run/wireguard; "
        "echo ready; exec sleep infinity"
    )
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            node_ns,
            "unshare",
            "-m",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    state.add_process(proc.pid, f"holder {node_ns}")
    line = proc.stdout.readline().strip()
    if line != "ready":
        err = proc.stderr.read() if proc.poll() is not None else ""
        raise LabError(f"holder of {node_ns} did not start: {line or err.strip()}")
    proc.stdout.close()
    proc.stderr.close()
    return proc


def build_node(state: LabState, underlay: str, node: NodeSpec, workdir: str) -> NodeHandle:
    ns = make_netns(state, node.name)
    _sysctls(ns, forwarding=True)
    plug(underlay, ns, f"n-{node.name}"[:15], str(node.ipv4), str(node.ipv6))
    pod = build_pod(state, node, ns)
    node_dir = os.path.join(workdir, node.name)
    bpffs = os.path.join(node_dir, "bpffs")
    mount_bpffs(state, bpffs)
    holder = start_holder(state, ns)
    return NodeHandle(
        spec=node, netns=ns, pod_netns=pod, holder=holder, bpffs=bpffs, workdir=node_dir
    )


def route_pods(node: NodeHandle, spec: LabSpec) -> None:
    """Native routing: each remote pod CIDR via that node's address on the underlay."""
    for other in spec.nodes:
        if other.name == node.spec.name:
            continue
        sh(
            "ip",
            "route",
            "replace",
            str(other.pod_cidr_v4),
            "via",
            str(other.ipv4),
            "dev",
            "eth0",
            netns=node.netns,
        )
        sh(
            "ip",
            "-6",
            "route",
            "replace",
            str(other.pod_cidr_v6),
            "via",
            str(other.ipv6),
            "dev",
            "eth0",
            netns=node.netns,
        )


def unroute_pods(node: NodeHandle, other: NodeSpec) -> None:
    sh("ip", "route", "del", str(other.pod_cidr_v4), netns=node.netns, check=False)
    sh("ip", "-6", "route", "del", str(other.pod_cidr_v6), netns=node.netns, check=False)


def build_external(state: LabState, underlay: str, spec: LabSpec) -> str:
    """A host on the underlay that is not a cluster node: its traffic must stay untouched."""
    ns = make_netns(state, "ext")
    plug(underlay, ns, "n-ext", str(spec.external_v4), str(spec.external_v6))
    return ns


def call_in_netns(netns: str, fn, *args, **kwargs):
    """Run ``fn`` on a fresh thread inside network namespace ``netns`` (sockets it opens live
    there); the caller's thread stays where it is."""
    return netns_mod.call_in(netns, fn, *args, **kwargs)
