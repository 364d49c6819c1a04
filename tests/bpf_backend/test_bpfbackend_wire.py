"""The BPF datapath on the wire: two nodes in network namespaces joined by a veth underlay, a
real WireGuard device (wireguard-go) on each, nodecryptor's datapath applied on node A with the
desired state the policy computes. tcpdump on A's underlay is the judge of what leaves in the
clear; sockets on B prove the encrypted traffic arrives decrypted.

Node B is a control-plane node, so TCP 6443 to it is exempt (clear) while everything else to
its node address and pod CIDR must leave as WireGuard UDP.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import pytest
from bpf_backend_lab import (
    WG_PORT,
    Capture,
    TwoNodeLab,
    in_netns,
    load_ret_prog,
    nodecryptor_cli,
    sh,
)
from bpf_backend_lab import prog_id as prog_id_of
from conftest import require

from nodecryptor.datapath.base import PacketQuery
from nodecryptor.datapath.bpf import abi, attach, collector, inspect, pins, syscall
from nodecryptor.datapath.bpf.backend import BpfDatapath
from nodecryptor.observe.metrics import Metrics

pytestmark = [pytest.mark.privileged, pytest.mark.bpf]

# Cilium stand-in for the tail of the tcx chain: counts what it sees by (daddr, proto, dport)
# and returns TC_ACT_OK, as cil_to_netdev does.
STANDIN_C = rb"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
struct seen_key { u32 daddr; u16 dport; u8 proto; u8 pad; };
BPF_HASH(seen, struct seen_key, u64, 1024);
int standin(struct __sk_buff *skb) {
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end || eth->h_proto != 0x0008) /* ETH_P_IP, network order */
        return 0;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end)
        return 0;
    struct seen_key k = {};
    k.daddr = ip->daddr;
    k.proto = ip->protocol;
    if (ip->ihl == 5 && (ip->protocol == 6 || ip->protocol == 17)) {
        __u16 *ports = (void *)(ip + 1);
        if ((void *)(ports + 2) > end)
            return 0;
        k.dport = (ports[1] >> 8) | ((ports[1] & 0xff) << 8);
    }
    u64 zero = 0, *v = seen.lookup_or_try_init(&k, &zero);
    if (v)
        __sync_fetch_and_add(v, 1);
    return 0;
}
"""


@pytest.fixture
def lab(netns, bpffs, bcc_available, wireguard_go):
    # Depends on bpffs so the private bpffs is mounted before wireguard-go's mount namespace
    # is copied: commands run in that namespace (to reach the UAPI socket) then see it too.
    ok, why = syscall.tcx_supported()
    require(ok, f"kernel without tcx: {why}")
    lab = TwoNodeLab(netns)
    yield lab
    lab.close()


@pytest.fixture
def datapaths():
    """Close every datapath a test started (pins stay in the private bpffs, unmounted after)."""
    started = []

    def make(settings, **kw):
        dp = BpfDatapath(settings, **kw)
        started.append(dp)
        return dp

    yield make
    for dp in started:
        dp.close()


class Receiver:
    """UDP or TCP sockets on node B counting what arrives."""

    def __init__(self, netns: str, udp_ports=(), tcp_ports=()):
        self.udp = {}
        self.tcp = {}
        with in_netns(netns):
            for port in udp_ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.bind(("0.0.0.0", port))
                s.settimeout(0.05)
                self.udp[port] = s
            for port in tcp_ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("0.0.0.0", port))
                s.listen(16)
                self.tcp[port] = s

    def drain(self, port: int, wait: float = 2.0, want: int = 1) -> list[bytes]:
        got, deadline = [], time.time() + wait
        while time.time() < deadline and len(got) < want:
            try:
                got.append(self.udp[port].recv(2048))
            except socket.timeout:
                pass
        return got

    def close(self):
        for s in (*self.udp.values(), *self.tcp.values()):
            s.close()


def udp_socket(netns: str) -> socket.socket:
    with in_netns(netns):
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def tcp_exchange(netns: str, dst: str, port: int, payload: bytes) -> None:
    with in_netns(netns):
        s = socket.create_connection((dst, port), timeout=3)
    with s:
        s.sendall(payload)


def start_standin(netns: str):
    """Attach the counting stand-in at the TAIL of A's eth0 tcx chain; returns (bpf, link)."""
    from bcc import BPF

    bpf = BPF(text=STANDIN_C)
    fn = bpf.load_func(b"standin", BPF.SCHED_CLS)
    with in_netns(netns):
        link = syscall.tcx_link_create(fn.fd, attach.ifindex_of("eth0"), flags=syscall.BPF_F_AFTER)
    return bpf, link


