"""The real agent, started with the DaemonSet's arguments and inside the DaemonSet's security
constraints, becomes ready with the BPF datapath; the inspection commands a user would run with
`kubectl exec` work with the same capabilities; SIGTERM ends it well within the grace period and
leaves the datapath enforcing; the clean-up DaemonSet's command then removes it. The same
holds for the ip-rule fallback the agent picks when BPF is unavailable.

The "node" is a network namespace with an `eth0` (a veth) holding w1's address from the bundled
example cluster, which the fake API server serves on 127.0.0.1:6443 inside that namespace. The
agent runs as uid 0 with exactly the capabilities of k8s/daemonset.yaml, no_new_privs, a
read-only root filesystem with a writable run directory (the DaemonSet's /run/nodecryptor
emptyDir), and a private bpffs of mode 0700 in place of /sys/fs/bpf. There is no WireGuard
device: the agent then enforces fail-closed, which does not affect readiness.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from conftest import require
from deploy_manifests import (
    REPO,
    agent_capabilities,
    agent_container,
    agent_daemonset,
    all_docs,
    expand_env,
    find,
)
from nodecryptor_testkit import netns as netns_mod

pytestmark = [pytest.mark.privileged, pytest.mark.bpf]

NODE = "w1"
NODE_ADDRESS = "192.168.50.11/24"
EXAMPLE = REPO / "nodecryptor" / "examples" / "cluster.json"
READY_WITHIN = 60.0


def _python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _setpriv(caps: list[str]) -> list[str]:
    bounding = ",".join(["-all"] + [f"+{c.lower()}" for c in caps])
    return [
        "setpriv",
        "--no-new-privs",
        "--inh-caps=-all",
        "--ambient-caps=-all",
        f"--bounding-set={bounding}",
        "--",
    ]


def _cli(node, caps: list[str], *argv: str) -> subprocess.CompletedProcess:
    """`kubectl exec` stand-in: a command with the container's capabilities in the node."""
    if argv and argv[0] == "status":
        argv = (*argv, f"--run-dir={node['run_dir']}")
    return subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            node["ns"],
            *_setpriv(caps),
            _python(),
            "-B",
            "-m",
            "nodecryptor.cli",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def _readyz(ns: str) -> tuple[bool, str]:
    probe = (
        "import urllib.request, urllib.error\n"
        "try:\n"
        "    url = 'http://127.0.0.1:8083/readyz'\n"
        "    print(urllib.request.urlopen(url, timeout=2).read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.read().decode())\n"
        "except OSError as e:\n"
        "    print(json.dumps({'ok': False, 'reason': str(e)}))\n"
    )
    out = netns_mod.run(_python(), "-c", "import json\n" + probe, netns=ns, check=False).stdout
    try:
        body = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return False, out
    return bool(body.get("ok")), body.get("reason", "")


def _agent_argv(bpffs: str, kubeconfig: str) -> list[str]:
    """The DaemonSet's container args, with only the bpffs and the kubeconfig replaced."""
    args = [expand_env(a, {"NODE_NAME": NODE}) for a in agent_container()["args"]]
    args = [f"--bpffs={bpffs}" if a.startswith("--bpffs") else a for a in args]
    return args + [f"--kubeconfig={kubeconfig}"]


