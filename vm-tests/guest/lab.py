"""The guest's two-node lab: node A and node B joined by a veth underlay, kernel WireGuard
``cilium_wg0`` on both (as Cilium configures it), and a pod namespace behind B.

    [A] eth0 192.168.50.1 ──veth── eth0 192.168.50.2 [B] lxc0 10.0.2.1 ──veth── eth0 10.0.2.10 [pod]
     cilium_wg0 ═════════ WireGuard UDP 51871, fwmark 0xe00 ═════════ cilium_wg0

A has native-routing style routes to B's pod CIDR through the underlay (what Cilium's
auto-direct-node-routes installs), so without nodecryptor A's traffic to B and to the pod leaves
in the clear; A is where nodecryptor is applied. B has no nodecryptor: a few hand-written ip rules
send its replies to A back through WireGuard (exempt port 6443 replies excepted), so a capture
on A's underlay sees nothing of an encrypted flow but WireGuard's UDP. B's route to A keeps the
underlay MTU like a BPF-mode node's would; the pod's route has Cilium's reduced MTU.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field

from nodecryptor_testkit import netns

WG_PORT = 51871
WG_FWMARK = 0xE00
WG_IFNAME = "cilium_wg0"
UNDERLAY_MTU = 1500
WG_MTU = UNDERLAY_MTU - 80  # what Cilium sets up to 1.19.4
A_IP, B_IP = "192.168.50.1", "192.168.50.2"
A_POD_CIDR, B_POD_CIDR = "10.0.1.0/24", "10.0.2.0/24"
B_GATEWAY, POD_IP = "10.0.2.1", "10.0.2.10"
B_RETURN_TABLE = 100
CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"


@dataclass
class Lab:
    a: str = ""
    b: str = ""
    pod: str = ""
    keys: dict = field(default_factory=dict)
    namespaces: list = field(default_factory=list)

    def nodes(self, b_control_plane: bool = True) -> list[dict]:
        """The two CiliumNodes as the policy sees them (B is a kubeadm control-plane node)."""
        b_labels = {CONTROL_PLANE_LABEL: ""} if b_control_plane else {}
        return [
            {
                "name": "node-a",
                "addresses": [A_IP],
                "pod_cidrs": [A_POD_CIDR],
                "wg_public_key": self.keys["a"][1],
            },
            {
                "name": "node-b",
                "addresses": [B_IP],
                "pod_cidrs": [B_POD_CIDR],
                "labels": b_labels,
                "wg_public_key": self.keys["b"][1],
            },
        ]


def ip_batch(ns: str | None, *lines: str) -> None:
    """Several ip commands in one process: under TCG each process start costs ~0.3 s."""
    argv = ["ip"] + (["-n", ns] if ns else []) + ["-batch", "-"]
    done = subprocess.run(
        argv, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60
    )
    if done.returncode != 0:
        raise RuntimeError(f"ip -n {ns} -batch failed: {done.stderr.strip()}")


def in_netns_shell(ns: str, script: str, env: dict | None = None) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", ns, "sh", "-ec", script],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"in {ns}: {script!r} failed: {done.stderr.strip()}")


def _keypair() -> tuple[str, str]:
    private = subprocess.run(
        ["wg", "genkey"], capture_output=True, text=True, check=True
    ).stdout.strip()
    public = subprocess.run(
        ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
    ).stdout.strip()
    return private, public


def _wireguard_and_sysctls(
    ns: str,
    private: str,
    peer_public: str,
    endpoint: str,
    allowed: list[str],
    extra_sysctls: tuple[str, ...] = (),
) -> None:
    # wg reads the private key from a file; a private temp file keeps it off the command line.
    with tempfile.NamedTemporaryFile("w", prefix="nc-vm-key-", delete=False) as f:
        f.write(private)
    # Decrypted packets arrive on an address-less device: any rp_filter drops them.
    sysctls = [f"net.ipv4.conf.{c}.rp_filter=0" for c in ("all", "default", WG_IFNAME)]
    try:
        in_netns_shell(
            ns,
            "\n".join(
                [
                    f"wg set {WG_IFNAME} listen-port {WG_PORT} fwmark {WG_FWMARK:#x}"
                    f" private-key {f.name} peer {peer_public} endpoint {endpoint}:{WG_PORT}"
                    f" allowed-ips {','.join(allowed)}",
                    "sysctl -qw " + " ".join(sysctls + list(extra_sysctls)),
                ]
            ),
        )
    finally:
        os.unlink(f.name)


def build() -> Lab:
    lab = Lab()
    try:
        _build(lab)
    except BaseException:
        destroy(lab)
        raise
    return lab


def _build(lab: Lab) -> None:
    for tag in ("a", "b", "pod"):
        name = netns.create(tag)
        lab.namespaces.append(name)
        setattr(lab, tag, name)
    a, b, pod = lab.a, lab.b, lab.pod
    mtu = str(UNDERLAY_MTU)
    ip_batch(
        None,
        f"link add eth0 netns {a} mtu {mtu} type veth peer name eth0 netns {b} mtu {mtu}",
        f"link add lxc0 netns {b} type veth peer name eth0 netns {pod}",
    )
    ip_batch(
        a,
        f"addr add {A_IP}/24 dev eth0",
        "link set eth0 up",
        f"link add {WG_IFNAME} type wireguard",
    )
    ip_batch(
        b,
        f"addr add {B_IP}/24 dev eth0",
        "link set eth0 up",
        f"addr add {B_GATEWAY}/24 dev lxc0",
        "link set lxc0 up",
        f"link add {WG_IFNAME} type wireguard",
    )
    # Cilium gives pod routes the WireGuard-reduced MTU, so pods advertise MSS 1380.
    ip_batch(
        pod,
        f"addr add {POD_IP}/24 dev eth0",
        "link set eth0 up",
        f"route add default via {B_GATEWAY} mtu {WG_MTU}",
    )

    lab.keys = {"a": _keypair(), "b": _keypair()}
    _wireguard_and_sysctls(a, lab.keys["a"][0], lab.keys["b"][1], B_IP, [f"{B_IP}/32", B_POD_CIDR])
    _wireguard_and_sysctls(
        b,
        lab.keys["b"][0],
        lab.keys["a"][1],
        A_IP,
        [f"{A_IP}/32", A_POD_CIDR],
        extra_sysctls=("net.ipv4.ip_forward=1",),
    )

    # Native routing: A reaches B's pods through the underlay, in the clear unless encrypted.
    ip_batch(
        a, f"link set {WG_IFNAME} mtu {WG_MTU} up", f"route add {B_POD_CIDR} via {B_IP} dev eth0"
    )
    # B's way back to A through WireGuard; WireGuard's own (marked) output and the exempt
    # apiserver replies keep using the main table. The route keeps the underlay's MTU: B
    # behaves like a node whose traffic is redirected at its underlay (BPF mode), which sizes
    # TCP segments and advertises its MSS from the underlay route (1460).
    ip_batch(
        b,
        f"link set {WG_IFNAME} mtu {WG_MTU} up",
        f"route add default dev {WG_IFNAME} table {B_RETURN_TABLE} mtu {UNDERLAY_MTU}",
        f"rule add prio 10 fwmark {WG_FWMARK:#x}/0xf00 lookup main",
        "rule add prio 20 ipproto tcp sport 6443 lookup main",
        f"rule add prio 30 to {A_IP} lookup {B_RETURN_TABLE}",
    )


def destroy(lab: Lab) -> None:
    """Delete the namespaces (and so every link, WireGuard device and process inside)."""
    for name in reversed(lab.namespaces):
        netns.delete(name)
    lab.namespaces.clear()
