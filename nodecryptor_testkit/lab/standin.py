"""The lab's Cilium stand-in: owns one node's ``cilium_wg0`` the way cilium-agent does.

It creates the device (kernel WireGuard when ``ip link add type wireguard`` works, else
``wireguard-go``) with Cilium's settings (listen port 51871, fwmark 0x0e00, MTU underlay - 95,
rp_filter 0), publishes the public key in the node's CiliumNode annotation through the API, and
keeps one peer per other node whose key is published: allowed-IPs = that node's addresses and
pod CIDRs, endpoint = its IPv4 address and port 51871.

Like Cilium's datapath it also loads BPF programs (standin_datapath.py): ``cil_to_netdev`` at
the tail of eth0's tcx egress chain, which redirects local-pod to remote-pod traffic into
cilium_wg0 with an identity mark, and ``cil_from_container`` on the pod's veth, which sends that
traffic to eth0 with ``cb[]`` left dirty. ``--routing tunnel`` makes it a tunnel-mode Cilium:
peers' allowed-IPs hold node addresses only and pod traffic goes through ``cilium_vxlan``
(standin_tunnel.py).

Signals drive the scenarios: SIGWINCH = restart of the Cilium agent (the programs are reloaded
into the same links); SIGUSR1 = reboot (the device is re-created with a fresh key, which
is published only after ``--republish-delay`` seconds or on SIGHUP, whichever comes first, like
a cilium-agent that takes time to start); SIGUSR2 = remove the device, and on the next SIGUSR2
bring it back with the same key; SIGTERM = remove the device and exit.

Run as ``python -m nodecryptor_testkit.lab.standin --node NAME --server URL --token TOKEN``,
inside the
node's namespaces.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from nodecryptor.policy.ciliumnode import WG_PUBKEY_ANNOTATION, parse_ciliumnode
from nodecryptor.core.log import kv, setup
from .kubeapi import ApiError, KubeApi
from . import standin_tunnel
from .spec import ROUTING_MODES, UNDERLAY_MTU, WG_FWMARK, WG_MTU, WG_PORT

log = logging.getLogger("nodecryptor_testkit.lab.standin")

UAPI_DIR = "/var/run/wireguard"


def _run(*cmd: str, stdin: str | None = None, check: bool = True) -> str:
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=10)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


class WgDevice:
    """One WireGuard device, kernel or userspace, with a private key held in memory."""

    def __init__(self, ifname: str, impl: str, mtu: int):
        self.ifname = ifname
        self.impl = impl
        self.mtu = mtu
        self.userspace: subprocess.Popen | None = None
        self.private_key = ""
        self.public_key = ""

    def new_key(self) -> None:
        self.private_key = _run("wg", "genkey")
        self.public_key = _run("wg", "pubkey", stdin=self.private_key + "\n")

    def exists(self) -> bool:
        return (
            subprocess.run(["ip", "link", "show", self.ifname], capture_output=True).returncode == 0
        )

    def create(self) -> str:
        """Create and configure the device; returns the implementation used."""
        impl = self.impl
        if impl in ("auto", "kernel"):
            ok = (
                subprocess.run(
                    ["ip", "link", "add", self.ifname, "type", "wireguard"], capture_output=True
                ).returncode
                == 0
            )
            if ok:
                impl = "kernel"
            elif impl == "kernel":
                raise RuntimeError(
                    f"--wg-impl=kernel: cannot create {self.ifname} (no WireGuard kernel module)"
                )
            else:
                impl = "go"
        if impl == "go":
            env = dict(
                os.environ,
                WG_PROCESS_FOREGROUND="1",
                WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1",
                LOG_LEVEL="error",
            )
            self.userspace = subprocess.Popen(
                ["wireguard-go", "-f", self.ifname],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
            )
            sock = os.path.join(UAPI_DIR, f"{self.ifname}.sock")
            deadline = time.monotonic() + 5
            while not (os.path.exists(sock) and self.exists()):
                if self.userspace.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"wireguard-go did not create {self.ifname}")
                time.sleep(0.02)
        _run(
            "wg",
            "set",
            self.ifname,
            "private-key",
            "/dev/stdin",
            "listen-port",
            str(WG_PORT),
            "fwmark",
            hex(WG_FWMARK),
            stdin=self.private_key + "\n",
        )
        _run("ip", "link", "set", self.ifname, "mtu", str(self.mtu), "up")
        _run("sysctl", "-q", "-w", f"net.ipv4.conf.{self.ifname}.rp_filter=0")
        return impl

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.ifname], capture_output=True)
        if self.userspace is not None:
            self.userspace.terminate()
            try:
                self.userspace.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.userspace.kill()
                self.userspace.wait()
            self.userspace = None

    def peers(self) -> dict[str, tuple[frozenset[str], str]]:
        """public key -> (allowed-IPs, endpoint) as WireGuard has them now."""
        out = _run("wg", "show", self.ifname, "dump", check=False)
        peers = {}
        for line in out.splitlines()[1:]:
            cols = line.split("\t")
            if len(cols) >= 4:
                allowed = frozenset(a for a in cols[3].split(",") if a and a != "(none)")
                peers[cols[0]] = (allowed, cols[2])
        return peers


def desired_peers(
    objects: list[dict], local: str, tunnel: bool = False
) -> dict[str, tuple[frozenset[str], str]]:
    """What Cilium would configure: one peer per other node with a published key. In tunnel
    mode (Cilium >= 1.17) the allowed-IPs hold the node addresses only."""
    peers = {}
    for obj in objects:
        info, _ = parse_ciliumnode(obj)
        if info is None or info.name == local or not info.wg_public_key:
            continue
        addrs = [a for _, a in info.addresses]
        allowed = {str(ipaddress.ip_network(a)) for a in addrs}
        if not tunnel:
            allowed |= {str(c) for c in info.pod_cidrs}
        v4 = [a for a in addrs if a.version == 4]
        endpoint = f"{v4[0]}:{WG_PORT}" if v4 else (f"[{addrs[0]}]:{WG_PORT}" if addrs else "")
        peers[info.wg_public_key] = (frozenset(allowed), endpoint)
    return peers


def pod_cidrs(objects: list[dict], local: str) -> tuple[list, list, list, list]:
    """(local pod CIDRs, remote pod CIDRs, [(remote IPv4, its addresses, its pod CIDRs)],
    local addresses)."""
    own, remote, nodes, own_ips = [], [], [], []
    for obj in objects:
        info, _ = parse_ciliumnode(obj)
        if info is None:
            continue
        addrs = tuple(a for _, a in info.addresses)
        if info.name == local:
            own += list(info.pod_cidrs)
            own_ips += list(addrs)
            continue
        remote += list(info.pod_cidrs)
        v4 = [a for a in addrs if a.version == 4]
        if v4:
            nodes.append((v4[0], addrs, tuple(info.pod_cidrs)))
    return own, remote, nodes, own_ips


class StandIn:
    def __init__(
        self,
        node: str,
        api: KubeApi,
        device: WgDevice,
        poll: float,
        republish_delay: float,
        datapath=None,
        routing: str = "native",
    ):
        self.node = node
        self.api = api
        self.device = device
        self.poll = poll
        self.republish_delay = republish_delay
        self.wake = threading.Event()
        self.reboot_requested = False
        self.toggle_requested = False
        self.stop_requested = False
        self.down = False
        self.published = ""
        self.publish_after = 0.0
        self.datapath = datapath
        """standin_datapath.StandinDatapath, or None (no BPF programs)."""
        self.routing = routing
        self.restart_requested = False

    def on_signal(self, signum, _frame) -> None:
        if signum == signal.SIGUSR1:
            self.reboot_requested = True
        elif signum == signal.SIGHUP:
            self.publish_after = 0.0
        elif signum == signal.SIGUSR2:
            self.toggle_requested = True
        elif signum == signal.SIGWINCH:
            self.restart_requested = True
        else:
            self.stop_requested = True
        self.wake.set()

    def bring_up(self) -> None:
        impl = self.device.create()
        log.info(
            "device created",
            extra=kv(ifname=self.device.ifname, impl=impl, public_key=self.device.public_key),
        )

    def publish(self) -> None:
        if self.published == self.device.public_key or time.monotonic() < self.publish_after:
            return
        self.api.annotate(self.node, WG_PUBKEY_ANNOTATION, self.device.public_key)
        self.published = self.device.public_key
        log.info("public key published", extra=kv(node=self.node, public_key=self.published))

    def sync_peers(self) -> None:
        objects = self.api.list_ciliumnodes()
        self.sync_datapath(objects)
        want = desired_peers(objects, self.node, tunnel=self.routing == "tunnel")
        have = self.device.peers()
        for key in have.keys() - want.keys():
            _run("wg", "set", self.device.ifname, "peer", key, "remove")
            log.info("peer removed", extra=kv(public_key=key))
        for key, (allowed, endpoint) in want.items():
            if have.get(key) == (allowed, endpoint):
                continue
            _run(
                "wg",
                "set",
                self.device.ifname,
                "peer",
                key,
                "allowed-ips",
                ",".join(sorted(allowed)),
                "endpoint",
                endpoint,
            )
            log.info(
                "peer configured",
                extra=kv(public_key=key, endpoint=endpoint, allowed_ips=",".join(sorted(allowed))),
            )

    def sync_datapath(self, objects: list[dict]) -> None:
        own, remote, nodes, own_ips = pod_cidrs(objects, self.node)
        if self.datapath is not None:
            self.datapath.sync(own, remote)
        if self.routing == "tunnel":
            v4 = [a for a in own_ips if a.version == 4]
            if v4:
                standin_tunnel.ensure_device(v4[0], self.device.mtu - standin_tunnel.VXLAN_OVERHEAD)
                standin_tunnel.sync(own_ips, own, nodes)

    def handle_requests(self) -> None:
        if self.restart_requested:
            self.restart_requested = False
            if self.datapath is not None:
                self.datapath.reload()
        if self.reboot_requested:
            self.reboot_requested = False
            self.device.delete()
            self.device.new_key()
            self.bring_up()
            self.down = False
            self.publish_after = time.monotonic() + self.republish_delay
            log.info("rebooted", extra=kv(republish_in=self.republish_delay))
        if self.toggle_requested:
            self.toggle_requested = False
            if self.down:
                self.bring_up()
                self.down = False
            else:
                self.device.delete()
                self.down = True
                log.info("device removed", extra=kv(ifname=self.device.ifname))

    def run(self) -> int:
        self.device.new_key()
        self.bring_up()
        try:
            if self.datapath is not None:
                self.datapath.start()
                log.info(
                    "datapath attached",
                    extra=kv(links=self.datapath.link_ids(), tcx=self.datapath.tcx),
                )
            while not self.stop_requested:
                self.handle_requests()
                if not self.down:
                    try:
                        self.publish()
                        self.sync_peers()
                    except (ApiError, RuntimeError) as e:
                        log.warning("sync failed; retrying", extra=kv(error=str(e)))
                self.wake.wait(self.poll)
                self.wake.clear()
        finally:
            if self.datapath is not None:
                self.datapath.close()
            standin_tunnel.delete()
            self.device.delete()
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m nodecryptor_testkit.lab.standin",
        description="Cilium stand-in of one lab node (see module doc).",
    )
    p.add_argument("--node", required=True)
    p.add_argument("--server", required=True, help="API server URL")
    p.add_argument("--token", required=True)
    p.add_argument("--ifname", default="cilium_wg0")
    p.add_argument("--wg-impl", choices=("auto", "kernel", "go"), default="auto")
    p.add_argument(
        "--mtu",
        type=int,
        default=WG_MTU,
        help=f"device MTU (default: underlay {UNDERLAY_MTU} - 95 = %(default)s)",
    )
    p.add_argument("--poll", type=float, default=0.25, help="seconds between API polls")
    p.add_argument(
        "--republish-delay",
        type=float,
        default=0.0,
        help="seconds between a reboot and publishing the new key (SIGHUP publishes at once)",
    )
    p.add_argument(
        "--routing",
        choices=ROUTING_MODES,
        default="native",
        help="native routing, or tunnel mode (VXLAN, node-only allowed-IPs)",
    )
    p.add_argument("--underlay", default="eth0", help="device of cil_to_netdev (tcx egress)")
    p.add_argument(
        "--pod-dev",
        default="pod0",
        help="the pod's veth, where cil_from_container runs (tcx ingress)",
    )
    p.add_argument("--no-bpf", action="store_true", help="load no BPF programs")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    args = p.parse_args(argv)
    setup(args.log_format)
    datapath = None
    if not args.no_bpf:
        from .standin_datapath import StandinDatapath

        datapath = StandinDatapath(
            args.underlay, args.pod_dev, args.ifname, native=args.routing == "native"
        )
    standin = StandIn(
        args.node,
        KubeApi(args.server, args.token),
        WgDevice(args.ifname, args.wg_impl, args.mtu),
        args.poll,
        args.republish_delay,
        datapath=datapath,
        routing=args.routing,
    )
    for sig in (
        signal.SIGUSR1,
        signal.SIGUSR2,
        signal.SIGHUP,
        signal.SIGTERM,
        signal.SIGINT,
        signal.SIGWINCH,
    ):
        signal.signal(sig, standin.on_signal)
    return standin.run()


if __name__ == "__main__":
    sys.exit(main())
