"""How long a real agent with default settings takes to notice a frozen API server (one that
keeps connections open but answers nothing): the fake API server's "freeze" fault, then the
agent's nodecryptor_k8s_watch_stalls_total polled every second.

Runs the fake API server and the agent (ip-rule datapath, a private --bpffs directory) in a
throwaway network namespace, removed at the end with everything in it. Needs root; takes about
a minute.

    sudo .venv/bin/python benchmarks/api_stall.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from nodecryptor_testkit import netns

BIN = os.path.dirname(sys.executable)
API, HEALTH, METRICS = "127.0.0.1:16443", "127.0.0.1:18083", "127.0.0.1:18084"

FETCH = """
import json, sys, urllib.request
request = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer t"})
if len(sys.argv) > 2:
    request.data = sys.argv[2].encode()
    request.add_header("Content-Type", "application/json")
print(urllib.request.urlopen(request, timeout=5).read().decode())
"""


def fetch(ns: str, url: str, body: dict | None = None) -> str:
    """GET (or POST ``body``) from inside the namespace."""
    argv = [sys.executable, "-c", FETCH, url] + ([json.dumps(body)] if body is not None else [])
    return netns.run(*argv, netns=ns).stdout


def stalls(ns: str) -> float:
    for line in fetch(ns, f"http://{METRICS}/metrics").splitlines():
        if line.startswith("nodecryptor_k8s_watch_stalls_total "):
            return float(line.split()[1])
    return 0.0


def main() -> int:
    print(f"host: {platform.node()} {platform.release()}, {os.cpu_count()} CPUs")
    ns = netns.create("stall")
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory(prefix="nc-stall-") as tmp:
        try:
            kubeconfig = os.path.join(tmp, "kubeconfig")
            objects = os.path.join(REPO, "nodecryptor", "examples", "cluster.json")
            with open(objects) as f:
                node = json.load(f)[1]["metadata"]["name"]
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
                        API,
                        "--objects",
                        objects,
                        "--token",
                        "t",
                        "--write-kubeconfig",
                        kubeconfig,
                    ],
                    cwd=REPO,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            while not os.path.exists(kubeconfig):
                time.sleep(0.1)
            bpffs = os.path.join(tmp, "bpffs")  # unused by the ip-rule datapath; private anyway
            os.mkdir(bpffs)
            procs.append(
                subprocess.Popen(
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
                        HEALTH,
                        "--metrics-server-bind-address",
                        METRICS,
                    ],
                    env=dict(os.environ, NODECRYPTOR_RUN_DIR=tmp),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            time.sleep(5)  # listed, watching
            print(f"stalls before the freeze: {stalls(ns):.0f}")
            fetch(ns, f"http://{API}/_fake/freeze", {"frozen": True})
            frozen_at = time.monotonic()
            while stalls(ns) < 1:
                if time.monotonic() - frozen_at > 120:
                    print("not noticed within 120 s")
                    return 1
                time.sleep(1)
            print(f"frozen API server noticed after {time.monotonic() - frozen_at:.1f} s")
            print("/healthz while frozen:", fetch(ns, f"http://{HEALTH}/healthz").strip())
            fetch(ns, f"http://{API}/_fake/freeze", {"frozen": False})
        finally:
            for p in reversed(procs):
                p.terminate()
                p.wait(10)
            netns.delete(ns)  # takes the agent's rules and routes with it
    return 0


if __name__ == "__main__":
    sys.exit(main())