@pytest.fixture
def node(netns, bpffs, bcc_available, tmp_path):
    assert EXAMPLE.exists(), f"the bundled example cluster {EXAMPLE} is part of the package"
    ns = netns("agent")
    netns_mod.run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", netns=ns)
    netns_mod.run("ip", "addr", "add", NODE_ADDRESS, "dev", "eth0", netns=ns)
    netns_mod.run("ip", "link", "set", "eth0", "up", netns=ns)
    netns_mod.run("ip", "link", "set", "peer0", "up", netns=ns)
    netns_mod.run("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", netns=ns)
    subprocess.run(["chmod", "0700", bpffs], check=True)
    # The DaemonSet's /run/nodecryptor emptyDir: a small tmpfs, mounted before the agent's
    # root is made read-only, and visible to the inspection commands like the emptyDir is to
    # `kubectl exec`.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(run_dir)], check=True)
    kubeconfig = tmp_path / "kubeconfig"
    procs: list[subprocess.Popen] = []
    try:
        api = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                ns,
                _python(),
                "-m",
                "nodecryptor_testkit.fakeapi",
                "--bind",
                "127.0.0.1:6443",
                "--objects",
                str(EXAMPLE),
                "--token",
                "deploy-test",
                "--write-kubeconfig",
                str(kubeconfig),
            ],
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(api)
        deadline = time.monotonic() + 20
        while not kubeconfig.exists():
            assert api.poll() is None, f"fake API server exited: {api.stderr.read()}"
            assert time.monotonic() < deadline, "fake API server did not write its kubeconfig"
            time.sleep(0.1)
        yield {
            "ns": ns,
            "bpffs": bpffs,
            "kubeconfig": str(kubeconfig),
            "run_dir": run_dir,
            "procs": procs,
        }
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        subprocess.run(["umount", str(run_dir)], check=False)
        # Whatever the test left attached is pinned in the private bpffs; the netns fixture
        # deletes the devices, the bpffs fixture unmounts the pins.


def _start_agent(node, caps: list[str], hide_kernel_headers: bool = False) -> subprocess.Popen:
    """The agent in a private mount namespace with a read-only root. ``hide_kernel_headers``
    mounts an empty tmpfs over /lib/modules there first: a node without kernel headers, on
    which BCC cannot compile (this kernel has no /sys/kernel/kheaders.tar.xz either)."""
    argv = [
        _python(),
        "-B",
        "-m",
        "nodecryptor.cli",
        *_agent_argv(node["bpffs"], node["kubeconfig"]),
        f"--run-dir={node['run_dir']}",
    ]
    hide = "mount -t tmpfs -o size=1m,ro none /lib/modules && " if hide_kernel_headers else ""
    inner = f"{hide}mount -o remount,bind,ro / && exec {' '.join(_setpriv(caps))} " + " ".join(argv)
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            node["ns"],
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            inner,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    node["procs"].append(proc)
    return proc


def _wait_ready(node, agent: subprocess.Popen) -> str:
    deadline = time.monotonic() + READY_WITHIN
    reason = ""
    while time.monotonic() < deadline:
        assert agent.poll() is None, f"agent exited early: {agent.stderr.read()[-3000:]}"
        ok, reason = _readyz(node["ns"])
        if ok:
            return reason
        time.sleep(0.3)
    pytest.fail(f"agent not ready within {READY_WITHIN:.0f}s: {reason}")


