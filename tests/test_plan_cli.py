"""`nodecryptor plan --json` against the fake API server serving the bundled example cluster:
the exact contract JSON, control-plane detection by label presence, normalised prefixes, and
clear exit-2 errors for bad exempt-port specifications."""

from __future__ import annotations

import json
import os

import pytest

import nodecryptor
from nodecryptor.cli import main
from nodecryptor_testkit.fakeapi import FakeApiServer, load_objects, make_ciliumnode, make_node

EXAMPLE = os.path.join(os.path.dirname(nodecryptor.__file__), "examples", "cluster.json")
EXAMPLE_POOLS = {"cidrs": ["10.244.0.0/16", "fd00:10:244::/56"], "source": "cilium", "problem": ""}
TCP_DEFAULT = [
    {"protocol": "tcp", "first": 2379, "last": 2380},
    {"protocol": "tcp", "first": 6443, "last": 6443},
]


def dest(prefix, node, kind, control_plane=False):
    # The built-in policy (default ports) exempts a control-plane node's own addresses.
    exempt = (
        [dict(r, policy="control-plane-bootstrap") for r in TCP_DEFAULT]
        if control_plane and kind == "node-ip"
        else []
    )
    return {
        "prefix": prefix,
        "node": node,
        "kind": kind,
        "control_plane": control_plane,
        "exempt_ports": exempt,
    }


@pytest.fixture
def serve(tmp_path):
    """``serve(objects) -> kubeconfig path`` of a fake API server holding ``objects``."""
    servers = []

    def start(objects) -> str:
        server = FakeApiServer(token="plan-test", objects=objects).start()
        servers.append(server)
        return server.write_kubeconfig(str(tmp_path / f"kc{len(servers)}"))

    yield start
    for server in servers:
        server.stop()


def plan_json(capsys, kubeconfig, node, *extra) -> dict:
    rc = main(["plan", "--kubeconfig", kubeconfig, "--node-name", node, "--json", *extra])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def test_bundled_example_plan_for_a_worker(serve, capsys):
    got = plan_json(capsys, serve(load_objects(EXAMPLE)), "w1")
    assert got == {
        "node": "w1",
        "role": "worker",
        "local_addresses": ["192.168.50.11", "fd50::11"],
        "destinations": [
            dest("10.244.0.0/24", "cp1", "pod-cidr", True),
            dest("10.244.2.0/24", "w2", "pod-cidr"),
            dest("10.244.3.0/24", "w3", "pod-cidr"),
            dest("192.168.50.10/32", "cp1", "node-ip", True),
            dest("192.168.50.12/32", "w2", "node-ip"),
            dest("192.168.50.13/32", "w3", "node-ip"),
            dest("fd00:10:244::/64", "cp1", "pod-cidr", True),
            dest("fd00:10:244:2::/64", "w2", "pod-cidr"),
            dest("fd00:10:244:3::/64", "w3", "pod-cidr"),
            dest("fd50::10/128", "cp1", "node-ip", True),
            dest("fd50::12/128", "w2", "node-ip"),
            dest("fd50::13/128", "w3", "node-ip"),
        ],
        "exempt_ports": TCP_DEFAULT,
        "serves": [],
        "rejected": [],
        "pools": EXAMPLE_POOLS,
    }


def test_bundled_example_plan_for_the_control_plane(serve, capsys):
    got = plan_json(
        capsys, serve(load_objects(EXAMPLE)), "cp1", "--control-plane-exempt-ports", "6443,udp/8472"
    )
    assert got["role"] == "control-plane"  # kubeadm's label has an empty value
    assert got["local_addresses"] == ["192.168.50.10", "fd50::10"]
    assert all(not d["control_plane"] and d["node"] != "cp1" for d in got["destinations"])
    assert len(got["destinations"]) == 3 * 4  # three workers, two addresses + two CIDRs each
    assert got["exempt_ports"] == [
        {"protocol": "tcp", "first": 6443, "last": 6443},
        {"protocol": "udp", "first": 8472, "last": 8472},
    ]


