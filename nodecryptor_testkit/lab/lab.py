"""Bring a lab up, drive its processes, and take it down again.

``Lab.up`` builds the topology, starts the fake kube-apiserver inside the first control-plane
node (on its node address, port 6443, as a real apiserver listens), a Cilium stand-in and
nodecryptor on every node, echo servers on every node, pod and the external host, and waits
until WireGuard peers are configured and every agent reports ready. ``Lab.down`` removes all of
it (also after a failure half-way). Everything created is listed in a ``LabState`` first.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable

from nodecryptor.core.log import kv
from .flows import PortAllocator
from . import topology as topo
from .inside import API_TOKEN, PY, LabAccess, child_env
from .spec import (
    API_PORT,
    EXEMPT_TCP_PORTS,
    ROUTING_MODES,
    SERVICE_TCP_PORT,
    SERVICE_UDP_PORT,
    LabSpec,
    NodeSpec,
    cilium_config_object,
    ciliumnode_object,
    node_object,
)
from .state import STATE_DIR, LabState, delete_netns, reap, reap_stale
from ..wait import WaitTimeout, wait_for
from .topology import LabError, NodeHandle

log = logging.getLogger(__name__)

HEALTH_BIND = "127.0.0.1:9883"
METRICS_BIND = "127.0.0.1:9884"


class Lab(LabAccess):
    def __init__(
        self,
        spec: LabSpec,
        datapath: str = "bpf",
        wg_impl: str = "auto",
        progress: Callable[[str], None] | None = None,
        state_dir: str = STATE_DIR,
        republish_delay: float = 60.0,
        start_agents: bool = True,
        routing: str = "native",
        agent_commands: dict[str, Callable[[NodeHandle, list[str]], list[str]]] | None = None,
    ):
        if datapath not in ("bpf", "iprule"):
            raise ValueError(f"datapath {datapath!r}: expected bpf or iprule")
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing {routing!r}: expected one of {', '.join(ROUTING_MODES)}")
        self.routing = routing
        """Cilium's routing mode the stand-ins play: "native" (pod CIDRs routed over the
        underlay) or "tunnel" (pod traffic in VXLAN, peers' allowed-IPs node addresses only)."""
        self.spec = spec
        self.datapath = datapath
        self.wg_impl = wg_impl
        self.progress = progress or (lambda msg: None)
        self.state_dir = state_dir
        self.republish_delay = republish_delay
        """After a simulated reboot a stand-in publishes its new key when the scenario says so
        (SIGHUP), or after this many seconds as a safety net."""
        self.start_agents = start_agents
        """False: build everything but nodecryptor (shows what leaks without it)."""
        self.agent_commands = dict(agent_commands or {})
        """node name -> f(node, the agent's usual argv) giving the argv that starts that node's
        agent instead (e.g. in a container). It runs in the host's namespaces: f enters the
        node's network namespace itself."""
        self.state: LabState | None = None
        self.workdir = ""
        self.underlay = ""
        self.external = ""
        self.nodes: dict[str, NodeHandle] = {}
        self.agents: dict[str, subprocess.Popen] = {}
        self.standins: dict[str, subprocess.Popen] = {}
        self.api_proc: subprocess.Popen | None = None
        self.api_url = ""
        self.build_seconds = 0.0
        self.children: list[subprocess.Popen] = []
        self.ingress_enforcement: str | None = None
        """--ingress-enforcement given to agents started from now on (None: the default)."""
        self.ports = PortAllocator(first=33000, last=34000)
        """Source ports of the lab's own checks, apart from the scenarios' range."""

    # ---------------------------------------------------------------- bring-up / tear-down

    def up(self) -> "Lab":
        start = time.monotonic()
        stale = reap_stale(self.state_dir)
        if stale:
            self.progress(f"removed {len(stale)} lab(s) left by crashed runs")
        self.state = LabState.new(self.state_dir)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self.build_seconds = time.monotonic() - start
        return self

    def _build(self) -> None:
        state = self.state
        self.workdir = os.path.join(self.state_dir, f"{state.name}-work")
        os.makedirs(self.workdir, exist_ok=True)
        state.add_directory(self.workdir)
        self.progress(
            f"underlay bridge and {len(self.spec.nodes)} nodes "
            f"({', '.join(n.name for n in self.spec.nodes)})"
        )
        self.underlay = topo.build_underlay(state)
        self.external = topo.build_external(state, self.underlay, self.spec)
        for node in self.spec.nodes:
            self.nodes[node.name] = topo.build_node(state, self.underlay, node, self.workdir)
        if self.routing == "native":  # in tunnel mode the stand-ins route pods into VXLAN
            for handle in self.nodes.values():
                topo.route_pods(handle, self.spec)
        self._start_servers()
        self.progress(
            "fake kube-apiserver on "
            f"{self.spec.control_plane[0].name} {self.spec.control_plane[0].ipv4}:"
            f"{API_PORT}"
        )
        self._start_api()
        self.progress("Cilium stand-ins: cilium_wg0 and key exchange through the API")
        for name in self.nodes:
            self.start_standin(name)
        self.wait_peers()
        if self.start_agents:
            self.progress(f"nodecryptor ({self.datapath} datapath) on every node")
            for name in self.nodes:
                self.start_agent(name)
            for name in self.nodes:
                self.wait_agent_ready(name)
            self.warm_up()
        state.info = {
            "datapath": self.datapath,
            "routing": self.routing,
            "api": self.api_url,
            "underlay": self.underlay,
            "nodes": {
                n: {
                    "netns": h.netns,
                    "pod_netns": h.pod_netns,
                    "holder_pid": h.holder_pid,
                    "bpffs": h.bpffs,
                }
                for n, h in self.nodes.items()
            },
        }
        state.save()

    def down(self) -> None:
        if self.state is not None:
            reap(self.state)
            self.state = None
        # Collect the exit status of every child, so none lingers as a zombie in this process.
        for proc in self.children + [h.holder for h in self.nodes.values()]:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.children.clear()

    def keep(self) -> None:
        """Leave the lab up after this process exits (``nodecryptor-demo --down`` removes it)."""
        if self.state is not None:
            self.state.kept = True
            self.state.save()

    def __enter__(self) -> "Lab":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # ---------------------------------------------------------------- processes

    def spawn(
        self,
        argv: list[str],
        what: str,
        log_name: str,
        node: str | None = None,
        netns: str | None = None,
    ) -> subprocess.Popen:
        """Start a long-lived process inside ``node`` (its network and mount namespaces) or
        ``netns``; its output goes to ``<workdir>/<log_name>.log``."""
        if node is not None:
            prefix = self.nodes[node].enter()
        elif netns is not None:
            prefix = ["ip", "netns", "exec", netns]
        else:
            prefix = []
        path = os.path.join(self.workdir, f"{log_name}.log")
        with open(path, "ab") as out:
            # A session of its own: Ctrl-C at the terminal reaches only the demo, which then
            # removes the lab in order, and a kept lab survives the demo's exit.
            proc = subprocess.Popen(
                prefix + argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.workdir,
                env=child_env(),
            )
        self.state.add_process(proc.pid, what)
        self.children.append(proc)
        return proc

    def log_tail(self, log_name: str, lines: int = 15) -> str:
        """The end of a process's log (the work directory goes away with the lab)."""
        try:
            with open(os.path.join(self.workdir, f"{log_name}.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError as e:
            return f"(no log: {e})"

    def stop(
        self, proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0
    ) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.state.forget_process(proc.pid)

    def _start_servers(self) -> None:
        self.spawn(self._echo_argv(), "echo server ext", "ext-echo", netns=self.external)
        for name in self.nodes:
            self.start_echo(name)
        for name in self.nodes:
            wait_for(
                lambda n=name: self._listening(self.nodes[n].netns, SERVICE_TCP_PORT),
                10,
                f"echo server of {name}",
            )

    def _echo_argv(self, api_node: bool = False) -> list[str]:
        every = (SERVICE_TCP_PORT, *EXEMPT_TCP_PORTS)
        argv = [
            PY,
            "-m",
            "nodecryptor_testkit.lab.probe",
            "serve",
            "--udp",
            f"{SERVICE_UDP_PORT},{API_PORT}",
        ]
        if api_node:
            # The fake API owns IPv4 port 6443 here; an IPv6-only echo server answers 6443
            # over IPv6 so both families' apiserver flows can be tried.
            return argv + [
                "--tcp",
                ",".join(str(p) for p in every if p != API_PORT),
                "--tcp6-only",
                str(API_PORT),
            ]
        return argv + ["--tcp", ",".join(map(str, every))]

    def start_echo(self, name: str) -> None:
        """Echo servers on node ``name`` and on its pod."""
        api_node = name == self.spec.control_plane[0].name
        self.spawn(self._echo_argv(api_node), f"echo server {name}", f"{name}-echo", node=name)
        self.spawn(
            self._echo_argv(),
            f"echo server {name} pod",
            f"{name}-pod-echo",
            netns=self.nodes[name].pod_netns,
        )

    @staticmethod
    def _listening(netns: str, port: int) -> bool:
        out = topo.sh("ss", "-Hltn", f"sport = :{port}", netns=netns, check=False).stdout
        return bool(out.strip())

    def _start_api(self) -> None:
        cp = self.spec.control_plane[0]
        objects = os.path.join(self.workdir, "ciliumnodes.json")
        with open(objects, "w") as f:
            # A Node per node too: the agents take the control-plane role from Node labels.
            json.dump(
                [ciliumnode_object(n) for n in self.spec.nodes]
                + [node_object(n) for n in self.spec.nodes]
                + [cilium_config_object()],
                f,
                indent=1,
            )
        kubeconfig = os.path.join(self.workdir, "kubeconfig")
        self.api_proc = self.spawn(
            [
                PY,
                "-m",
                "nodecryptor_testkit.fakeapi",
                "--bind",
                f"{cp.ipv4}:{API_PORT}",
                "--objects",
                objects,
                "--token",
                API_TOKEN,
                "--write-kubeconfig",
                kubeconfig,
            ],
            "fake kube-apiserver",
            "apiserver",
            node=cp.name,
        )
        self.api_url = f"http://{cp.ipv4}:{API_PORT}"
        wait_for(
            lambda: os.path.exists(kubeconfig) or self.api_proc.poll() is not None,
            15,
            "the fake kube-apiserver",
        )
        if self.api_proc.poll() is not None:
            raise LabError(
                f"fake kube-apiserver exited ({self.api_proc.returncode}):\n"
                + self.log_tail("apiserver")
            )
        with open(kubeconfig) as f:
            self.api_url = json.load(f)["clusters"][0]["cluster"]["server"]
        for handle in self.nodes.values():
            self._node_kubeconfig(handle)

    def _node_kubeconfig(self, handle: NodeHandle) -> None:
        """One kubeconfig per node, as each node's agent would have its own."""
        with open(os.path.join(self.workdir, "kubeconfig")) as src:
            text = src.read()
        path = os.path.join(handle.workdir, "kubeconfig")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as dst:
            dst.write(text)

    def start_standin(self, name: str) -> None:
        self.standins[name] = self.spawn(
            [
                PY,
                "-m",
                "nodecryptor_testkit.lab.standin",
                "--node",
                name,
                "--server",
                self.api_url,
                "--token",
                API_TOKEN,
                "--wg-impl",
                self.wg_impl,
                "--republish-delay",
                str(self.republish_delay),
                "--routing",
                self.routing,
            ],
            f"cilium stand-in {name}",
            f"{name}-standin",
            node=name,
        )

    def signal_standin(self, name: str, sig: int) -> None:
        self.standins[name].send_signal(sig)

    def egress_chain(self, name: str, device: str = "eth0") -> dict:
        """Every program on ``device``'s egress hook of node ``name``, in order (names, ids)."""
        from nodecryptor.datapath.chain import egress_chain

        return topo.call_in_netns(self.nodes[name].netns, egress_chain, device)

    def wg_peers(self, name: str) -> dict[str, str]:
        """public key -> endpoint of the peers ``name``'s cilium_wg0 has (empty if no device)."""
        out = subprocess.run(
            self.nodes[name].enter() + ["wg", "show", "cilium_wg0", "endpoints"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)

    def wg_public_key(self, name: str) -> str:
        return subprocess.run(
            self.nodes[name].enter() + ["wg", "show", "cilium_wg0", "public-key"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()

    def wait_peers(self, timeout: float = 30.0) -> None:
        names = list(self.nodes)
        for name in names:
            wait_for(
                lambda n=name: len(self.wg_peers(n)) == len(names) - 1,
                timeout,
                f"WireGuard peers on {name}",
                interval=0.1,
            )

    def warm_up(self, timeout: float = 20.0) -> None:
        """Make first contact between every pair of nodes, one pair at a time, so each pair has
        its WireGuard session before scenarios send flows in parallel (simultaneous first
        handshakes from both ends can stall wireguard-go until its 5 s handshake retry)."""
        names = list(self.nodes)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                req = {
                    "id": 0,
                    "proto": "tcp",
                    "src": str(self.spec.node(a).ipv4),
                    "dst": str(self.spec.node(b).ipv4),
                    "dport": SERVICE_TCP_PORT,
                    "timeout": 0.5,
                }
                wait_for(
                    lambda r=req, n=a: self.run_flows(
                        self.nodes[n].netns, [dict(r, sport=self.ports.take())]
                    )[0]["ok"],
                    timeout,
                    f"first encrypted contact {a} -> {b}",
                )

    def agent_argv(self, name: str) -> list[str]:
        handle = self.nodes[name]
        return [
            PY,
            "-m",
            "nodecryptor.cli",
            "run",
            "--kubeconfig",
            os.path.join(handle.workdir, "kubeconfig"),
            "--node-name",
            name,
            "--bpffs",
            handle.bpffs,
            "--datapath",
            self.datapath,
            "--health-probe-bind-address",
            HEALTH_BIND,
            "--metrics-server-bind-address",
            METRICS_BIND,
            "--log-format",
            "json",
            # Each node's own records (datapath choice, exemption policy names), not the
            # host's /run/nodecryptor, which every node's agent would share.
            "--run-dir",
            self.run_dir(name),
            *(
                ("--ingress-enforcement", self.ingress_enforcement)
                if self.ingress_enforcement
                else ()
            ),
        ]

    def start_agent(self, name: str) -> None:
        argv, node = self.agent_argv(name), name
        custom = self.agent_commands.get(name)
        if custom is not None:
            argv, node = custom(self.nodes[name], argv), None
        self.agents[name] = self.spawn(argv, f"nodecryptor {name}", f"{name}-agent", node=node)

    def stop_agent(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.agents.pop(name, None)
        if proc is not None:
            self.stop(proc, sig)

    def agent_ready(self, name: str) -> bool:
        return self.http_status(self.nodes[name].netns, f"http://{HEALTH_BIND}/readyz") == 200

    def wait_agent_ready(self, name: str, timeout: float = 60.0) -> None:
        proc = self.agents[name]

        def ready() -> bool:
            if proc.poll() is not None:
                raise LabError(
                    f"nodecryptor on {name} exited ({proc.returncode}):\n"
                    + self.log_tail(f"{name}-agent")
                )
            return self.agent_ready(name)

        try:
            wait_for(ready, timeout, f"nodecryptor on {name} to become ready", interval=0.2)
        except (LabError, WaitTimeout) as e:
            if proc.poll() is not None:
                raise
            raise LabError(f"{e}; its log ends:\n" + self.log_tail(f"{name}-agent", 6)) from None

    def add_node(self, node: NodeSpec) -> NodeHandle:
        """Join a node: namespaces, routes both ways, CiliumNode object, stand-in (no agent)."""
        handle = topo.build_node(self.state, self.underlay, node, self.workdir)
        self.nodes[node.name] = handle
        self._node_kubeconfig(handle)
        self.spec = LabSpec(nodes=self.spec.nodes + (node,))
        if self.routing == "native":
            topo.route_pods(handle, self.spec)
            for other in self.nodes.values():
                topo.route_pods(other, self.spec)
        log.debug("node added", extra=kv(node=node.name, netns=handle.netns))
        return handle

    def remove_node(self, name: str) -> None:
        """Remove a node's processes and namespaces (its CiliumNode is the caller's business)."""
        self.stop_agent(name)
        proc = self.standins.pop(name, None)
        if proc is not None:
            self.stop(proc)
        handle = self.nodes.pop(name)
        self.spec = LabSpec(nodes=tuple(n for n in self.spec.nodes if n.name != name))
        for other in self.nodes.values():
            topo.unroute_pods(other, handle.spec)
        for ns in (handle.pod_netns, handle.netns):
            delete_netns(ns)  # also ends the node's holder and echo servers
        handle.holder.wait(timeout=10)
        subprocess.run(["umount", "-l", handle.bpffs], capture_output=True)
        self.state.netns = [
            n for n in self.state.netns if n not in (handle.pod_netns, handle.netns)
        ]
        self.state.save()
