"""Configuration errors exit 2 before anything is touched: the real CLI as a subprocess, in a
network namespace of its own with a private bpffs and run directory. Each case must exit 2
with a message naming the flag and the value, without a traceback, having selected no datapath
(no datapath.json), pinned nothing and installed no ip rule or route. Elapsed times are
printed (pytest -s), not asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from nodecryptor_testkit import netns as netns_mod

NODECRYPTOR = os.path.join(os.path.dirname(sys.executable), "nodecryptor")

pytestmark = pytest.mark.privileged

GOOD_KUBECONFIG = {
    "apiVersion": "v1",
    "kind": "Config",
    "current-context": "c",
    "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:1"}}],
    "users": [{"name": "u", "user": {"token": "t"}}],
    "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
}


@pytest.fixture
def files(tmp_path):
    """Kubeconfig files of every broken kind, by name, plus a good one."""
    out = {}

    def write(name, data: bytes):
        path = tmp_path / name
        path.write_bytes(data)
        out[name] = str(path)

    write("good", json.dumps(GOOD_KUBECONFIG).encode())
    write("garbage", b"apiVersion: v1\nclusters: [unclosed\n")
    write("binary", os.urandom(64) + b"\0\x01\x02")
    write("latin1", b"\xff\xfe current-context: x\n")
    write("scalar", b"just a string\n")
    write("list", b"- 1\n- 2\n")
    write("empty", b"")
    no_ctx = dict(GOOD_KUBECONFIG)
    del no_ctx["current-context"]
    write("no-context", json.dumps(no_ctx).encode())
    dangling = dict(GOOD_KUBECONFIG, **{"current-context": "absent"})
    write("dangling-context", json.dumps(dangling).encode())
    (tmp_path / "a-directory").mkdir()
    out["directory"] = str(tmp_path / "a-directory")
    os.mkfifo(tmp_path / "fifo")  # reading it would block forever
    out["fifo"] = str(tmp_path / "fifo")
    out["missing"] = str(tmp_path / "does-not-exist")
    out["under-a-file"] = str(tmp_path / "good" / "kubeconfig")
    return out


KUBECONFIG_CASES = [
    "missing",
    "directory",
    "fifo",
    "under-a-file",
    "garbage",
    "binary",
    "latin1",
    "scalar",
    "list",
    "empty",
    "no-context",
    "dangling-context",
]

HEALTH, METRICS = "--health-probe-bind-address", "--metrics-server-bind-address"

# (extra argv for `run`, flag, value expected in the message)
RUN_FLAG_CASES = [
    ([HEALTH, "nonsense:80"], HEALTH, "nonsense:80"),
    ([HEALTH, "1.2.3.4.5:80"], HEALTH, "1.2.3.4.5:80"),
    ([HEALTH, "8083"], HEALTH, "8083"),
    ([HEALTH, ":0"], HEALTH, ":0"),
    ([HEALTH, "::1:8083"], HEALTH, "::1:8083"),
    ([METRICS, ":70000"], METRICS, ":70000"),
    ([METRICS, "[1.2.3.4]:80"], METRICS, "[1.2.3.4]:80"),
    ([METRICS, ":٨٠٨٤"], METRICS, ":٨٠٨٤"),
    ([METRICS, ":²"], METRICS, ":²"),
    ([HEALTH, ":9000", METRICS, "127.0.0.1:9000"], METRICS, "127.0.0.1:9000"),
    # Passes parsing but cannot be bound (not an address of this namespace): still exit 2,
    # still before a datapath is chosen.
    ([HEALTH, "192.0.2.1:8083"], HEALTH, "192.0.2.1:8083"),
    (["--control-plane-exempt-ports", "٦٤٤٣"], "--control-plane-exempt-ports", "٦٤٤٣"),
    (["--control-plane-exempt-ports", "²"], "--control-plane-exempt-ports", "²"),
    (["--control-plane-exempt-ports", "0"], "--control-plane-exempt-ports", "0"),
    (["--control-plane-exempt-ports", "6443-70000"], "--control-plane-exempt-ports", "6443-70000"),
    (["--control-plane-exempt-ports", "icmp/1"], "--control-plane-exempt-ports", "icmp/1"),
    (["--node-name", "Not_A_Node"], "--node-name", "Not_A_Node"),
    (["--devices", "eth0,a/b"], "--devices", "a/b"),
    (["--devices", "eth0,this-name-is-too-long"], "--devices", "this-name-is-too-long"),
    (["--wg-interface", "wg 0"], "--wg-interface", "wg 0"),
    (["--control-plane-label", "not a label"], "--control-plane-label", "not a label"),
    (["--address-types", "Internal-IP"], "--address-types", "Internal-IP"),
    (["--datapath", "ebpf"], "--datapath", "ebpf"),
    (["--fail-mode", "sometimes"], "--fail-mode", "sometimes"),
    (["--ingress-enforcement", "strict"], "--ingress-enforcement", "strict"),
    (["--log-format", "xml"], "--log-format", "xml"),
    (["--log-level", "loud"], "--log-level", "loud"),
    (["--noop-route=maybe"], "--noop-route", "maybe"),
    (["--watch-stall-seconds", "5"], "--watch-stall-seconds", "5"),
    (["--watch-stall-seconds", "1e2"], "--watch-stall-seconds", "1e2"),
    (["--watch-stall-seconds", "nan"], "--watch-stall-seconds", "nan"),
    (["--watch-stall-seconds", "٥٥"], "--watch-stall-seconds", "٥٥"),
    (["--watch-stall-seconds", "301"], "--watch-stall-seconds", "301"),
]


@pytest.fixture
def node_ns(netns):
    return netns("cfgerr")


def run_cli(node_ns, argv, env_extra=None):
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_") and k != "NODE_NAME"
    }
    env.update(env_extra or {})
    started = time.monotonic()
    proc = subprocess.run(
        ["ip", "netns", "exec", node_ns, NODECRYPTOR, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, time.monotonic() - started


def assert_untouched(node_ns, bpffs: str, run_dir: str) -> None:
    # A fresh bpffs holds only the kernel's own maps.debug and progs.debug.
    assert set(os.listdir(bpffs)) <= {"maps.debug", "progs.debug"}, "something was pinned"
    assert not os.listdir(run_dir), "a datapath was selected"
    rules = netns_mod.run("ip", "-j", "rule", "show", netns=node_ns).stdout
    assert {r["table"] for r in json.loads(rules)} <= {"local", "main", "default"}, rules
    for family in ("-4", "-6"):
        routes = netns_mod.run("ip", family, "route", "show", "table", "all", netns=node_ns).stdout
        assert "cilium_wg0" not in routes and "table 2026" not in routes, routes


def check_exit_2(node_ns, bpffs, run_dir, argv, flag, value, env_extra=None):
    proc, seconds = run_cli(node_ns, argv, dict(env_extra or {}, NODECRYPTOR_RUN_DIR=run_dir))
    print(f"{' '.join(argv[:1] + argv[-2:])}: exit {proc.returncode} after {seconds:.2f} s")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert flag in proc.stderr and value in proc.stderr, proc.stderr
    assert_untouched(node_ns, bpffs, run_dir)


@pytest.mark.parametrize("case", KUBECONFIG_CASES)
@pytest.mark.parametrize("command", ["run", "plan"])
def test_unusable_kubeconfig_exits_2(case, command, files, node_ns, bpffs, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = [command, "--node-name", "w1", "--kubeconfig", files[case]]
    if command == "run":
        argv += [
            "--bpffs",
            bpffs,
            "--health-probe-bind-address",
            "127.0.0.1:18383",
            "--metrics-server-bind-address",
            "127.0.0.1:18384",
        ]
    check_exit_2(node_ns, bpffs, str(run_dir), argv, "--kubeconfig", files[case])


@pytest.mark.parametrize("command", ["run", "plan"])
def test_missing_in_cluster_service_account_exits_2(command, node_ns, bpffs, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = [command, "--node-name", "w1"] + (["--bpffs", bpffs] if command == "run" else [])
    check_exit_2(node_ns, bpffs, str(run_dir), argv, "--kubeconfig", "KUBERNETES_SERVICE_HOST")


@pytest.mark.parametrize("extra,flag,value", RUN_FLAG_CASES)
def test_bad_run_flags_exit_2(extra, flag, value, files, node_ns, bpffs, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = [
        "run",
        "--node-name",
        "w1",
        "--kubeconfig",
        files["good"],
        "--bpffs",
        bpffs,
        "--health-probe-bind-address",
        "127.0.0.1:18383",
        "--metrics-server-bind-address",
        "127.0.0.1:18384",
        *extra,
    ]
    check_exit_2(node_ns, bpffs, str(run_dir), argv, flag, value)


def test_missing_bpffs_and_node_name_exit_2(files, node_ns, bpffs, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    missing = str(tmp_path / "no-bpffs")
    check_exit_2(
        node_ns,
        bpffs,
        str(run_dir),
        ["run", "--node-name", "w1", "--kubeconfig", files["good"], "--bpffs", missing],
        "--bpffs",
        missing,
    )
    check_exit_2(
        node_ns,
        bpffs,
        str(run_dir),
        ["run", "--kubeconfig", files["good"], "--bpffs", bpffs],
        "--node-name",
        "",
    )


def test_plan_against_an_unreachable_api_is_a_runtime_error(files, node_ns, tmp_path):
    """A usable configuration whose server is down is not a flag error: exit 1, no traceback,
    the server named."""
    proc, _ = run_cli(node_ns, ["plan", "--node-name", "w1", "--kubeconfig", files["good"]])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "127.0.0.1:1" in proc.stderr