@pytest.mark.parametrize("style", ["kubeadm", "k3s", "master"])
def test_every_control_plane_label_style(serve, capsys, style):
    objects = [
        make_ciliumnode("cp", ipv4="192.0.2.1", control_plane=True, label_style=style),
        make_node("cp", control_plane=True, label_style=style, ipv4="192.0.2.1"),
        make_ciliumnode("w", ipv4="192.0.2.2"),
        make_node("w", ipv4="192.0.2.2"),
    ]
    kc = serve(objects)
    assert plan_json(capsys, kc, "cp")["role"] == "control-plane"
    assert plan_json(capsys, kc, "w")["destinations"] == [
        dest("192.0.2.1/32", "cp", "node-ip", True)
    ]


def test_role_comes_from_the_node_unless_told_otherwise(serve, capsys):
    # Any Cilium agent can label a CiliumNode control-plane; the v1
    # Node's role labels are protected by NodeRestriction.
    objects = [
        make_ciliumnode("cp", ipv4="192.0.2.1", control_plane=True),
        make_node("cp", control_plane=True, ipv4="192.0.2.1"),
        make_ciliumnode("w", ipv4="192.0.2.2", control_plane=True),  # forged
        make_node("w", ipv4="192.0.2.2"),
        make_ciliumnode("x", ipv4="192.0.2.3"),
    ]  # no Node yet: a worker
    kc = serve(objects)
    got = plan_json(capsys, kc, "x")
    assert got["destinations"] == [
        dest("192.0.2.1/32", "cp", "node-ip", True),
        dest("192.0.2.2/32", "w", "node-ip", False),
    ]
    got = plan_json(capsys, kc, "x", "--role-source", "ciliumnode")
    assert got["destinations"] == [
        dest("192.0.2.1/32", "cp", "node-ip", True),
        dest("192.0.2.2/32", "w", "node-ip", True),
    ]


