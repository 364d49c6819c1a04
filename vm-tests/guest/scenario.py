"""Guest side of the VM harness: the whole scenario in one guest session, result as JSON.

Runs as root inside the Debian 6.1 guest that vm-tests/harness.py boots (``python
scenario.py --out <file>``). It builds the two-node lab (lab.py), checks kernel WireGuard, then
for each datapath (BPF first, then ip rules) applies nodecryptor on node A through the driver
(driver.py, inside A's namespace) and measures with tcpdump on A's underlay:

- flows:  TCP, UDP and ICMP from A to B's node address and to the pod behind B are delivered,
          leave A's underlay only as WireGuard UDP 51871 and arrive decrypted on B's cilium_wg0;
- exempt: TCP 6443 to control-plane node B is delivered and stays in the clear;
- mtu:    bulk iperf3 transfers (A → pod, B → A, A → B), counting outer IP fragments of the
          sending direction on A's underlay, with the MSS clamped and (BPF only) without. B
          does not clamp, so A → B is fixed only by A's ingress clamp of B's SYN-ACK.

A baseline without any datapath first proves the capture does see clear-text traffic, so a
zero count later means something. The scenario records facts; tests/vm/test_vm.py judges them.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import lab as lab_mod
from lab import A_IP, B_IP, POD_IP, WG_IFNAME, WG_PORT
from traffic import Capture, Processes, count, echo, echo_servers, iperf3, ping, wait_port

BPFFS = "/run/nc-vm-bpffs"  # /sys is remounted by `ip netns exec`; /run is shared with A
IPERF_BYTES = "2M"
ECHO_TCP, ECHO_UDP, APISERVER = 8080, 5353, 6443


class DriverClient:
    """The driver process inside A, spoken to one JSON line at a time."""

    def __init__(self, ns: str, procs: Processes, log_path: str):
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, os.path.join(HERE, "driver.py")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
            )
        procs.procs.append(self.proc)

    def log_tail(self, lines: int = 12) -> list[str]:
        with open(self.log_path, errors="replace") as f:
            return f.read().splitlines()[-lines:]

    def request(self, timeout: float = 240.0, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise RuntimeError(f"driver: no answer to {req['op']} within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"driver exited during {req['op']} (rc={self.proc.poll()})")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"driver {req['op']}: {reply.get('error')}\n{reply.get('trace')}")
        return reply


def timed(timings: dict, name: str):
    class _Timer:
        def __enter__(self):
            self.t0 = time.monotonic()

        def __exit__(self, *exc):
            timings[name] = round(time.monotonic() - self.t0, 2)
            return False

    return _Timer()


def is_wireguard(p) -> bool:
    """WireGuard's UDP, including non-first fragments of it (they carry no ports)."""
    return p.proto == 17 and (p.frag_offset > 0 or p.has_port(WG_PORT))


def flows():
    """(name, predicate matching the flow's packets, client that says it was delivered)."""
    out = []
    for target, host in (("node", B_IP), ("pod", POD_IP)):
        out += [
            (
                f"tcp_{target}",
                lambda p, h=host: p.proto == 6 and p.between(h) and p.has_port(ECHO_TCP),
                lambda ns, h=host: echo(ns, "tcp", h, ECHO_TCP),
            ),
            (
                f"udp_{target}",
                lambda p, h=host: p.proto == 17 and p.between(h) and p.has_port(ECHO_UDP),
                lambda ns, h=host: echo(ns, "udp", h, ECHO_UDP),
            ),
            (
                f"icmp_{target}",
                lambda p, h=host: p.proto == 1 and p.between(h),
                lambda ns, h=host: ping(ns, h),
            ),
        ]
    return out