def standin_seen(bpf) -> dict[tuple[str, int, int], int]:
    out = {}
    for k, v in bpf[b"seen"].items():
        out[(socket.inet_ntoa(k.daddr.to_bytes(4, "little")), k.proto, k.dport)] = v.value
    return out


def test_node_and_pod_traffic_leaves_encrypted_exempt_in_clear_cilium_never_sees_redirects(
    lab, bpffs, datapaths, tmp_path
):
    a, b = lab.a, lab.b
    settings = lab.settings(bpffs)
    rx = Receiver(b.netns, udp_ports=(7777, 7778), tcp_ports=(6443, 7779))
    standin, standin_link = start_standin(a.netns)
    try:
        metrics = Metrics()
        with in_netns(a.netns):
            dp = datapaths(settings, metrics=metrics)
            dp.start()
            dp.apply(lab.desired(settings))
            obs = dp.observe()
            dp.apply(lab.desired(settings))  # idempotent: same link, same program
            again = dp.observe()
        assert obs.ready, obs.reason
        assert obs.details["mode"] == "tcx"
        [dev] = obs.details["devices"]
        assert (dev["name"], dev["mode"], dev["position"]) == ("eth0", "tcx", 0)
        assert again.ready and again.details["devices"] == obs.details["devices"]

        cap = Capture(a.netns, "eth0", str(tmp_path / "a.pcap"))
        wg_cap = Capture(a.netns, "cilium_wg0", str(tmp_path / "wg.pcap"), "tcp")
        sender = udp_socket(a.netns)
        try:
            for i in range(5):
                sender.sendto(b"node-%d" % i, (b.ip, 7777))
                sender.sendto(b"pod-%d" % i, (b.pod_ip, 7778))
                time.sleep(0.02)
            tcp_exchange(a.netns, b.ip, 6443, b"bootstrap")
            tcp_exchange(a.netns, b.ip, 7779, b"encrypted tcp")
            got_node, got_pod = rx.drain(7777, want=5), rx.drain(7778, want=5)
        finally:
            sender.close()
            lines = cap.stop()
            wg_lines = wg_cap.stop()
        # The redirected SYN had its MSS clamped for WireGuard's MTU (1420 - 40), not the
        # underlay's 1460; the exempt connection never went through cilium_wg0.
        [syn] = [line for line in wg_lines if f"> {b.ip}.7779: Flags [S]," in line]
        assert "mss 1380" in syn, syn
        assert not [line for line in wg_lines if ".6443" in line], wg_lines
        # Arrived on B, decrypted by WireGuard (WireGuard may drop what it queued before the
        # first handshake finished, so at least the later packets must be there).
        assert got_node and all(p.startswith(b"node-") for p in got_node)
        assert got_pod and all(p.startswith(b"pod-") for p in got_pod)
        # On A's wire: nothing to 7777/7778 in the clear, WireGuard UDP instead, 6443 in clear.
        assert not [
            line for line in lines if f"{b.ip}.7777" in line or f"{b.pod_ip}.7778" in line
        ], lines
        wg_udp = [line for line in lines if f"{a.ip}.{WG_PORT} > {b.ip}.{WG_PORT}: UDP" in line]
        assert len(wg_udp) >= 10, lines
        assert [line for line in lines if f"> {b.ip}.6443: Flags [S]" in line], lines
        assert not [line for line in lines if f"{b.ip}.7779" in line], lines

        seen = standin_seen(standin)
        assert not [k for k in seen if k[2] in (7777, 7778)], seen
        assert seen.get((b.ip, 17, WG_PORT), 0) >= 10, seen
        assert seen.get((b.ip, 6, 6443), 0) >= 3, seen

        with in_netns(a.netns):
            counters = dp.observe().counters
        assert counters["cluster-destination"] >= 10
        assert counters["exempt-control-plane-port"] >= 3
        assert counters["wireguard-output"] >= 10
        scraped = metrics.registry.get_sample_value(
            "nodecryptor_datapath_packets_total",
            {"reason": "cluster-destination", "verdict": "encrypt"},
        )
        assert scraped >= counters["cluster-destination"]
    finally:
        standin_link.close()
        standin.cleanup()
        rx.close()


