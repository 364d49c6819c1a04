"""`nodecryptor run` as a process: a node namespace with a wireguard-go device and the fake API
server in a second namespace (reached over the underlay, as the workers reach a real
kube-apiserver). Checks readiness, that an API outage and an agent exit leave protection in
place, and that the agent converges after the API server comes back with changes."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys

import pytest

from nodecryptor_testkit.fakeapi import make_ciliumnode, make_node
from nodecryptor_testkit import netns as netns_mod
from nodecryptor_testkit.wait import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODECRYPTOR = os.path.join(os.path.dirname(sys.executable), "nodecryptor")

pytestmark = [pytest.mark.privileged, pytest.mark.slow]


def cluster(workers=("w1", "w2", "w3")):
    # Each CiliumNode with its v1 Node: the Node is the trusted source of the role and of the
    # node addresses.
    objs = [
        make_ciliumnode(
            "cp1",
            ipv4="192.168.77.10",
            ipv6="fd77::10",
            pod_cidrs=["10.77.0.0/24"],
            control_plane=True,
        ),
        make_node("cp1", control_plane=True, ipv4="192.168.77.10", ipv6="fd77::10"),
    ]
    for i, name in enumerate(workers, start=1):
        objs.append(
            make_ciliumnode(
                name,
                ipv4=f"192.168.77.{10 + i}",
                ipv6=f"fd77::{10 + i}",
                pod_cidrs=[f"10.77.{i}.0/24"],
            )
        )
        objs.append(make_node(name, ipv4=f"192.168.77.{10 + i}", ipv6=f"fd77::{10 + i}"))
    return objs


def remote_prefixes(objects, local="w1") -> set[str]:
    """Every prefix the agent on ``local`` must install for ``objects``: the other nodes'
    InternalIP addresses as host prefixes and their pod CIDRs, exactly."""
    out = set()
    for obj in objects:
        if obj["metadata"]["name"] == local or obj["kind"] != "CiliumNode":
            continue
        for addr in obj["spec"].get("addresses", []):
            if addr["type"] == "InternalIP":
                out.add(f"{addr['ip']}/{128 if ':' in addr['ip'] else 32}")
        out.update(obj["spec"].get("ipam", {}).get("podCIDRs", []))
    return out


POLL = {"interval": 0.2, "ignore": (Exception,)}
"""How the agent's endpoints and commands are polled: a failure (the endpoint not up yet, a
command racing a restart) is "not yet", named in the message if time runs out."""


class Node:
    """One node namespace running the agent, and the API namespace it talks to."""

    def __init__(self, make_ns, tmp_path, datapath):
        self.tmp = tmp_path
        self.datapath = datapath
        self.ns = make_ns("agent")
        self.api_ns = make_ns("api")
        self.wg = f"ncag{os.getpid() % 10000}"
        self.procs: dict[str, subprocess.Popen] = {}

        def sh(*c, ns=None):
            return netns_mod.run(*c, netns=ns)

        subprocess.run(
            [
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                self.ns,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                self.api_ns,
            ],
            check=True,
        )
        for ns, addr in ((self.ns, "192.168.77.11"), (self.api_ns, "192.168.77.10")):
            sh("ip", "addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
            sh("ip", "link", "set", "eth0", "up", ns=ns)
        self.start(
            "wg", ["wireguard-go", "-f", self.wg], ns=self.ns, env={"WG_PROCESS_FOREGROUND": "1"}
        )
        wait_for(
            lambda: os.path.exists(f"/var/run/wireguard/{self.wg}.sock"),
            20,
            "wireguard-go socket",
            interval=0.2,
        )
        key = tmp_path / "wg.key"
        key.write_text(subprocess.run(["wg", "genkey"], capture_output=True, text=True).stdout)
        sh(
            "wg",
            "set",
            self.wg,
            "listen-port",
            "51871",
            "fwmark",
            "0xe00",
            "private-key",
            str(key),
            ns=self.ns,
        )
        sh("ip", "link", "set", self.wg, "mtu", "1420", "up", ns=self.ns)
        sh(
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.rp_filter=0",
            f"net.ipv4.conf.{self.wg}.rp_filter=0",
            ns=self.ns,
        )
        self.bpffs = str(tmp_path / "bpffs")
        os.mkdir(self.bpffs)
        subprocess.run(["mount", "-t", "bpf", "bpf", self.bpffs], check=True)
        self.kubeconfig = str(tmp_path / "kubeconfig")
        self.health = "127.0.0.1:18183"

    def start(self, name, argv, ns, env=None, log=None):
        out = open(log, "ab") if log else subprocess.DEVNULL
        self.procs[name] = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            env=dict(os.environ, **(env or {})),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        return self.procs[name]

    def stop(self, name, sig=signal.SIGTERM):
        proc = self.procs.pop(name, None)
        if proc and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc

    def start_api(self, objects):
        path = self.tmp / "objects.json"
        path.write_text(json.dumps(objects))
        if os.path.exists(self.kubeconfig):
            os.unlink(self.kubeconfig)
        self.start(
            "api",
            [
                sys.executable,
                "-m",
                "nodecryptor_testkit.fakeapi",
                "--bind",
                "192.168.77.10:6443",
                "--objects",
                str(path),
                "--token",
                "t0k",
                "--write-kubeconfig",
                self.kubeconfig,
            ],
            ns=self.api_ns,
            log=str(self.tmp / "api.log"),
        )
        wait_for(lambda: os.path.exists(self.kubeconfig), 20, "kubeconfig", interval=0.2)

    def start_agent(self):
        return self.start(
            "agent",
            [
                NODECRYPTOR,
                "run",
                "--kubeconfig",
                self.kubeconfig,
                "--node-name",
                "w1",
                "--bpffs",
                self.bpffs,
                "--datapath",
                self.datapath,
                "--wg-interface",
                self.wg,
                "--health-probe-bind-address",
                self.health,
                "--metrics-server-bind-address",
                "127.0.0.1:18184",
                "--log-format",
                "json",
            ],
            ns=self.ns,
            log=str(self.tmp / "agent.log"),
        )

    def probe(self, path):
        code = (
            "import sys,urllib.request,urllib.error\n"
            "try:\n r=urllib.request.urlopen(sys.argv[1],timeout=3)\n"
            " print(r.status, r.read().decode())\n"
            "except urllib.error.HTTPError as e: print(e.code, e.read().decode())\n"
        )
        out = netns_mod.run(
            sys.executable, "-c", code, f"http://{self.health}{path}", netns=self.ns
        ).stdout
        status, _, body = out.partition(" ")
        return int(status), json.loads(body)

    def watch_restarts(self) -> float:
        """nodecryptor_watch_restarts_total summed over causes, from the agent's /metrics."""
        code = (
            "import sys,urllib.request\n"
            "print(urllib.request.urlopen(sys.argv[1],timeout=3).read().decode())\n"
        )
        text = netns_mod.run(
            sys.executable, "-c", code, "http://127.0.0.1:18184/metrics", netns=self.ns
        ).stdout
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("nodecryptor_watch_restarts_total{")
        )

    def cli(self, *args):
        out = netns_mod.run(NODECRYPTOR, *args, "--bpffs", self.bpffs, netns=self.ns, check=False)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def installed_prefixes(self) -> set[str]:
        if self.datapath == "bpf":
            dump = self.cli("bpf", "dump", "--json")
            return {d["prefix"] for d in dump["maps"]["destinations"]}
        # Every route in nodecryptor's tables is a destination (unicast via WireGuard, or
        # unreachable while no peer covers it under fail-closed; a remote pod CIDR's guard
        # sits in the guard table).
        status = self.cli("status", "--json", "--wg-interface", self.wg)
        prefixes = set()
        for family, table in itertools.product(
            ("-4", "-6"), (status["table"], status["guard_table"])
        ):
            out = netns_mod.run(
                "ip", "-j", family, "route", "show", "table", str(table), netns=self.ns
            ).stdout
            for route in json.loads(out or "[]"):
                dst = route["dst"]
                prefixes.add(dst if "/" in dst else f"{dst}/{32 if family == '-4' else 128}")
        return prefixes

    def close(self):
        for name in list(self.procs):
            self.stop(name, signal.SIGKILL if name == "agent" else signal.SIGTERM)
        netns_mod.run(NODECRYPTOR, "cleanup", "--bpffs", self.bpffs, netns=self.ns, check=False)
        subprocess.run(["umount", self.bpffs], check=False)
        sock = f"/var/run/wireguard/{self.wg}.sock"
        if os.path.exists(sock):
            os.unlink(sock)


