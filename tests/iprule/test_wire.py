"""On the wire: two nodes with real (userspace) WireGuard and the ip-rule datapath on both.

Node A is the shared table's worker w1, node B its control-plane node cp1 (with a pod stand-in
address from its pod CIDR on lo). tcpdump on A's underlay must show node and pod traffic only
as UDP to the WireGuard port, the bootstrap exemption (TCP 6443 to B, B's replies from its node
address) in the clear, and UDP to 6443 encrypted; the traffic must actually arrive.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import time

import pytest

from nodecryptor.datapath.iprule import inspect
from nodecryptor.datapath.iprule.backend import IpRuleDatapath
from nodecryptor.core.model import WgPeer, WgState
from nodecryptor.policy.plan import compute_desired, compute_plan
from nodecryptor.core.settings import Settings
from tests.datapath_cases import WG_IFNAME, WG_PORT, snapshot

from .conftest import ifindex, sh

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]

NODES = {
    "w1": {
        "v4": "192.168.50.21",
        "v6": "fd00:50::21",
        "pod": None,
        "allowed": "192.168.50.21/32,fd00:50::21/128,10.244.1.0/24,fd00:244:1::/64",
    },
    "cp1": {
        "v4": "192.168.50.10",
        "v6": "fd00:50::10",
        "pod": "10.244.0.5",
        "allowed": "192.168.50.10/32,fd00:50::10/128,10.244.0.0/24,fd00:244::/64",
    },
}
# Runs inside "ip netns exec", which already gives a private mount namespace: a tmpfs on
# /var/run/wireguard there keeps each wireguard-go's UAPI socket apart from the other node's
# (and from anybody else's cilium_wg0).
WG_SCRIPT = """
set -e
mkdir -p /var/run/wireguard
mount -t tmpfs nct-wg /var/run/wireguard
wireguard-go -f {ifname} >/dev/null 2>&1 &
for i in $(seq 100); do [ -S /var/run/wireguard/{ifname}.sock ] && break; sleep 0.05; done
wg set {ifname} listen-port {port} fwmark 0xe00 private-key {key} \\
   peer {peer_pub} endpoint {peer_ip}:{port} allowed-ips {allowed}
