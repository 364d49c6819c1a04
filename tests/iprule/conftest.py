"""Fixtures of the ip-rule tests: a namespace dressed as one node of the shared case cluster.

``node_ns("w1")`` gives a fresh namespace holding the node's InternalIPs on an underlay veth
``eth0``, default routes (so non-cluster destinations have somewhere to go), forwarding on
(as on any Kubernetes node; pod traffic is forwarded), and a stand-in ``cilium_wg0`` (a veth
whose peer is up — only its ifindex and state matter to routing). Real WireGuard is used by
test_wire.py only.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess

import pytest

from nodecryptor_testkit.netns import run

from tests.datapath_cases import WG_IFNAME, snapshot


def sh(ns: str, *cmd: str, check: bool = True) -> str:
    return run(*cmd, netns=ns, check=check).stdout


def ifindex(ns: str, name: str) -> int:
    out = json.loads(sh(ns, "ip", "-j", "link", "show", "dev", name))
    return out[0]["ifindex"]


def ip_rules(ns: str) -> list[str]:
    """`ip rule` output of both families, one line per rule."""
    return [
        line.strip()
        for fam in ("-4", "-6")
        for line in sh(ns, "ip", fam, "rule", "show").splitlines()
        if line.strip()
    ]


def ip_routes(ns: str, table: str) -> list[str]:
    return [
        line.strip()
        for fam in ("-4", "-6")
        for line in sh(ns, "ip", fam, "route", "show", "table", table).splitlines()
        if line.strip()
    ]


def dress_as_node(ns: str, node_name: str) -> int:
    """Give ``ns`` the addresses of ``node_name``; returns the ifindex of cilium_wg0."""
    node = snapshot()[node_name]
    sh(ns, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p")
    sh(ns, "ip", "link", "add", WG_IFNAME, "type", "veth", "peer", "name", "wgpeer")
    for dev in ("eth0", "eth0p", WG_IFNAME, "wgpeer"):
        sh(ns, "ip", "link", "set", dev, "up")
    for kind, addr in node.addresses:
        if kind != "InternalIP":
            continue
        plen = 24 if addr.version == 4 else 64
        sh(ns, "ip", "addr", "add", f"{addr}/{plen}", "dev", "eth0", "nodad")
        gateway = ipaddress.ip_network(f"{addr}/{plen}", strict=False).network_address + 1
        sh(
            ns,
            "ip",
            f"-{addr.version}",
            "route",
            "add",
            "default",
            "via",
            str(gateway),
            "dev",
            "eth0",
            "onlink",
        )
    for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
        sh(ns, "sysctl", "-q", "-w", key)
    return ifindex(ns, WG_IFNAME)


@pytest.fixture
def node_ns(netns):
    """Factory: ``node_ns("w1")`` → (namespace, cilium_wg0 ifindex)."""

    def make(node_name: str) -> tuple[str, int]:
        ns = netns(f"ipr-{node_name}")
        return ns, dress_as_node(ns, node_name)

    return make


@pytest.fixture
def foreign_state():
    """Rules and routes someone else owns, installed before nodecryptor and checked after."""

    def install(ns: str) -> tuple[list[str], list[str]]:
        sh(ns, "ip", "rule", "add", "priority", "100", "fwmark", "0x200", "lookup", "200")
        sh(ns, "ip", "rule", "add", "priority", "10299", "to", "10.99.0.0/16", "lookup", "main")
        sh(ns, "ip", "rule", "add", "priority", "10400", "from", "10.98.0.0/16", "lookup", "201")
        sh(ns, "ip", "-6", "rule", "add", "priority", "10400", "to", "fd99::/64", "lookup", "201")
        sh(ns, "ip", "route", "add", "10.99.0.0/16", "via", "192.168.50.1", "dev", "eth0", "onlink")
        sh(ns, "ip", "route", "add", "10.97.0.0/16", "dev", "eth0", "table", "201")
        sh(ns, "ip", "route", "add", "unreachable", "10.96.0.0/16", "table", "200")
        return ip_rules(ns), snapshot_routes(ns)

    return install


def snapshot_routes(ns: str) -> list[str]:
    """Every route of every table except nodecryptor's (2026, 2027) and the kernel's local table."""
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "ip", "-j", "route", "show", "table", "all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    out6 = subprocess.run(
        ["ip", "netns", "exec", ns, "ip", "-6", "-j", "route", "show", "table", "all"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    routes = json.loads(out) + json.loads(out6)
    return sorted(
        json.dumps(r, sort_keys=True)
        for r in routes
        if r.get("table") not in ("2026", "2027", "local")
    )