def check_flows(lab, procs, workdir: str, tag: str) -> dict:
    cap_a = Capture(procs, lab.a, "eth0", f"{workdir}/{tag}-flows-underlay.pcap")
    cap_b = Capture(procs, lab.b, WG_IFNAME, f"{workdir}/{tag}-flows-peer-wg.pcap")
    delivered = {name: send(lab.a) for name, _, send in flows()}
    cap_a.stop()
    cap_b.stop()
    underlay, peer = cap_a.packets(), cap_b.packets()
    out = {
        "wireguard_packets_on_underlay": count(underlay, is_wireguard),
        "clear_ip_on_underlay": count(underlay, lambda p: not is_wireguard(p)),
        "flows": {},
    }
    for name, match, _ in flows():
        out["flows"][name] = {
            "delivered": delivered[name],
            "clear_on_underlay": count(underlay, match),
            "decrypted_on_peer": count(peer, lambda p, m=match: p.src == A_IP and m(p)),
        }
    return out


def check_exempt(lab, procs, workdir: str, tag: str) -> dict:
    cap_a = Capture(procs, lab.a, "eth0", f"{workdir}/{tag}-exempt-underlay.pcap")
    cap_b = Capture(procs, lab.b, WG_IFNAME, f"{workdir}/{tag}-exempt-peer-wg.pcap")
    delivered = echo(lab.a, "tcp", B_IP, APISERVER)
    cap_a.stop()
    cap_b.stop()

    def apiserver(p):
        return p.proto == 6 and p.between(B_IP) and p.has_port(APISERVER)

    underlay = cap_a.packets()
    return {
        "delivered": delivered,
        "clear_on_underlay": count(underlay, apiserver),
        "clear_payload_on_underlay": count(
            underlay, lambda p: apiserver(p) and p.dst == B_IP and p.payload > 0
        ),
        "via_wireguard_on_peer": count(cap_b.packets(), lambda p: apiserver(p) and p.src == A_IP),
    }


# Bulk transfers of the MTU experiment: (name, iperf3 server host, reverse). iperf3 -R makes the
# server send, so "b_to_a" is B's node sending to A, with A's SYN clamped by A's program.
TRANSFERS = (("a_to_pod", POD_IP, False), ("b_to_a", B_IP, True), ("a_to_b", B_IP, False))


def measure_mtu(lab, procs, workdir: str, tag: str, transfers=TRANSFERS) -> dict:
    """Per transfer: outer packets of the sending direction on A's underlay and how many of
    them are fragments, plus the MSS each side advertised (seen decrypted on B's cilium_wg0)."""
    out = {}
    for name, host, reverse in transfers:
        cap_a = Capture(procs, lab.a, "eth0", f"{workdir}/{tag}-{name}-underlay.pcap", snaplen=96)
        cap_b = Capture(procs, lab.b, WG_IFNAME, f"{workdir}/{tag}-{name}-peer-wg.pcap", snaplen=96)
        transfer = iperf3(lab.a, host, IPERF_BYTES, reverse=reverse)
        cap_a.stop()
        cap_b.stop()
        sender, receiver = (B_IP, A_IP) if reverse else (A_IP, B_IP)
        sent = [p for p in cap_a.packets() if p.src == sender and p.dst == receiver]
        wg_packets = count(sent, lambda p: p.proto == 17 and p.dport == WG_PORT)
        first = count(sent, lambda p: p.first_fragment)
        syns = [
            p
            for p in cap_b.packets()
            if p.proto == 6 and p.tcp_flags & 0x02 and p.mss and p.has_port(5201)
        ]
        out[name] = {
            "transfer": transfer,
            "outer_packets": len(sent),
            "wireguard_packets": wg_packets,
            "fragments": count(sent, lambda p: p.fragment),
            "fragmented_packets": first,
            "fragmented_percent": round(100.0 * first / wg_packets, 1) if wg_packets else None,
            "largest_outer_packet": max((p.length for p in sent), default=0),
            "clear_tcp_on_underlay": count(
                cap_a.packets(), lambda p: p.proto == 6 and p.has_port(5201)
            ),
            "mss_a_advertised": sorted({p.mss for p in syns if p.src == A_IP}),
            "mss_peer_advertised": sorted({p.mss for p in syns if p.src != A_IP}),
        }
    return out


def tc_filters(ns: str, dev: str, direction: str) -> str:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", dev, direction],
        capture_output=True,
        text=True,
    ).stdout


def tc_egress(ns: str) -> str:
    return tc_filters(ns, "eth0", "egress")