ip link set {ifname} up
echo ready
wait
"""


def keypair(tmp_path, name: str) -> tuple[str, str]:
    private = subprocess.run(
        ["wg", "genkey"], capture_output=True, text=True, check=True
    ).stdout.strip()
    public = subprocess.run(
        ["wg", "pubkey"], input=private, capture_output=True, text=True, check=True
    ).stdout.strip()
    path = tmp_path / f"{name}.key"
    path.write_text(private + "\n")
    os.chmod(path, 0o600)
    return str(path), public


@pytest.fixture
def two_nodes(netns, wireguard_go, tmp_path):
    """{name: (namespace, cilium_wg0 ifindex)} with WireGuard up between the two."""
    spaces = {name: netns(f"wire-{name}") for name in NODES}
    subprocess.run(
        [
            "ip",
            "link",
            "add",
            "ulA",
            "netns",
            spaces["w1"],
            "type",
            "veth",
            "peer",
            "name",
            "ulB",
            "netns",
            spaces["cp1"],
        ],
        check=True,
    )
    keys = {name: keypair(tmp_path, name) for name in NODES}
    procs = []
    try:
        for name, dev in (("w1", "ulA"), ("cp1", "ulB")):
            ns, node = spaces[name], NODES[name]
            sh(ns, "ip", "link", "set", dev, "up")
            sh(ns, "ip", "addr", "add", f"{node['v4']}/24", "dev", dev)
            sh(ns, "ip", "addr", "add", f"{node['v6']}/64", "dev", dev, "nodad")
            if node["pod"]:
                sh(ns, "ip", "addr", "add", f"{node['pod']}/32", "dev", "lo")
            for key in (
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
                "net.ipv4.ip_forward=1",
            ):
                sh(ns, "sysctl", "-q", "-w", key)
        for name in NODES:
            peer = "cp1" if name == "w1" else "w1"
            script = WG_SCRIPT.format(
                ifname=WG_IFNAME,
                port=WG_PORT,
                key=keys[name][0],
                peer_pub=keys[peer][1],
                peer_ip=NODES[peer]["v4"],
                allowed=NODES[peer]["allowed"],
            )
            proc = subprocess.Popen(
                ["ip", "netns", "exec", spaces[name], "sh", "-c", script],
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            procs.append(proc)
            assert proc.stdout.readline().strip() == "ready"
            sh(spaces[name], "sysctl", "-q", "-w", f"net.ipv4.conf.{WG_IFNAME}.rp_filter=0")
        yield {name: (ns, ifindex(ns, WG_IFNAME)) for name, ns in spaces.items()}
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)


def apply_node(name: str, ns: str, wg_index: int) -> IpRuleDatapath:
    settings = Settings(node_name=name)
    peer = "cp1" if name == "w1" else "w1"
    allowed = tuple(ipaddress.ip_network(p) for p in NODES[peer]["allowed"].split(","))
    wg = WgState(
        ifname=WG_IFNAME,
        ifindex=wg_index,
        present=True,
        up=True,
        mtu=1420,
        listen_port=WG_PORT,
        fwmark=0xE00,
        peers=(
            WgPeer(public_key="k", allowed_ips=allowed, endpoint=f"{NODES[peer]['v4']}:{WG_PORT}"),
        ),
    )
    plan = compute_plan(snapshot(), name, settings)
    datapath = IpRuleDatapath(settings, netns=ns).start()
    datapath.apply(compute_desired(plan, wg, (), settings))
    return datapath


def start_capture(ns: str, dev: str, path: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            ns,
            "tcpdump",
            "-i",
            dev,
            "-nn",
            "-U",
            "--immediate-mode",
            "-w",
            path,
            "ip or ip6",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if "listening on" in proc.stderr.readline():
            return proc
    proc.kill()
    raise AssertionError("tcpdump did not start")


def read_capture(path: str) -> list[str]:
    out = subprocess.run(
        ["tcpdump", "-nn", "-r", path], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


def test_cluster_traffic_is_encrypted_and_bootstrap_is_not(two_nodes, tmp_path):
    (ns_a, wg_a), (ns_b, wg_b) = two_nodes["w1"], two_nodes["cp1"]
    datapaths = [apply_node("w1", ns_a, wg_a), apply_node("cp1", ns_b, wg_b)]
    server = subprocess.Popen(
        ["ip", "netns", "exec", ns_b, "nc", "-l", "-k", "-p", "6443"],
        stdout=subprocess.PIPE,
        text=True,
    )
    pcap = str(tmp_path / "ulA.pcap")
    capture = start_capture(ns_a, "ulA", pcap)
    try:
        for args in (
            ["ping", "-c", "2", "-W", "2", "192.168.50.10"],
            ["ping", "-c", "2", "-W", "2", "10.244.0.5"],
            ["ping", "-6", "-c", "2", "-W", "2", "fd00:50::10"],
        ):
            result = run_in(ns_a, *args)
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        run_in(ns_a, "sh", "-c", "echo bootstrap | nc -N -w 3 192.168.50.10 6443")
        assert server.stdout.readline().strip() == "bootstrap"
        run_in(ns_a, "sh", "-c", "echo secret | nc -u -w 1 192.168.50.10 6443")
        run_in(ns_a, "sh", "-c", "echo secret | nc -w 1 192.168.50.10 2381")
        time.sleep(0.5)
    finally:
        capture.send_signal(signal.SIGINT)
        capture.wait(timeout=10)
        server.kill()
        server.wait()
        for datapath in datapaths:
            datapath.close()
    lines = read_capture(pcap)
    wireguard = [line for line in lines if f".{WG_PORT} > " in line and f".{WG_PORT}: UDP" in line]
    exempt = [
        line for line in lines if " Flags " in line and (".6443 >" in line or ".6443:" in line)
    ]
    # Everything else between cluster addresses would be a leak (link-local ND/MLD is not).
    leaked = [
        line
        for line in lines
        if line not in wireguard
        and line not in exempt
        and any(a in line for a in ("192.168.50.", "10.244.", "fd00:"))
    ]
    assert len(wireguard) >= 12  # 3 × 2 pings and their replies, handshake, UDP, TCP 2381
    # Both directions of the bootstrap connection in the clear: A's SYN, B's SYN-ACK.
    assert any("192.168.50.21." in line.split(">")[0] and "Flags [S]" in line for line in exempt)
    assert any("192.168.50.10.6443 >" in line and "Flags [S.]" in line for line in exempt)
    assert leaked == []
    # The non-exempt attempts really left: UDP 6443 and TCP 2381 only as WireGuard.
    assert not any(".2381" in line or ".6443: UDP" in line for line in lines)
    # Cleanup leaves both namespaces without nodecryptor state.
    for name, ns in (("w1", ns_a), ("cp1", ns_b)):
        inspect.cleanup(Settings(node_name=name), netns=ns)
        assert not inspect.active(Settings(node_name=name), netns=ns)


def run_in(ns: str, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=20
    )
