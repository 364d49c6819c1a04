"""Control plane at scale: the real agent (``nodecryptor run``) against the fake API server,
both as processes, each in its own network namespace joined by a veth underlay.

Measured for one datapath and one cluster size:

* ``ready_s``: from spawning the agent to the first ``/readyz`` 200 (Python start-up, BCC
  compile and load, the paged list of every CiliumNode, device detection, the first apply);
* ``rss_mb``: the agent's VmRSS once it has settled after the churn (median of samples);
* ``peak_rss_mb``: VmHWM at the end of the run (the peak over its whole life);
* ``cpu_ms_per_event``: the agent's user+system CPU during the churn divided by the changes;
* event -> datapath latency under churn (``p50_ms``, ``p99_ms``): CiliumNodes are created and
  deleted through the API at a fixed rate (every other change deletes the oldest churn node
  already seen in the datapath, when there is one); each change is timed from just before its
  HTTP request until the node's address is seen in (or gone from) the kernel datapath:
  - BPF: the live pinned program is asked with BPF_PROG_TEST_RUN (dry run, the mechanism of
    ``nodecryptor explain``) whether a TCP packet to the address is redirected;
  - ip rules: the kernel's own route lookup (RTM_GETROUTE, ``ip route get``) in the agent's
    namespace says whether the address is routed into the WireGuard device.
  The poller looks every ``POLL_S`` (in posting order, stopping at the first change not yet
  visible); a change not seen within ``SETTLE_TIMEOUT_S`` after the churn ended counts with
  its age at that moment as its latency.

The WireGuard device is a real ``wireguard-go`` device with one peer whose allowed IPs are
0.0.0.0/0 and ::/0, so every destination counts as covered (the agent reads the peers).
"""

from __future__ import annotations

import calendar
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from nodecryptor_testkit import netns
from nodecryptor_testkit.fakeapi import make_ciliumnode

from . import cluster, observe

API_V4, AGENT_V4 = "192.168.77.10", "192.168.77.11"
API_V6, AGENT_V6 = "fd77::10", "fd77::11"
TOKEN = "nc-bench"
HEALTH = "127.0.0.1:18283"
METRICS = "127.0.0.1:18284"
POLL_S = 0.002
SETTLE_TIMEOUT_S = 10.0
READY_TIMEOUT_S = 180.0
READY_POLL_S = 0.1
NODECRYPTOR = os.path.join(os.path.dirname(sys.executable), "nodecryptor")


def churn_v4(k: int) -> str:
    """Address of churn node ``k``: 100.64.0.0/11, outside every other prefix."""
    return f"100.{64 + k // 62500}.{k // 250 % 250}.{k % 250 + 1}"


def churn_object(k: int) -> dict:
    return make_ciliumnode(
        f"churn-{k}",
        ipv4=churn_v4(k),
        ipv6=f"fd64::{k + 1:x}",
        pod_cidrs=[f"100.{96 + k // 256}.{k % 256}.0/24"],
    )


def cluster_objects(nodes: int) -> list[dict]:
    objs = [
        make_ciliumnode(
            cluster.LOCAL_NAME, ipv4=AGENT_V4, ipv6=AGENT_V6, pod_cidrs=[cluster.LOCAL_POD_V4]
        )
    ]
    for i in range(nodes):
        objs.append(
            make_ciliumnode(
                f"node-{i}",
                ipv4=cluster.node_v4(i),
                ipv6=cluster.node_v6(i),
                pod_cidrs=[cluster.pod_v4(i), cluster.pod_v6(i)],
                control_plane=i < 3,
            )
        )
    return objs


@dataclass
class Result:
    datapath: str
    nodes: int
    ready_s: float = 0.0
    rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_ms_per_event: float = 0.0
    changes: int = 0
    unseen: int = 0
    latencies_ms: list = field(default_factory=list)
    profile: str = ""
    startup: list = field(default_factory=list)
    """[(seconds after spawn, log message)] of the agent's log up to readiness."""

    def row(self) -> dict:
        return {
            "datapath": self.datapath,
            "nodes": self.nodes,
            "ready_s": round(self.ready_s, 3),
            "rss_mb": round(self.rss_mb, 1),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "p50_ms": round(self.p50_ms, 1),
            "p99_ms": round(self.p99_ms, 1),
        }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))
    return ordered[k]