@pytest.fixture(params=["bpf", "iprule"])
def node(request, netns, tmp_path, wireguard_go):
    if request.param == "bpf":
        request.getfixturevalue("bcc_available")
    n = Node(netns, tmp_path, request.param)
    yield n
    n.close()
    log = tmp_path / "agent.log"
    if log.exists():  # shown by pytest only when the test failed
        print(log.read_text()[-8000:])


def test_agent_lifecycle(node):
    node.start_api(cluster())
    node.start_agent()
    wait_for(
        lambda: (
            node.probe("/readyz") == (200, {"ok": True, "reason": "synced, applied and attached"})
        ),
        20,
        "readiness",
        **POLL,
    )
    assert node.probe("/healthz")[0] == 200
    status = node.cli("status", "--json", "--wg-interface", node.wg)
    assert (status["datapath"], status["ready"]) == (node.datapath, True), status
    want = remote_prefixes(cluster())
    assert {"192.168.77.10/32", "192.168.77.12/32", "192.168.77.13/32"} <= want
    wait_for(lambda: node.installed_prefixes() == want, 20, "remote node prefixes", **POLL)

    # API outage the agent notices (the server is gone: its watch breaks and every retry is
    # refused): the agent keeps its last state and stays ready.
    restarts = node.watch_restarts()
    node.stop("api", signal.SIGKILL)
    wait_for(lambda: node.watch_restarts() > restarts, 30, "the agent to see the outage", **POLL)
    assert node.probe("/readyz")[0] == 200
    assert node.installed_prefixes() == want

    # The API server comes back with w3 gone: the agent re-lists and prunes w3, exactly.
    node.start_api(cluster(workers=("w1", "w2")))
    want = remote_prefixes(cluster(workers=("w1", "w2")))
    wait_for(lambda: node.installed_prefixes() == want, 60, "w3 pruned", **POLL)

    # SIGTERM and SIGKILL: the datapath stays installed (fail-static) with the last state.
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = node.stop("agent", sig)
        assert proc.returncode == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        assert node.installed_prefixes() == want
        node.start_agent()
        wait_for(lambda: node.probe("/readyz")[0] == 200, 20, "readiness after restart", **POLL)