def test_rejections_are_listed_with_their_reason(serve, capsys):
    # plan --json used to drop every rejection.
    hostile = make_ciliumnode(
        "evil", ipv4="169.254.169.254", pod_cidrs=["0.0.0.0/1", "10.0.0.0/8", "10.244.9.0/24"]
    )
    hostile["spec"]["addresses"].append({"type": "InternalIP", "ip": "192.168.50.10"})
    objects = load_objects(EXAMPLE) + [hostile]
    got = plan_json(capsys, serve(objects), "w1", "--cluster-pod-cidrs", "10.244.0.0/16")
    rejected = {
        (r["node"], r["field"].split("[")[0], r["value"], r["reason"]) for r in got["rejected"]
    }
    assert rejected == {
        ("evil", "spec.addresses", "169.254.169.254", "link-local"),
        ("evil", "spec.addresses", "0.0.0.1", "unspecified"),  # its CiliumInternalIP
        ("evil", "spec.ipam.podCIDRs", "0.0.0.0/1", "unspecified"),
        ("evil", "spec.ipam.podCIDRs", "10.0.0.0/8", "too-broad"),
        # No v1 Node lists it: not a node address (cp1's own Node does list it).
        ("evil", "spec.addresses", "192.168.50.10", "no-node-object"),
    }
    assert all(set(r) >= {"node", "field", "value", "reason"} for r in got["rejected"])
    # The control-plane node's address keeps its exemption; evil's own pod CIDR is kept.
    assert dest("192.168.50.10/32", "cp1", "node-ip", True) in got["destinations"]
    assert dest("10.244.9.0/24", "evil", "pod-cidr") in got["destinations"]


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--role-source", "kubelet"),
        ("--cluster-pod-cidrs", "10.244.0.1/16"),
        ("--cluster-pod-cidrs", "nonsense"),
        ("--cluster-pod-cidrs", "0.0.0.0/0"),
        ("--pod-cidr-min-prefix-v4", "0"),
        ("--pod-cidr-min-prefix-v4", "33"),
        ("--pod-cidr-min-prefix-v6", "٤٨"),
        ("--pod-cidr-min-prefix-v6", "x"),
    ],
)
def test_bad_admission_flags_exit_2_naming_flag_and_value(capsys, flag, value):
    rc = main(["plan", "--kubeconfig", "/nonexistent", "--node-name", "w1", flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and repr(value) in err


def test_prefixes_are_normalised(serve, capsys):
    objects = [
        make_ciliumnode("a", ipv4="192.0.2.1"),
        make_ciliumnode(
            "b", ipv6="FD50:0:0:0::00B", pod_cidrs=["10.244.5.7/24", "FD00:10:244:0005:0::1/64"]
        ),
        make_node("b", ipv6="FD50:0:0:0::00B"),
    ]
    got = plan_json(capsys, serve(objects), "a")
    assert [d["prefix"] for d in got["destinations"]] == [
        "10.244.5.0/24",
        "fd00:10:244:5::/64",
        "fd50::b/128",
    ]


def test_unknown_local_node_is_a_worker_that_excludes_nothing(serve, capsys):
    got = plan_json(capsys, serve(load_objects(EXAMPLE)), "not-in-cluster")
    assert got["role"] == "worker" and got["local_addresses"] == []
    assert len(got["destinations"]) == 4 * 4


@pytest.mark.parametrize("value", ["0", "70000", "6443-2379", "abc", "icmp/5"])
def test_bad_exempt_ports_exit_2_naming_flag_and_value(serve, capsys, value):
    kc = serve(load_objects(EXAMPLE))
    rc = main(
        [
            "plan",
            "--kubeconfig",
            kc,
            "--node-name",
            "w1",
            "--json",
            "--control-plane-exempt-ports",
            value,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert "--control-plane-exempt-ports" in err and repr(value) in err


def test_unreachable_api_exits_1_with_a_message(tmp_path, capsys):
    server = FakeApiServer(token="plan-test").start()
    kc = server.write_kubeconfig(str(tmp_path / "kc"))
    server.stop()
    rc = main(["plan", "--kubeconfig", kc, "--node-name", "w1", "--json"])
    captured = capsys.readouterr()
    assert rc == 1 and captured.out == ""
    assert "cannot reach the API server http://127.0.0.1:" in captured.err


def test_wrong_token_exits_1_naming_401(serve, capsys, tmp_path):
    kc = serve(load_objects(EXAMPLE))
    with open(kc) as f:
        config = json.load(f)
    config["users"][0]["user"]["token"] = "wrong"
    bad = tmp_path / "bad-kc"
    bad.write_text(json.dumps(config))
    assert main(["plan", "--kubeconfig", str(bad), "--node-name", "w1", "--json"]) == 1
    assert "401" in capsys.readouterr().err


def test_plan_lists_policy_exemptions_serves_and_rejected_policies(serve, capsys):
    from nodecryptor_testkit.fakeapi import make_exemption

    objects = load_objects(EXAMPLE)
    for obj in objects:
        if obj.get("kind") == "Node" and obj["metadata"]["name"] == "w2":
            obj["metadata"]["labels"]["storage"] = "yes"
    objects += [
        make_exemption("storage", {"matchLabels": {"storage": "yes"}}, [{"port": 3260}]),
        make_exemption("broken", {}, [{"port": 3260, "endPort": 1}]),
    ]
    kubeconfig = serve(objects)
    got = plan_json(capsys, kubeconfig, "w1")
    by_prefix = {d["prefix"]: d["exempt_ports"] for d in got["destinations"]}
    assert by_prefix["192.168.50.12/32"] == [
        {"protocol": "tcp", "first": 3260, "last": 3260, "policy": "storage"}
    ]
    assert by_prefix["192.168.50.13/32"] == [] and by_prefix["10.244.2.0/24"] == []
    assert got["serves"] == []
    assert got["rejected"] == [
        {
            "kind": "EncryptionExemption",
            "name": "broken",
            "field": "spec.ports[0].endPort",
            "value": "1",
            "reason": "malformed",
            "detail": "below port 3260",
        }
    ]
    got = plan_json(capsys, kubeconfig, "w2")
    assert got["serves"] == [{"protocol": "tcp", "first": 3260, "last": 3260, "policy": "storage"}]


def test_plan_without_the_crd_keeps_the_builtin_policy(tmp_path, capsys):
    server = FakeApiServer(token="plan-test", objects=load_objects(EXAMPLE)).start()
    try:
        server.exemptions_installed = False
        got = plan_json(capsys, server.write_kubeconfig(str(tmp_path / "kc")), "w1")
    finally:
        server.stop()
    assert "not installed" in got["exemptions_note"]
    assert {d["prefix"]: d["exempt_ports"] for d in got["destinations"]}["192.168.50.10/32"] == [
        dict(r, policy="control-plane-bootstrap") for r in TCP_DEFAULT
    ]