def tc_ingress(ns: str) -> dict:
    """nodecryptor's ingress hooks on A: the underlay (clear text from peers) and cilium_wg0
    (what peers sent through the tunnel, decrypted)."""
    return {dev: tc_filters(ns, dev, "ingress") for dev in ("eth0", WG_IFNAME)}


def run_datapath(kind: str, driver: DriverClient, lab, procs, workdir: str, timings: dict) -> dict:
    res: dict = {"errors": []}
    try:
        with timed(timings, f"{kind}_start"):
            try:
                res["start"] = driver.request(
                    op="start",
                    datapath=kind,
                    nodes=lab.nodes(),
                    local="node-a",
                    device="eth0",
                    bpffs=BPFFS,
                )
            except RuntimeError as e:
                # BCC prints the verifier's log on stderr; its last lines name the rejected
                # instruction and why, so the failing tests show them with the load error.
                tail = "\n".join(driver.log_tail(8))
                raise RuntimeError(f"{e}\ndriver log tail:\n{tail}") from e
        # The agent logs each compile+load with its duration (the probe and the real load).
        res["start"]["load_log"] = [
            line for line in driver.log_tail(60) if "program loaded" in line.lower()
        ]
        with timed(timings, f"{kind}_apply"):
            res["apply"] = driver.request(op="apply", clamp=True)
        res["observe"] = driver.request(op="observe")
        res["tc_egress"] = tc_egress(lab.a)
        res["tc_ingress"] = tc_ingress(lab.a)
        res["a_rules"] = subprocess.run(
            ["ip", "-n", lab.a, "rule", "show"], capture_output=True, text=True
        ).stdout
        res["a_routes"] = subprocess.run(
            ["ip", "-n", lab.a, "route", "show", "table", "all"], capture_output=True, text=True
        ).stdout
        with timed(timings, f"{kind}_flows"):
            res["flows"] = check_flows(lab, procs, workdir, kind)
        if kind == "bpf":
            # A Cilium restart: its programs are reloaded into the same hook (filter replaced
            # in place); nodecryptor's filter must stay first and traffic keep working (the
            # checks below run after it).
            with timed(timings, "cilium_reload"):
                res["cilium_reload"] = driver.request(op="cilium", action="reload")
            res["tc_egress_after_cilium_reload"] = tc_egress(lab.a)
        with timed(timings, f"{kind}_exempt"):
            res["exempt"] = check_exempt(lab, procs, workdir, kind)
        with timed(timings, f"{kind}_mtu_clamped"):
            res["mtu_clamped"] = measure_mtu(lab, procs, workdir, f"{kind}-clamped")
        if kind == "bpf":
            res["apply_unclamped"] = driver.request(op="apply", clamp=False)
            with timed(timings, f"{kind}_mtu_unclamped"):
                res["mtu_unclamped"] = measure_mtu(
                    lab, procs, workdir, f"{kind}-unclamped", TRANSFERS[1:]
                )
            driver.request(op="apply", clamp=True)
        res["observe_end"] = driver.request(op="observe")
    except Exception as e:  # record and go on: the next datapath still gets its chance
        res["errors"].append(f"{type(e).__name__}: {e}")
    finally:
        try:
            driver.request(op="cleanup", timeout=60)
        except Exception as e:  # the lab's namespaces are deleted anyway
            res["errors"].append(f"cleanup: {e}")
    res["tc_egress_after_cleanup"] = tc_egress(lab.a)
    res["tc_ingress_after_cleanup"] = tc_ingress(lab.a)
    return res


