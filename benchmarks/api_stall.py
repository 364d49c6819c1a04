"""How long a real agent with default settings takes to notice a frozen API server (one that
keeps connections open but answers nothing): the fake API server's "freeze" fault, the agent's
nodecryptor_k8s_watch_stalls_total polled every second.

Runs the fake API server and the agent (ip-rule datapath, private --bpffs directory) in a
throwaway network namespace, removed at the end. Needs root; takes about a minute.

    sudo .venv/bin/python benchmarks/api_stall.py
"""
import json, os, shutil, subprocess, sys, tempfile, time
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from nodecryptor_testkit import netns  # noqa: E402
BIN = os.path.dirname(sys.executable)
ns = netns.create("stall")
procs = []
tmp = tempfile.mkdtemp(prefix="nc-stall-")
def inns(code):
    return netns.run(sys.executable, "-c", code, netns=ns).stdout
def stalls():
    out = inns("import urllib.request as u; print(u.urlopen('http://127.0.0.1:18084/metrics', timeout=5).read().decode())")
    for line in out.splitlines():
        if line.startswith("nodecryptor_k8s_watch_stalls_total "):
            return float(line.split()[1])
def control(action, body):
    inns("import urllib.request as u, json; r=u.Request('http://127.0.0.1:16443/_fake/%s', data=json.dumps(%r).encode(), headers={'Authorization': 'Bearer t', 'Content-Type': 'application/json'}); print(u.urlopen(r, timeout=5).read())" % (action, body))
try:
    kc = os.path.join(tmp, "kc"); objects = os.path.join(REPO, "nodecryptor", "examples", "cluster.json")
    node = json.load(open(objects))[1]["metadata"]["name"]
    procs.append(subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "nodecryptor_testkit.fakeapi", "--bind", "127.0.0.1:16443", "--objects", objects, "--token", "t", "--write-kubeconfig", kc], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    while not os.path.exists(kc): time.sleep(0.1)
    os.mkdir(os.path.join(tmp, "bpffs"))
    procs.append(subprocess.Popen(["ip", "netns", "exec", ns, f"{BIN}/nodecryptor", "run", "--kubeconfig", kc, "--node-name", node, "--datapath", "iprule", "--bpffs", os.path.join(tmp, "bpffs"), "--health-probe-bind-address", "127.0.0.1:18083", "--metrics-server-bind-address", "127.0.0.1:18084", "--log-format", "json"], env=dict(os.environ, NODECRYPTOR_RUN_DIR=tmp), stdout=open(os.path.join(tmp, "agent.log"), "w"), stderr=subprocess.STDOUT))
    time.sleep(5)
    print("stalls before", stalls())
    control("freeze", {"frozen": True}); t0 = time.monotonic()
    while True:
        n = stalls()
        if n and n >= 1:
            print(f"frozen API server noticed after {time.monotonic() - t0:.1f} s (stalls={n})"); break
        if time.monotonic() - t0 > 120: print("not noticed in 120 s"); break
        time.sleep(1)
    control("freeze", {"frozen": False})
    time.sleep(3)
    print("healthz:", inns("import urllib.request as u; print(u.urlopen('http://127.0.0.1:18083/healthz', timeout=5).read().decode())").strip())
    print([l for l in open(os.path.join(tmp, "agent.log")) if "stall" in l or "sync failed" in l][:3])
finally:
    for p in reversed(procs):
        p.terminate(); p.wait(10)
    netns.delete(ns)
    shutil.rmtree(tmp, ignore_errors=True)