def test_sigkilled_agent_leaves_datapath_enforcing_and_successor_takes_over_link(
    lab, bpffs, datapaths, tmp_path
):
    a, b = lab.a, lab.b
    spec = json.dumps({"bpffs": bpffs, "a": asdict(a), "b": asdict(b)})
    holder = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            a.netns,
            sys.executable,
            os.path.join(os.path.dirname(__file__), "bpf_backend_lab.py"),
            "hold",
            spec,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    rx = Receiver(b.netns, udp_ports=(7777,))
    stop = threading.Event()
    try:
        line = holder.stdout.readline()
        assert line.startswith("applied "), line
        cap = Capture(a.netns, "eth0", str(tmp_path / "kill.pcap"))
        sender = udp_socket(a.netns)
        sent = [0]

        def send_continuously():
            while not stop.is_set():
                sender.sendto(b"x%d" % sent[0], (b.ip, 7777))
                sent[0] += 1
                time.sleep(0.002)

        thread = threading.Thread(target=send_continuously)
        thread.start()
        time.sleep(0.5)
        before = len(rx.drain(7777, wait=0.3, want=10_000))
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        sent_at_kill = sent[0]
        time.sleep(1.0)
        stop.set()
        thread.join()
        sender.close()
        after = len(rx.drain(7777, wait=1.0, want=10_000))
        lines = cap.stop()
        assert holder.returncode == -signal.SIGKILL
        # Traffic really continued after the kill, and kept arriving (through WireGuard).
        assert sent[0] - sent_at_kill > 50
        assert before > 0 and after > 25, (before, after)
        assert not [line for line in lines if f"{b.ip}.7777" in line], lines[:20]
        with in_netns(a.netns):
            att = attach.tcx_observe(bpffs, "eth0")
        assert att is not None and not att.defunct and att.position == 0
        # The next agent takes over the same link; its program text is the killed agent's,
        # so it reuses the running program and its maps instead of compiling.
        settings = lab.settings(bpffs)
        with in_netns(a.netns):
            successor = datapaths(settings)
            successor.start()
            successor.apply(lab.desired(settings))
            obs = successor.observe()
        assert obs.ready, obs.reason
        assert obs.details["program"]["source"] == "reused"
        dev = obs.details["devices"][0]
        assert dev["link_id"] == att.link_id and dev["prog_id"] == successor.prog_id == att.prog_id
    finally:
        stop.set()
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        rx.close()


