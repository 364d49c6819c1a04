"""Threads, file descriptors and answer times of a real `nodecryptor run` while its health and
metrics ports are flooded with idle and slowloris connections (one byte a second).

Runs the fake API server and the agent (ip-rule datapath, a private --bpffs directory) in a
throwaway network namespace, removed at the end with everything in it. Needs root.

    sudo .venv/bin/python benchmarks/endpoint_flood.py [--connections 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nodecryptor_testkit import netns

BIN = os.path.dirname(sys.executable)
HEALTH, METRICS = 18083, 18084


def proc_stat(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/status") as f:
        threads = next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    return threads, len(os.listdir(f"/proc/{pid}/fd"))


def get_ms(port: int, path: str) -> tuple[int, float]:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as r:
        r.read()
        return r.status, (time.monotonic() - started) * 1000


def flood(agent_pid: int, connections: int, seconds: int) -> None:
    """Runs inside the namespace: ``connections`` per port, every other one trickling."""
    socks = []
    for port in (HEALTH, METRICS):
        for _ in range(connections):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            socks.append(s)
    print(f"{connections} connections per port opened (half idle, half sending a byte a second)")
    for second in range(seconds):
        time.sleep(1)
        for s in socks[1::2]:
            try:
                s.send(b"G")
            except OSError:
                pass  # closed by the server: its deadline passed, or it was evicted
        threads, fds = proc_stat(agent_pid)
        h = get_ms(HEALTH, "/healthz")
        m = get_ms(METRICS, "/metrics")
        print(
            f"  t={second + 1:2d}s agent threads {threads:3d} fds {fds:4d}  "
            f"/healthz {h[0]} {h[1]:6.1f} ms  /metrics {m[0]} {m[1]:6.1f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--flood-agent", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood_agent:
        flood(args.flood_agent, args.connections, args.seconds)
        return 0
    print(f"host: {platform.node()} {platform.release()}, {os.cpu_count()} CPUs")
    ns = netns.create("flood")
    procs = []
    with tempfile.TemporaryDirectory(prefix="nc-flood-") as tmp:
        try:
            kubeconfig = os.path.join(tmp, "kubeconfig")
            objects = os.path.join(REPO, "nodecryptor", "examples", "cluster.json")
            node = json.load(open(objects))[1]["metadata"]["name"]
            procs.append(
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        sys.executable,
                        "-m",
                        "nodecryptor_testkit.fakeapi",
                        "--bind",
                        "127.0.0.1:16443",
                        "--objects",
                        objects,
                        "--token",
                        "t",
                        "--write-kubeconfig",
                        kubeconfig,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            while not os.path.exists(kubeconfig):
                time.sleep(0.1)
            bpffs = os.path.join(tmp, "bpffs")  # unused by the ip-rule datapath; private anyway
            os.mkdir(bpffs)
            agent = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    os.path.join(BIN, "nodecryptor"),
                    "run",
                    "--kubeconfig",
                    kubeconfig,
                    "--node-name",
                    node,
                    "--datapath",
                    "iprule",
                    "--bpffs",
                    bpffs,
                    "--health-probe-bind-address",
                    f"127.0.0.1:{HEALTH}",
                    "--metrics-server-bind-address",
                    f"127.0.0.1:{METRICS}",
                ],
                env=dict(os.environ, NODECRYPTOR_RUN_DIR=tmp),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(agent)
            deadline = time.monotonic() + 30
            while True:
                try:
                    netns.run(
                        sys.executable,
                        "-c",
                        "import urllib.request as u; "
                        f"u.urlopen('http://127.0.0.1:{HEALTH}/healthz', timeout=2)",
                        netns=ns,
                    )
                    break
                except subprocess.CalledProcessError as e:
                    if time.monotonic() > deadline:
                        raise SystemExit("the agent did not come up") from e
                    time.sleep(0.5)
            threads, fds = proc_stat(agent.pid)
            print(f"agent up: threads {threads}, fds {fds}")
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    ns,
                    sys.executable,
                    os.path.abspath(__file__),
                    "--flood-agent",
                    str(agent.pid),
                    "--connections",
                    str(args.connections),
                    "--seconds",
                    str(args.seconds),
                ],
                check=True,
            )
        finally:
            for p in reversed(procs):
                p.terminate()
                p.wait(10)
            netns.delete(ns)  # takes the agent's rules and routes with it
    return 0


if __name__ == "__main__":
    sys.exit(main())