def test_agent_ready_with_daemonset_security_context(node):
    caps = agent_capabilities()
    agent = _start_agent(node, caps)
    _wait_ready(node, agent)

    # What an operator runs with `kubectl exec` (same capabilities as the agent).
    status = _cli(node, caps, "status", "--json", f"--bpffs={node['bpffs']}")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["datapath"] == "bpf", report
    # The agent could record its choice under the read-only root (the emptyDir's purpose).
    assert report["agent_choice"]["datapath"] == "bpf", report
    assert [d["name"] for d in report["devices"]] == ["eth0"]
    assert report["devices"][0]["mode"] == "tcx" and report["devices"][0]["position"] == 0
    dump = _cli(node, caps, "bpf", "dump", "--json", f"--bpffs={node['bpffs']}")
    assert dump.returncode == 0, dump.stderr
    dumped = json.loads(dump.stdout)
    prefixes = {d["prefix"] for d in dumped.get("maps", dumped)["destinations"]}
    assert {"192.168.50.12/32", "10.244.2.0/24"} <= prefixes, prefixes
    # explain opens the pinned program, so the DaemonSet's capabilities suffice (opening by
    # id would need CAP_SYS_ADMIN).
    explain = _cli(
        node,
        caps,
        "explain",
        "--json",
        "--dst",
        "192.168.50.12",
        "--dport",
        "80",
        f"--bpffs={node['bpffs']}",
    )
    assert explain.returncode == 0, explain.stderr[-2000:]
    assert json.loads(explain.stdout)["verdict"] == "drop"  # fail-closed, no WireGuard

    # SIGTERM, as the kubelet sends it: the agent ends within the grace period...
    grace = agent_daemonset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    started = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=grace) == 0, agent.stderr.read()[-3000:]
    stopped_after = time.monotonic() - started
    assert stopped_after < grace
    # ...and leaves the datapath enforcing (fail-static).
    after = json.loads(_cli(node, caps, "status", "--json", f"--bpffs={node['bpffs']}").stdout)
    assert [d["name"] for d in after["devices"]] == ["eth0"]
    assert report["program_load"]["source"] == "compiled", report["program_load"]

    # A restart with the same program reuses the pinned one with the DaemonSet's capabilities
    # (its maps are opened by path: fetching them by id would need CAP_SYS_ADMIN).
    agent = _start_agent(node, caps)
    _wait_ready(node, agent)
    again = json.loads(_cli(node, caps, "status", "--json", f"--bpffs={node['bpffs']}").stdout)
    assert again["agent_choice"]["datapath"] == "bpf", again
    assert again["program_load"]["source"] == "reused", again["program_load"]
    assert again["prog_id"] == report["prog_id"]
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=grace) == 0, agent.stderr.read()[-3000:]

    # The clean-up DaemonSet's command, with its capabilities, removes it.
    cleanup_ds = find(all_docs(), "DaemonSet", "nodecryptor-cleanup")
    init = cleanup_ds["spec"]["template"]["spec"]["initContainers"][0]
    cleanup_args = [
        f"--bpffs={node['bpffs']}" if a.startswith("--bpffs") else a for a in init["args"]
    ]
    cleaned = _cli(node, init["securityContext"]["capabilities"]["add"], *cleanup_args, "--json")
    assert cleaned.returncode == 0, cleaned.stderr
    assert json.loads(cleaned.stdout)["bpf"]["tcx_links"] == ["eth0"]
    links = netns_mod.run(
        _python(),
        "-c",
        "import sys; sys.path.insert(0, '.');"
        "from nodecryptor.datapath.bpf import syscall;"
        "print(len(syscall.prog_query(int(open('/sys/class/net/eth0/ifindex')"
        ".read()))['link_ids']))",
        netns=node["ns"],
    ).stdout
    assert links.strip() == "0"


def test_ip_rule_fallback_within_the_same_security_context(node):
    """A node without kernel headers, where BCC cannot compile: with the DaemonSet's
    `--datapath=auto`, the agent falls back to ip rules, which the same capabilities allow."""
    require(
        not pathlib.Path("/sys/kernel/kheaders.tar.xz").exists(),
        "this kernel carries its headers (kheaders); hiding /lib/modules cannot take BCC's "
        "headers away",
    )
    caps = agent_capabilities()
    agent = _start_agent(node, caps, hide_kernel_headers=True)
    _wait_ready(node, agent)

    status = _cli(node, caps, "status", "--json", f"--bpffs={node['bpffs']}")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["datapath"] == "iprule" and report["active"], report
    assert "fell back to ip rules" in report["agent_choice"]["reason"], report
    assert report["rule_count"] > 0 and report["route_count"] > 0, report
    # ip-rule explain asks the kernel's route lookup: no CAP_SYS_ADMIN needed. No WireGuard
    # device and fail-closed: remote destinations get unreachable routes.
    explain = _cli(
        node,
        caps,
        "explain",
        "--json",
        "--dst",
        "192.168.50.12",
        "--dport",
        "80",
        f"--bpffs={node['bpffs']}",
    )
    assert explain.returncode == 0, explain.stderr
    assert json.loads(explain.stdout)["verdict"] == "drop", explain.stdout

    grace = agent_daemonset()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(timeout=grace) == 0, agent.stderr.read()[-3000:]
    after = json.loads(_cli(node, caps, "status", "--json", f"--bpffs={node['bpffs']}").stdout)
    assert after["active"] and after["rule_count"] == report["rule_count"]

    cleaned = _cli(node, caps, "cleanup", "--json", f"--bpffs={node['bpffs']}")
    assert cleaned.returncode == 0, cleaned.stderr
    assert json.loads(cleaned.stdout)["iprule"]["rules_removed"] == report["rule_count"]
