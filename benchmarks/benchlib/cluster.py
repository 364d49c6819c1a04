"""A synthetic dual-stack cluster and the three ways of putting it into a node's kernel that the
benchmarks compare: nodecryptor's BPF datapath, nodecryptor's ip-rule datapath (both the real
backends, fed the desired state the real policy computes), and the original proof of concept's
layout ("seed": one ip rule per remote node address and pod CIDR, built here with ``ip -batch``).

Remote node i has IPv4 172.16.0.0/12 + i + 1, IPv6 fd16::/64 + i + 1, pod CIDRs
10.(i / 256).(i % 256).0/24 and fd10:0:<i>::/64 (unique up to 65,536 nodes). The first three
remote nodes are control-plane nodes. Nothing else uses 198.51.100.0/24 (the non-cluster
destination) or 10.250.0.0/24 (the local node's own pod CIDR).
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
from dataclasses import dataclass

from nodecryptor.core.model import Device, NodeInfo, WgState
from nodecryptor.policy.plan import compute_desired, compute_plan
from nodecryptor.core.settings import MapSizes, Settings

CP_LABEL = "node-role.kubernetes.io/control-plane"
LOCAL_NAME = "bench-local"
LOCAL_V4 = "192.168.50.2"
LOCAL_V6 = "fd50::2"
LOCAL_POD_V4 = "10.250.0.0/24"
NON_CLUSTER_V4 = "198.51.100.7"
WG_IFNAME = "cilium_wg0"
SEED_TABLE = 100
SEED_PRIO_POD = 200
SEED_PRIO_NODE = 220
MAX_NODES = 65_536

_NODE_V4 = int(ipaddress.IPv4Address("172.16.0.0"))
_NODE_V6 = int(ipaddress.IPv6Address("fd16::"))


def node_v4(i: int) -> str:
    return str(ipaddress.IPv4Address(_NODE_V4 + i + 1))


def node_v6(i: int) -> str:
    return str(ipaddress.IPv6Address(_NODE_V6 + i + 1))


def pod_v4(i: int) -> str:
    return f"10.{i // 256}.{i % 256}.0/24"


def pod_v6(i: int) -> str:
    return f"fd10:0:{i:x}::/64"


def check_size(nodes: int) -> None:
    if not 0 <= nodes <= MAX_NODES:
        raise ValueError(f"{nodes} nodes: the synthetic cluster holds 0..{MAX_NODES}")


def prefixes(nodes: int, family: int) -> list[tuple[str, str]]:
    """[(kind, prefix)] of every remote node's address and pod CIDR in one family."""
    check_size(nodes)
    out = []
    for i in range(nodes):
        if family == 4:
            out += [("node", f"{node_v4(i)}/32"), ("pod", pod_v4(i))]
        else:
            out += [("node", f"{node_v6(i)}/128"), ("pod", pod_v6(i))]
    return out


def last_node_v4(nodes: int) -> str:
    """A cluster destination: the last remote node's address (deepest in any linear list)."""
    return node_v4(nodes - 1)


def snapshot(nodes: int) -> dict[str, NodeInfo]:
    """What the Kubernetes sync would hand the policy for this cluster."""
    check_size(nodes)
    out = {
        LOCAL_NAME: NodeInfo(
            LOCAL_NAME,
            addresses=(
                ("InternalIP", ipaddress.ip_address(LOCAL_V4)),
                ("InternalIP", ipaddress.ip_address(LOCAL_V6)),
            ),
            pod_cidrs=(ipaddress.ip_network(LOCAL_POD_V4),),
        )
    }
    for i in range(nodes):
        name = f"node-{i}"
        out[name] = NodeInfo(
            name,
            labels=((CP_LABEL, ""),) if i < 3 else (),
            addresses=(
                ("InternalIP", ipaddress.ip_address(node_v4(i))),
                ("InternalIP", ipaddress.ip_address(node_v6(i))),
            ),
            pod_cidrs=(ipaddress.ip_network(pod_v4(i)), ipaddress.ip_network(pod_v6(i))),
        )
    return out


def settings_for(nodes: int, bpffs: str = "/sys/fs/bpf") -> Settings:
    """Agent settings for the benchmark node. The maps' default capacity (65,536 prefixes per
    family) fits 10,000 nodes with two pod CIDRs each; larger clusters get room to spare."""
    need = 2 * nodes + 1024
    sizes = (
        MapSizes()
        if need <= MapSizes().destinations_v4
        else MapSizes(
            destinations_v4=1 << (need - 1).bit_length(),
            destinations_v6=1 << (need - 1).bit_length(),
        )
    )
    return Settings(node_name=LOCAL_NAME, bpffs=bpffs, wg_interface=WG_IFNAME, map_sizes=sizes)


