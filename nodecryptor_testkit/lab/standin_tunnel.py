"""Tunnel mode of the lab's Cilium stand-in: a VXLAN device ``cilium_vxlan`` in the node that
carries pod traffic to the other nodes' underlay IPv4 addresses, as Cilium's tunnel mode does.

No learning and no flooding: every remote node's VXLAN MAC is derived from its IPv4 address
(02:00:a.b.c.d), with a permanent neighbour entry for its pod gateway and an FDB entry towards
its node address, so a route ``<remote pod CIDR> via <its pod gateway> dev cilium_vxlan onlink``
needs no ARP across the tunnel. The device has no ``dev eth0`` binding: its UDP is routed like
any node traffic, so nodecryptor's datapath (BPF on eth0, or its ip rules) encrypts it.

As in Cilium's tunnel mode, pods reach remote node addresses through the tunnel too (a rule
``from <local pod CIDR> lookup TABLE`` ahead of nodecryptor's band; the table holds the remote
node addresses via the tunnel), and routes into the tunnel carry the node's own address as
source. So nothing with a pod source address travels between nodes outside the tunnel, where
WireGuard (whose allowed-IPs hold node addresses only) would drop it.
"""

from __future__ import annotations

import ipaddress
import subprocess

from .spec import VXLAN_PORT

IFNAME = "cilium_vxlan"
VNI = 2
VXLAN_OVERHEAD = 50
TABLE = 2005
RULE_PRIORITY = 100


def _ip(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def mac_of(ipv4) -> str:
    return "02:00:" + ":".join(f"{b:02x}" for b in ipaddress.ip_address(ipv4).packed)


def ensure_device(own_ipv4, mtu: int) -> None:
    if subprocess.run(["ip", "link", "show", IFNAME], capture_output=True).returncode != 0:
        _ip(
            "link",
            "add",
            IFNAME,
            "type",
            "vxlan",
            "id",
            str(VNI),
            "dstport",
            str(VXLAN_PORT),
            "local",
            str(own_ipv4),
            "nolearning",
        )
        subprocess.run(
            ["sysctl", "-q", "-w", f"net.ipv4.conf.{IFNAME}.rp_filter=0"], capture_output=True
        )
    _ip("link", "set", IFNAME, "address", mac_of(own_ipv4), "mtu", str(mtu), "up")


def _gateway(cidr):
    return cidr.network_address + 1


def sync(own_ips, own_pods, remotes: list[tuple]) -> None:
    """``own_ips``/``own_pods``: this node's addresses and pod CIDRs; ``remotes``: (IPv4,
    addresses, pod CIDRs) of every other node. Idempotent ("replace")."""
    fdb = subprocess.run(
        ["bridge", "fdb", "show", "dev", IFNAME], capture_output=True, text=True
    ).stdout
    src = {a.version: str(a) for a in reversed(list(own_ips))}
    for ipv4, addrs, pod_cidrs in remotes:
        mac = mac_of(ipv4)
        if f"{mac} dst {ipv4}" not in fdb:
            subprocess.run(
                ["bridge", "fdb", "append", mac, "dev", IFNAME, "dst", str(ipv4)],
                capture_output=True,
            )
        gateways = {}
        for cidr in pod_cidrs:
            fam = "-4" if cidr.version == 4 else "-6"
            gw = gateways[cidr.version] = str(_gateway(cidr))
            _ip(fam, "neigh", "replace", gw, "lladdr", mac, "dev", IFNAME, "nud", "permanent")
            _ip(
                fam,
                "route",
                "replace",
                str(cidr),
                "via",
                gw,
                "dev",
                IFNAME,
                "onlink",
                *(("src", src[cidr.version]) if cidr.version in src else ()),
            )
        for addr in addrs:
            if addr.version in gateways:
                fam = "-4" if addr.version == 4 else "-6"
                _ip(
                    fam,
                    "route",
                    "replace",
                    str(addr),
                    "via",
                    gateways[addr.version],
                    "dev",
                    IFNAME,
                    "onlink",
                    "table",
                    str(TABLE),
                )
    rules = _ip("rule", "show", "pref", str(RULE_PRIORITY)) + _ip(
        "-6", "rule", "show", "pref", str(RULE_PRIORITY)
    )
    for cidr in own_pods:
        if f"from {cidr} lookup {TABLE}" not in rules:
            _ip(
                "-4" if cidr.version == 4 else "-6",
                "rule",
                "add",
                "pref",
                str(RULE_PRIORITY),
                "from",
                str(cidr),
                "lookup",
                str(TABLE),
            )


def delete() -> None:
    subprocess.run(["ip", "link", "del", IFNAME], capture_output=True)
    for fam in ("-4", "-6"):
        while (
            subprocess.run(
                ["ip", fam, "rule", "del", "pref", str(RULE_PRIORITY)], capture_output=True
            ).returncode
            == 0
        ):
            pass
        subprocess.run(["ip", fam, "route", "flush", "table", str(TABLE)], capture_output=True)