def test_restart_swaps_program_in_same_link_new_generation_and_reattaches_new_device(
    lab, bpffs, datapaths
):
    a, b = lab.a, lab.b
    settings = lab.settings(bpffs)
    pins.ensure_dirs(bpffs)
    # Left by an agent of the previous ABI version: removed once this one is attached.
    old_abi = os.path.join(pins.root(bpffs), "v1")
    os.mkdir(old_abi, 0o700)
    spec = abi.MAPS_BY_NAME["nc_dst_v4"]
    fd = syscall.map_create(
        spec.map_type, spec.key_size, spec.value_size, 16, spec.flags, spec.name
    )
    with fd:
        syscall.obj_pin(fd, os.path.join(old_abi, spec.name))
    rx = Receiver(b.netns, udp_ports=(7777,))
    sender = udp_socket(a.netns)
    try:
        with in_netns(a.netns):
            first = datapaths(settings)
            first.start()
            first.apply(lab.desired(settings))
            obs1 = first.observe()
        assert obs1.ready, obs1.reason
        gen1 = obs1.details["generation"]
        assert pins.current_generation(bpffs) == gen1 and pins.generations(bpffs) == [gen1]
        assert not os.path.exists(old_abi)
        assert obs1.details["capacity"] == {
            "ipv4": settings.map_sizes.destinations_v4,
            "ipv6": settings.map_sizes.destinations_v6,
        }
        sender.sendto(b"before-restart", (b.ip, 7777))
        assert rx.drain(7777, want=1)
        counted = collector.read_pinned_counters(bpffs)["cluster-destination"]["packets"]
        assert counted >= 1
        link1, prog1 = obs1.details["devices"][0]["link_id"], obs1.details["prog_id"]
        first.close()

        # An upgrade whose program differs (here: another fragment table size, a compile
        # flag): compiled, loaded into a new generation and swapped into the same link.
        settings = dataclasses.replace(
            settings,
            map_sizes=dataclasses.replace(
                settings.map_sizes, fragments=settings.map_sizes.fragments * 2
            ),
        )
        with in_netns(a.netns):
            second = datapaths(settings)
            second.start()
            # Loaded into a new generation; the links still run the first program.
            assert pins.current_generation(bpffs) == gen1
            second.apply(lab.desired(settings))
            obs2 = second.observe()
        assert obs2.ready, obs2.reason
        assert obs2.details["program"]["source"] == "compiled"
        # The first program's key is kept for a rollback.
        assert sorted(pins.program_keys(bpffs)) == sorted(
            {obs1.details["program"]["key"], obs2.details["program"]["key"]}
        )
        assert obs2.details["generation"] == gen1 + 1 == pins.current_generation(bpffs)
        assert pins.generations(bpffs) == [gen1 + 1]
        # counters carried over to the new generation
        assert collector.read_pinned_counters(bpffs)["cluster-destination"]["packets"] >= counted
        dev2 = obs2.details["devices"][0]
        assert dev2["link_id"] == link1 and dev2["prog_id"] == obs2.details["prog_id"] != prog1
        sender.sendto(b"after-restart", (b.ip, 7777))
        assert rx.drain(7777, want=1)

        lab.recreate_underlay()
        with in_netns(a.netns):
            stale = second.observe()
            assert not stale.ready and "defunct" in stale.reason
            second.apply(lab.desired(settings))
            obs3 = second.observe()
        assert obs3.ready, obs3.reason
        dev3 = obs3.details["devices"][0]
        assert dev3["link_id"] != link1 and dev3["ifindex"] != dev2["ifindex"]
        for _ in range(20):  # the new veth needs ARP, WireGuard a fresh path
            sender.sendto(b"after-recreate", (b.ip, 7777))
            if rx.drain(7777, wait=0.1, want=1):
                break
        else:
            pytest.fail("nothing arrived on B after the underlay device was re-created")

        # A device that is no longer desired is detached (and its pin removed).
        with in_netns(a.netns):
            second.apply(dataclasses.replace(lab.desired(settings), devices=()))
            assert attach.query(attach.ifindex_of("eth0"))["tcx"] == []
            gone = second.observe()
        assert pins.pinned_link_names(bpffs) == []
        assert not gone.ready and "no underlay device" in gone.reason
    finally:
        sender.close()
        rx.close()


def test_legacy_tc_mode_attaches_filter_detects_shadowing_and_cleans_up(
    lab, bpffs, datapaths, tmp_path
):
    a, b = lab.a, lab.b
    settings = lab.settings(bpffs)
    rx = Receiver(b.netns, udp_ports=(7777,))
    sender = udp_socket(a.netns)
    try:
        with in_netns(a.netns):
            dp = datapaths(settings, attach_mode="tc")
            dp.start()
            dp.apply(lab.desired(settings))
            obs = dp.observe()
        assert obs.ready, obs.reason
        [dev] = obs.details["devices"]
        assert (dev["mode"], dev["handle"], dev["prio"]) == ("tc", "0x4e43", 1)
        cap = Capture(a.netns, "eth0", str(tmp_path / "tc.pcap"))
        for _ in range(5):
            sender.sendto(b"legacy", (b.ip, 7777))
            time.sleep(0.02)
        assert rx.drain(7777, want=5)
        lines = cap.stop()
        assert not [line for line in lines if f"{b.ip}.7777" in line], lines

        # Restart in place: the same filter (handle, prio) now runs the new program.
        with in_netns(a.netns):
            dp.close()
            dp = datapaths(settings, attach_mode="tc")
            dp.start()
            dp.apply(lab.desired(settings))
            restarted = dp.observe()
        assert restarted.ready, restarted.reason
        assert restarted.details["devices"] == [{**dev, "prog_id": dp.prog_id}]
        filters = sh("tc", "filter", "show", "dev", "eth0", "egress", netns=a.netns)
        assert filters.count("nodecryptor") == 1 and f"id {dp.prog_id} " in filters, filters
        with in_netns(a.netns):  # inspection finds the program through its pin in this mode
            why = inspect.explain(settings, PacketQuery(dst=b.ip, proto="udp", dport=7777))
            st = inspect.status(settings)
        assert (why.verdict, why.device, why.details["mode"], why.details["prog_id"]) == (
            "encrypt",
            "eth0",
            "tc",
            dp.prog_id,
        )
        assert (st["mode"], st["prog_id"], st["ready"]) == ("tc", dp.prog_id, True), st["reason"]

        # A foreign filter classified before ours (same prio, listed first) shadows it.
        sh(
            "tc",
            "filter",
            "add",
            "dev",
            "eth0",
            "egress",
            "prio",
            "1",
            "handle",
            "0x7",
            "bpf",
            "bytecode",
            "1,6 0 0 4294967295,",
            netns=a.netns,
        )
        with in_netns(a.netns):
            shadowed = dp.observe()
        assert not shadowed.ready and "prio 1 handle 0x7" in shadowed.reason

        with in_netns(a.netns):
            dp.apply(dataclasses.replace(lab.desired(settings), devices=()))
        assert "nodecryptor" not in sh(
            "tc", "filter", "show", "dev", "eth0", "egress", netns=a.netns
        )
        with in_netns(a.netns):
            dp.cleanup()
        filters = sh("tc", "filter", "show", "dev", "eth0", "egress", netns=a.netns)
        assert "handle 0x7" in filters and "nodecryptor" not in filters
        assert not os.path.exists(pins.root(bpffs))
    finally:
        sender.close()
        rx.close()