def desired_state(nodes: int, settings: Settings, wg_ifindex: int, device: Device | None):
    """The DesiredState the agent on the benchmark node would compute. Peers unknown (None):
    coverage is not checked, every destination is redirected (the stand-in device is no
    WireGuard device)."""
    plan = compute_plan(snapshot(nodes), LOCAL_NAME, settings)
    wg = WgState(
        ifname=WG_IFNAME,
        ifindex=wg_ifindex,
        present=True,
        up=True,
        mtu=1420,
        listen_port=51871,
        fwmark=0xE00,
        peers=None,
    )
    return compute_desired(plan, wg, (device,) if device else (), settings)


# ---- the three layouts ---------------------------------------------------------------------


def _ip_batch(ns: str, family: int, lines: list[str]) -> None:
    if lines:
        subprocess.run(
            ["ip", "-n", ns, f"-{family}", "-batch", "-"],
            input="\n".join(lines),
            text=True,
            check=True,
            capture_output=True,
        )


def install_seed(ns: str, nodes: int, wg_ifname: str = WG_IFNAME) -> None:
    """The proof of concept's layout: table 100 holds ``default dev cilium_wg0``; a fwmark rule
    keeps WireGuard's own packets in main; one rule per remote pod CIDR, then one per remote
    node address, looks table 100 up (the seed used priorities 200 and 220; see
    ``rulefill`` for why the numbers differ here and why the walk does not)."""
    from nodecryptor_testkit import netns

    from . import rulefill

    for family in (4, 6):
        _ip_batch(
            ns,
            family,
            [
                f"route add default dev {wg_ifname} table {SEED_TABLE}",
                "rule add fwmark 0xe00 lookup main priority 0",
            ],
        )
        walk = [p for kind, p in prefixes(nodes, family) if kind == "pod"] + [
            p for kind, p in prefixes(nodes, family) if kind == "node"
        ]
        netns.call_in(ns, rulefill.add_rules, walk, SEED_TABLE)


def install_seed_prefixes(ns: str, prefix_list: list[str], wg_ifname: str = WG_IFNAME) -> None:
    """The seed layout for an explicit IPv4 prefix list (``iprule_scale.py``)."""
    lines = [
        f"route add default dev {wg_ifname} table {SEED_TABLE}",
        "rule add fwmark 0xe00 lookup main priority 0",
    ]
    lines += [f"rule add to {p} lookup {SEED_TABLE} priority {SEED_PRIO_NODE}" for p in prefix_list]
    _ip_batch(ns, 4, lines)


def install_iprule(ns: str, desired, settings: Settings):
    """nodecryptor's ip-rule datapath, the real backend, applied in ``ns``."""
    from nodecryptor.datapath.iprule.backend import IpRuleDatapath

    datapath = IpRuleDatapath(settings, netns=ns).start()
    try:
        datapath.apply(desired)
    finally:
        datapath.close()
    return datapath


@dataclass
class BpfInstall:
    """nodecryptor's BPF datapath, the real backend, attached in a namespace."""

    ns: str
    settings: Settings
    datapath: object

    def remove(self) -> None:
        from nodecryptor_testkit import netns

        netns.call_in(self.ns, self.datapath.cleanup)


def install_bpf(ns: str, nodes: int, settings: Settings, device: str = "eth0") -> BpfInstall:
    """Start the BPF backend inside ``ns`` (compile, load, pin under ``settings.bpffs``) and
    apply the desired state with ``device`` as the underlay: a tcx link at the head of its
    egress chain."""
    from nodecryptor.datapath.bpf.backend import BpfDatapath
    from nodecryptor_testkit import netns

    def start_and_apply():
        dev = Device(name=device, ifindex=socket.if_nametoindex(device), mtu=1500)
        desired = desired_state(nodes, settings, socket.if_nametoindex(WG_IFNAME), dev)
        datapath = BpfDatapath(settings, attach_mode="tcx").start()
        datapath.apply(desired)
        obs = datapath.observe()
        if not obs.ready:
            datapath.cleanup()
            raise RuntimeError(f"bpf datapath not ready in {ns}: {obs.reason}")
        return datapath

    return BpfInstall(ns, settings, netns.call_in(ns, start_and_apply))