def scenario(out: dict, datapaths: list[str], workdir: str, logdir: str) -> None:
    timings = out["timings"]
    procs = Processes()
    lab = None
    os.makedirs(BPFFS, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], check=True)
    try:
        with timed(timings, "modprobe"):
            subprocess.run(["modprobe", "wireguard"], check=True)
        with timed(timings, "lab_build"):
            lab = lab_mod.build()
        echo_servers(procs, lab.b, tcp_ports=(ECHO_TCP, APISERVER))
        echo_servers(procs, lab.pod)
        procs.start(lab.pod, "iperf3", "-s")
        procs.start(lab.b, "iperf3", "-s")
        for ns, proto, port in (
            (lab.b, "tcp", ECHO_TCP),
            (lab.b, "tcp", APISERVER),
            (lab.b, "udp", ECHO_UDP),
            (lab.pod, "tcp", ECHO_TCP),
            (lab.pod, "udp", ECHO_UDP),
            (lab.pod, "tcp", 5201),
            (lab.b, "tcp", 5201),
        ):
            wait_port(ns, proto, port)
        # Kernel WireGuard itself: A reaches B's node address through the tunnel by route.
        with timed(timings, "wireguard_check"):
            out["wireguard"] = check_wireguard(lab)
        with timed(timings, "baseline"):
            out["baseline"] = check_flows(lab, procs, workdir, "baseline")
        with timed(timings, "driver_spawn"):
            driver = DriverClient(lab.a, procs, os.path.join(logdir, "driver.log"))
            # Answered once Python and nodecryptor are imported: ~20 s under TCG.
            driver.request(op="hello", timeout=180)
        # Cilium's cil_to_netdev stand-in at the tail of A's egress hook, for every datapath.
        with timed(timings, "cilium_start"):
            out["cilium"] = {
                "start": driver.request(op="cilium", action="start"),
                "tc_egress_start": tc_egress(lab.a),
            }
        for kind in datapaths:
            out["datapaths"][kind] = run_datapath(kind, driver, lab, procs, workdir, timings)
        out["cilium"]["stop"] = driver.request(op="cilium", action="stop", timeout=60)
        out["cilium"]["tc_egress_after_stop"] = tc_egress(lab.a)
        driver.request(op="quit", timeout=30)
    finally:
        procs.stop_all()
        if lab is not None:
            lab_mod.destroy(lab)
        subprocess.run(["umount", BPFFS], check=False)
        # The captures go to the shared result directory for a look with tcpdump -r / wireshark.
        for name in os.listdir(workdir):
            if name.endswith(".pcap"):
                shutil.copy(os.path.join(workdir, name), logdir)


def check_wireguard(lab) -> dict:
    """Kernel WireGuard alone, before nodecryptor: a handshake and a ping to the pod through
    the tunnel, using a temporary /32 route on A (B's endpoint stays reachable by eth0)."""

    def route(op: str) -> list[str]:
        return ["ip", "-n", lab.a, "route", op, f"{POD_IP}/32", "dev", WG_IFNAME]

    subprocess.run(route("add"), check=True)
    try:
        ok = ping(lab.a, POD_IP)
    finally:
        subprocess.run(route("del"), check=False)
    shown = subprocess.run(
        ["ip", "netns", "exec", lab.a, "wg", "show", WG_IFNAME, "latest-handshakes"],
        capture_output=True,
        text=True,
    ).stdout
    handshake = any(p.split()[-1] != "0" for p in shown.splitlines() if p.split())
    kind = subprocess.run(
        ["ip", "-n", lab.a, "-d", "link", "show", WG_IFNAME], capture_output=True, text=True
    ).stdout
    return {
        "ping_through_tunnel": ok,
        "handshake": handshake,
        "kernel_device": "wireguard" in kind and os.path.exists("/sys/module/wireguard"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where to write the result JSON")
    ap.add_argument(
        "--datapaths",
        default="bpf,iprule",
        help="comma-separated datapaths to run, in order (default: bpf,iprule)",
    )
    args = ap.parse_args()
    workdir = os.path.join("/tmp", f"nc-vm-{os.getpid()}")
    os.makedirs(workdir, exist_ok=True)
    out = {"kernel": os.uname().release, "timings": {}, "datapaths": {}, "errors": []}
    started = time.monotonic()
    try:
        scenario(
            out,
            [d for d in args.datapaths.split(",") if d],
            workdir,
            os.path.dirname(os.path.abspath(args.out)),
        )
    except Exception as e:  # the JSON must be written whatever happened
        out["errors"].append(f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=8)}")
    out["timings"]["guest_total"] = round(time.monotonic() - started, 2)
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    os.replace(args.out + ".tmp", args.out)
    print(f"nc-vm: result written to {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