def test_inspection_commands_on_live_setup_without_agent(lab, bpffs, datapaths):
    a, b = lab.a, lab.b
    settings = lab.settings(bpffs)
    foreign = load_ret_prog(-1, "foreign_next")
    try:
        with in_netns(a.netns):
            dp = datapaths(settings)
            dp.start()
            dp.apply(lab.desired(settings))
            prog_id = dp.prog_id
            dp.close()  # the commands read pins only; the agent need not run
            foreign_link = syscall.tcx_link_create(foreign, attach.ifindex_of("eth0"), flags=0)
            foreign_in = syscall.tcx_link_create(
                foreign, attach.ifindex_of("eth0"), flags=0, attach_type=syscall.BPF_TCX_INGRESS
            )

        def cli(*args):
            return nodecryptor_cli(*args, "--bpffs", bpffs, mount_pid=a.wg_pid)

        started = time.monotonic()
        dump = cli("bpf", "dump", "--json")
        dump_seconds = time.monotonic() - started
        assert dump.returncode == 0, dump.stderr
        maps = json.loads(dump.stdout)["maps"]
        prefixes = {d["prefix"] for d in maps["destinations"]}
        assert prefixes == {f"{b.ip}/32", b.pod_cidr}
        assert maps["config"]["mss_v4"] == 1380
        print(f"bpf dump --json took {dump_seconds:.3f}s (python start-up included)")
        assert dump_seconds < 3.0

        def explain(*args):
            res = cli("explain", "--json", *args)
            assert res.returncode == 0, res.stderr
            return json.loads(res.stdout)

        enc = explain("--dst", b.ip, "--proto", "udp", "--dport", "7777")
        assert (enc["verdict"], enc["reason"], enc["datapath"], enc["device"]) == (
            "encrypt",
            "cluster-destination",
            "bpf",
            "eth0",
        )
        assert enc["src"] == a.ip and enc["prog_id"] == prog_id
        assert enc["redirect_device"] == "cilium_wg0"
        pod = explain("--dst", b.pod_ip, "--dport", "80")
        assert pod["verdict"] == "encrypt"
        exempt = explain("--dst", b.ip, "--dport", "6443")
        assert (exempt["verdict"], exempt["reason"]) == ("exempt", "exempt-control-plane-port")
        wg = explain(
            "--dst",
            b.ip,
            "--proto",
            "udp",
            "--sport",
            str(WG_PORT),
            "--dport",
            str(WG_PORT),
            "--mark",
            "0xe00",
        )
        assert (wg["verdict"], wg["reason"]) == ("pass", "wireguard-output")
        other = explain("--dst", "192.168.77.99", "--dport", "80")
        assert (other["verdict"], other["reason"]) == ("pass", "not-cluster-destination")
        # The pod-to-pod contract with Cilium: local pod to remote pod is Cilium's own, passed on.
        p2p = explain("--src", a.pod_ip, "--dst", b.pod_ip, "--dport", "80")
        assert (p2p["verdict"], p2p["reason"]) == ("pass", "cilium-pod-to-pod")
        assert "cilium" in p2p["reason"]
        p2n = explain("--src", a.pod_ip, "--dst", b.ip, "--dport", "80")
        assert p2n["verdict"] == "encrypt"

        bad = cli("explain", "--dst", b.ip, "--sport", "65536")
        assert bad.returncode == 2 and "--sport" in bad.stderr and "65536" in bad.stderr

        status = cli("status", "--json")
        assert status.returncode == 0, status.stderr
        st = json.loads(status.stdout)
        assert st["ready"], st["reason"]
        assert (st["datapath"], st["mode"], st["prog_id"]) == ("bpf", "tcx", prog_id)
        assert [d["name"] for d in st["devices"]] == ["eth0"]
        assert st["mss"] == {"v4": 1380, "v6": 1360}
        assert st["wireguard"]["ifname"] == "cilium_wg0" and st["wireguard"]["up"]
        assert st["wireguard"]["listen_port"] == WG_PORT
        cil = st["cilium"]
        assert (
            cil["routing_mode"],
            cil["wg_port"],
            cil["wg_fwmark"],
            cil["wg_mtu"],
            cil["node_ips_in_allowed_ips"],
        ) == ("native", WG_PORT, "0xe00", 1420, True), cil
        assert set(cil["sources"]) >= {
            "routing_mode",
            "wg_port",
            "wg_fwmark",
            "wg_mtu",
            "node_ips_in_allowed_ips",
        }
        assert cil["attach"] == [
            {
                "device": "eth0",
                "mode": "tcx",
                "position": 0,
                "runs_behind_nodecryptor": ["foreign_next"],
            }
        ]
        hooks = {(c["device"], c["direction"]): c for c in st["chains"]}
        assert set(hooks) == {("eth0", "egress"), ("eth0", "ingress"), ("cilium_wg0", "ingress")}, (
            st["chains"]
        )
        assert [
            (e["name"], e["prog_id"], e["nodecryptor"], e["owner"])
            for e in hooks["eth0", "egress"]["tcx"]
        ] == [
            ("nc_egress", prog_id, True, "nodecryptor"),
            ("foreign_next", prog_id_of(foreign), False, "other"),
        ]
        # Ingress: nodecryptor's program, then whatever runs behind it (here, on eth0, a
        # foreign program attached at the tail, as Cilium attaches cil_from_netdev).
        assert [(e["name"], e["owner"]) for e in hooks["eth0", "ingress"]["tcx"]] == [
            ("nc_ingress", "nodecryptor"),
            ("foreign_next", "other"),
        ]
        assert [(e["name"], e["owner"]) for e in hooks["cilium_wg0", "ingress"]["tcx"]] == [
            ("nc_ingress", "nodecryptor")
        ]
        # explain ran the live program several times above, dry: no real traffic was counted
        assert st["counters"]["cluster-destination"]["packets"] == 0

        text = cli("status")
        assert text.returncode == 0, text.stderr
        assert "ready: yes" in text.stdout and "eth0" in text.stdout, text.stdout
        assert "cilium: routing native" in text.stdout, text.stdout
        assert (
            f"eth0 tcx egress: nc_egress(id {prog_id}, nodecryptor)* -> foreign_next" in text.stdout
        ), text.stdout
        assert "eth0 tcx ingress: nc_ingress(id " in text.stdout, text.stdout
        assert "cilium_wg0 tcx ingress: nc_ingress(id " in text.stdout, text.stdout
        text_dump = cli("bpf", "dump")
        assert text_dump.returncode == 0 and f"{b.ip}/32" in text_dump.stdout, text_dump.stderr
        text_explain = cli("explain", "--dst", b.ip, "--dport", "6443")
        assert text_explain.stdout.startswith("exempt: exempt-control-plane-port")
        print(text.stdout, text_dump.stdout, text_explain.stdout, sep="\n")

        done = cli("cleanup")
        assert done.returncode == 0, done.stderr
        # The text names every hook it emptied, ingress (eth0 and cilium_wg0) included.
        assert "bpf: removed 3 hook(s)" in done.stdout, done.stdout
        assert "egress tcx link(s): eth0\n" in done.stdout, done.stdout
        assert "ingress tcx link(s): cilium_wg0, eth0\n" in done.stdout, done.stdout
        gone = cli("status", "--json")
        assert gone.returncode == 1 and "no nodecryptor datapath is active" in gone.stderr
        with in_netns(a.netns):
            chain = attach.query(attach.ifindex_of("eth0"))["tcx"]
        assert [c["link_id"] for c in chain] == [syscall.link_info(foreign_link).id]
    finally:
        foreign.close()
        if "foreign_link" in locals():
            foreign_link.close()
        if "foreign_in" in locals():
            foreign_in.close()