class Bench:
    """One agent, one fake API server, one datapath, one cluster size."""

    def __init__(self, datapath: str, nodes: int, log=print):
        self.datapath = datapath
        self.nodes = nodes
        self.log = log
        self.tmp = tempfile.mkdtemp(prefix="nc-bench-cp-")
        self.procs: dict[str, subprocess.Popen] = {}
        self.agent_ns = netns.create("bench-cp-agent")
        self.api_ns = netns.create("bench-cp-api")
        self.wg = f"ncbw{os.getpid() % 100000}"
        self.bpffs = os.path.join(self.tmp, "bpffs")
        self.kubeconfig = os.path.join(self.tmp, "kubeconfig")
        self._mounted = False

    # ---- set-up ----------------------------------------------------------------------------
    def _sh(self, ns, *cmd):
        return netns.run(*cmd, netns=ns)

    def _spawn(self, name: str, ns: str, argv: list[str], env=None) -> subprocess.Popen:
        log = open(os.path.join(self.tmp, f"{name}.log"), "wb")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            env=dict(os.environ, **(env or {})),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def _wait(
        self,
        what: str,
        check,
        timeout: float,
        proc: subprocess.Popen | None = None,
        interval: float = 0.02,
    ):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"{what}: process exited with {proc.returncode}; log:\n{self.log_tail(proc)}"
                )
            time.sleep(interval)
        raise RuntimeError(f"timed out waiting for {what}; log:\n{self.log_tail(proc)}")

    def log_tail(self, proc) -> str:
        for name, p in self.procs.items():
            if p is proc:
                with open(os.path.join(self.tmp, f"{name}.log"), errors="replace") as f:
                    return f.read()[-4000:]
        return ""

    def setup(self) -> None:
        subprocess.run(
            [
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                self.agent_ns,
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
        for ns, v4, v6 in ((self.agent_ns, AGENT_V4, AGENT_V6), (self.api_ns, API_V4, API_V6)):
            self._sh(ns, "ip", "addr", "add", f"{v4}/24", "dev", "eth0")
            self._sh(ns, "ip", "-6", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
            self._sh(ns, "ip", "link", "set", "eth0", "up")
        # Remote node addresses are reached through eth0: the agent detects it as underlay.
        self._sh(self.agent_ns, "ip", "route", "add", "default", "via", API_V4)
        self._sh(self.agent_ns, "ip", "-6", "route", "add", "default", "via", API_V6)
        os.makedirs("/var/run/wireguard", exist_ok=True)
        wg = self._spawn(
            "wireguard-go",
            self.agent_ns,
            ["wireguard-go", "-f", self.wg],
            env={"WG_PROCESS_FOREGROUND": "1"},
        )
        sock = f"/var/run/wireguard/{self.wg}.sock"
        self._wait("wireguard-go socket", lambda: os.path.exists(sock), 10, wg)
        keys = os.path.join(self.tmp, "wg.key")
        with open(keys, "w") as f:
            f.write(
                subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
            )
        peer = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
        peer_pub = subprocess.run(
            ["wg", "pubkey"], input=peer, capture_output=True, text=True, check=True
        ).stdout.strip()
        self._sh(
            self.agent_ns,
            "wg",
            "set",
            self.wg,
            "listen-port",
            "51871",
            "fwmark",
            "0xe00",
            "private-key",
            keys,
            "peer",
            peer_pub,
            "allowed-ips",
            "0.0.0.0/0,::/0",
        )
        self._sh(self.agent_ns, "ip", "link", "set", self.wg, "mtu", "1420", "up")
        self._sh(
            self.agent_ns,
            "sysctl",
            "-qw",
            "net.ipv4.conf.all.rp_filter=0",
            f"net.ipv4.conf.{self.wg}.rp_filter=0",
        )
        os.makedirs(self.bpffs)
        subprocess.run(["mount", "-t", "bpf", "bpf", self.bpffs], check=True)
        self._mounted = True
        objects = os.path.join(self.tmp, "objects.json")
        with open(objects, "w") as f:
            json.dump(cluster_objects(self.nodes), f)
        api = self._spawn(
            "fakeapi",
            self.api_ns,
            [
                sys.executable,
                "-m",
                "nodecryptor_testkit.fakeapi",
                "--bind",
                f"{API_V4}:6443",
                "--objects",
                objects,
                "--token",
                TOKEN,
                "--write-kubeconfig",
                self.kubeconfig,
                "--history",
                "100000",
            ],
        )
        self._wait("fake API server", lambda: os.path.exists(self.kubeconfig), 60, api)

    # ---- measurement ---------------------------------------------------------------------
    def _readyz(self) -> bool:
        # A generous timeout and a pause between probes: on the ip-rule datapath a probe reads
        # the whole route table under the datapath's lock, and probes piling up behind a slow
        # one would slow the very start-up being measured.
        try:
            with urllib.request.urlopen(f"http://{HEALTH}/readyz", timeout=60) as r:
                return r.status == 200
        except Exception:  # connection refused while starting, 503 while not ready
            return False

    def startup_phases(self, spawned_wall: float, ready_s: float) -> list:
        """The agent's own log lines up to readiness, as (seconds after spawn, message): where
        the start-up time goes (compile, list, first apply) without a profiler."""
        phases = []
        try:
            with open(os.path.join(self.tmp, "agent.log"), errors="replace") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        ts = rec["ts"]
                        wall = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S"))
                        wall += float("0" + ts[19:].rstrip("Z")) if ts[19:20] == "." else 0.0
                    except (ValueError, KeyError, TypeError):
                        continue
                    offset = wall - spawned_wall
                    if offset > ready_s + 0.5:
                        break
                    extra = {
                        k: v
                        for k, v in rec.items()
                        if k in ("nodes", "pages", "seconds", "routes", "datapath")
                    }
                    phases.append(
                        [
                            round(offset, 2),
                            rec.get("msg", "") + (f" {json.dumps(extra)}" if extra else ""),
                        ]
                    )
        except OSError:
            pass
        return phases

    def start_agent(self, agent_ns_worker: observe.InNetns) -> float:
        self.spawned_wall = time.time()
        started = time.monotonic()
        agent = self._spawn(
            "agent",
            self.agent_ns,
            [
                NODECRYPTOR,
                "run",
                "--kubeconfig",
                self.kubeconfig,
                "--node-name",
                cluster.LOCAL_NAME,
                "--bpffs",
                self.bpffs,
                "--datapath",
                self.datapath,
                "--wg-interface",
                self.wg,
                "--health-probe-bind-address",
                HEALTH,
                "--metrics-server-bind-address",
                METRICS,
                "--log-format",
                "json",
            ],
        )
        self._wait(
            "agent /readyz",
            lambda: agent_ns_worker.call(self._readyz),
            READY_TIMEOUT_S,
            agent,
            interval=READY_POLL_S,
        )
        return time.monotonic() - started

    def run(
        self,
        churn_seconds: float,
        rate: float = 50.0,
        settle_s: float = 2.0,
        profile: str | None = None,
    ) -> Result:
        res = Result(self.datapath, self.nodes)
        agent_worker = observe.InNetns(self.agent_ns)
        api_worker = observe.InNetns(self.api_ns)
        probe = None
        try:
            res.ready_s = self.start_agent(agent_worker)
            res.startup = self.startup_phases(self.spawned_wall, res.ready_s)
            pid = self.procs["agent"].pid
            self.log(
                f"  control plane {self.datapath} {self.nodes} nodes: ready in {res.ready_s:.2f} s"
            )
            time.sleep(settle_s)
            if self.datapath == "bpf":
                probe = observe.BpfProbe(self.bpffs, AGENT_V4)
                check = probe.present
            else:
                probe = agent_worker.call(lambda: observe.RouteProbe(self.wg))
                # A lambda, like the other branch's bound method: ``check`` is one name.
                check = lambda addr: agent_worker.call(lambda: probe.present(addr))  # noqa: E731
            spy = None
            if profile:
                # --gil: only samples holding the GIL, i.e. Python actually computing (a
                # thread blocked in select() or a socket read does not count).
                spy = subprocess.Popen(
                    [
                        observe.py_spy(),
                        "record",
                        "--gil",
                        "-p",
                        str(pid),
                        "-o",
                        profile,
                        "-f",
                        "speedscope",
                        "-d",
                        str(int(churn_seconds) + 2),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            cpu0 = observe.cpu_seconds(pid)
            lat, unseen, changes = self._churn(api_worker, check, churn_seconds, rate)
            cpu1 = observe.cpu_seconds(pid)
            if spy is not None:
                spy.wait(60)
                res.profile = profile
            res.changes, res.unseen, res.latencies_ms = changes, unseen, lat
            res.cpu_ms_per_event = (cpu1 - cpu0) * 1000 / max(changes, 1)
            res.p50_ms = _percentile(lat, 0.50)
            res.p99_ms = _percentile(lat, 0.99)
            time.sleep(settle_s)
            samples = []
            for _ in range(5):
                samples.append(observe.proc_status(pid)["VmRSS"] / 1024)
                time.sleep(0.2)
            res.rss_mb = statistics.median(samples)
            res.peak_rss_mb = observe.proc_status(pid)["VmHWM"] / 1024
        finally:
            if probe is not None:
                if self.datapath == "bpf":
                    probe.close()
                else:
                    agent_worker.call(probe.close)
            agent_worker.close()
            api_worker.close()
        return res

    def _churn(self, api_worker: observe.InNetns, present, seconds: float, rate: float):
        """Create and delete CiliumNodes at ``rate`` per second for ``seconds``; return
        (latencies in ms, changes never seen, number of changes)."""
        conn = api_worker.call(lambda: http.client.HTTPConnection(API_V4, 6443, timeout=10))
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        path = "/apis/cilium.io/v2/ciliumnodes"

        def request(method, url, body=None):
            def go():
                conn.request(method, url, body=json.dumps(body) if body else None, headers=headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status >= 300:
                    raise RuntimeError(f"{method} {url}: HTTP {resp.status}")

            api_worker.call(go)

        pending: list = []  # [want_present, address, posted_at, churn index]
        seen_created: set[int] = set()
        lock = threading.Lock()
        latencies: list[float] = []
        done = threading.Event()

        def poll():
            # Changes reach the datapath in the order they were made (the watch delivers them
            # in order and every pass applies a snapshot holding a prefix of them), so a sweep
            # stops at the oldest change not yet seen: it costs one lookup while nothing moves
            # and the poller does not compete with the agent for the CPU.
            while not done.is_set() or pending:
                while True:
                    with lock:
                        item = pending[0] if pending else None
                    if item is None:
                        break
                    want, addr, posted, index = item
                    if present(addr) != want:
                        break
                    latencies.append((time.monotonic() - posted) * 1000)
                    with lock:
                        pending.pop(0)
                        if want:
                            seen_created.add(index)
                if done.is_set() and time.monotonic() > done_at[0] + SETTLE_TIMEOUT_S:
                    return
                time.sleep(POLL_S)

        done_at = [0.0]
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        # Churn nodes alive, oldest first. Only a node whose creation was already seen in the
        # datapath is deleted: a node created and deleted within one reconcile pass would
        # never be visible, and its creation could not be timed.
        live: list[int] = []
        k = 0
        changes = 0
        start = time.monotonic()
        try:
            while True:
                due = start + changes / rate
                now = time.monotonic()
                if due > start + seconds:
                    break
                if due > now:
                    time.sleep(due - now)
                with lock:
                    victim = next((v for v in live if v in seen_created), None)
                if changes % 2 == 1 and victim is not None:
                    live.remove(victim)
                    posted = time.monotonic()
                    request("DELETE", f"{path}/churn-{victim}")
                    with lock:
                        pending.append([False, churn_v4(victim), posted, victim])
                else:
                    obj = churn_object(k)
                    posted = time.monotonic()
                    request("POST", path, obj)
                    with lock:
                        pending.append([True, churn_v4(k), posted, k])
                    live.append(k)
                    k += 1
                changes += 1
        finally:
            done_at[0] = time.monotonic()
            done.set()
            poller.join(SETTLE_TIMEOUT_S + 5)
            api_worker.call(conn.close)
        unseen = len(pending)
        gave_up = time.monotonic()
        latencies.extend((gave_up - posted) * 1000 for _, _, posted, _ in pending)
        return latencies, unseen, changes

    # ---- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        for name in ("agent", "fakeapi", "wireguard-go"):
            proc = self.procs.pop(name, None)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        if self._mounted:
            netns.run(
                NODECRYPTOR,
                "cleanup",
                "--bpffs",
                self.bpffs,
                netns=self.agent_ns,
                check=False,
                timeout=60,
            )
            subprocess.run(["umount", self.bpffs], check=False)
        sock = f"/var/run/wireguard/{self.wg}.sock"
        if os.path.exists(sock):
            os.unlink(sock)
        netns.delete(self.agent_ns)
        netns.delete(self.api_ns)
        subprocess.run(["rm", "-rf", self.tmp], check=False)


def measure(
    datapath: str, nodes: int, churn_seconds: float, log=print, profile: str | None = None
) -> Result:
    bench = Bench(datapath, nodes, log=log)
    try:
        bench.setup()
        return bench.run(churn_seconds, profile=profile)
    finally:
        bench.close()
