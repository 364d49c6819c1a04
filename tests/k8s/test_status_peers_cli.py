"""`nodecryptor status --peers` and `--cluster` (JSON and text) against the fake API server
and an agent-written peer table."""

from __future__ import annotations

import json
import time

from nodecryptor.cli import main
from nodecryptor.policy.peerhealth import CONDITION_TYPE
from nodecryptor_testkit.fakeapi import make_ciliumnode, make_node

from k8s_support import fake, kubeconfig  # noqa: F401 - pytest fixtures


def run(capsys, *argv):
    code = main(["status", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def set_condition(fake, name, status, reason):
    node = fake.nodes.get(name)
    node["status"]["conditions"].append(
        {
            "type": CONDITION_TYPE,
            "status": status,
            "reason": reason,
            "message": f"{reason} on {name}",
        }
    )
    fake.nodes.replace(name, node, check_rv=False)


def test_cluster_json_and_text(fake, kubeconfig, capsys):
    for n in ("a1", "a2", "a3"):
        fake.apply(make_node(n))
    set_condition(fake, "a1", "True", "EncryptionReady")
    set_condition(fake, "a2", "False", "WireGuardDown")
    code, out, _ = run(capsys, "--cluster", "--json", "--kubeconfig", kubeconfig)
    data = json.loads(out)
    assert code == 1
    assert data["summary"] == {"nodes": 3, "ready": 1, "not_ready": 1, "unknown": 1}
    assert [(n["node"], (n["condition"] or {}).get("reason")) for n in data["nodes"]] == [
        ("a1", "EncryptionReady"),
        ("a2", "WireGuardDown"),
        ("a3", None),
    ]
    code, out, _ = run(capsys, "--cluster", "--kubeconfig", kubeconfig)
    assert "1 ready, 1 not ready, 1 unknown (of 3 nodes)" in out
    assert "WireGuardDown" in out


def test_cluster_all_ready_exits_0(fake, kubeconfig, capsys):
    fake.apply(make_node("a1"))
    set_condition(fake, "a1", "True", "EncryptionReady")
    assert run(capsys, "--cluster", "--kubeconfig", kubeconfig)[0] == 0


def test_cluster_bad_kubeconfig_is_a_flag_error(tmp_path, capsys):
    code, _, err = run(capsys, "--cluster", "--kubeconfig", str(tmp_path / "missing"))
    assert code == 2 and "--kubeconfig" in err


def test_peers_from_the_agents_table(tmp_path, capsys):
    table = {
        "node": "w1",
        "written_at": time.time(),
        "wireguard": {"ifname": "cilium_wg0", "up": True, "error": None},
        "condition": {
            "type": CONDITION_TYPE,
            "status": "True",
            "reason": "PeerKeyMismatch",
            "message": "w2",
        },
        "peers": [
            {
                "node": "w2",
                "state": "key-mismatch",
                "key_match": False,
                "annotation_key": "a",
                "peer_key": "b",
                "last_handshake_age_seconds": 3.0,
                "covered": ["10.0.0.2/32"],
                "uncovered": [],
                "rx_bytes": 1,
                "tx_bytes": 2,
            }
        ],
    }
    (tmp_path / "peers.json").write_text(json.dumps(table))
    code, out, _ = run(capsys, "--peers", "--json", "--run-dir", str(tmp_path))
    data = json.loads(out)
    assert code == 0 and data["source"] == "agent"
    assert data["summary"]["key-mismatch"] == 1
    code, out, _ = run(capsys, "--peers", "--run-dir", str(tmp_path))
    assert "key-mismatch" in out and "DIFF" in out and "1/1" in out


def test_peers_computed_without_the_agent(fake, kubeconfig, tmp_path, capsys):
    fake.apply(make_ciliumnode("w1", ipv4="10.0.0.1"))
    fake.apply(make_ciliumnode("w2", ipv4="10.0.0.2"))
    code, out, _ = run(
        capsys,
        "--peers",
        "--json",
        "--run-dir",
        str(tmp_path),
        "--kubeconfig",
        kubeconfig,
        "--node-name",
        "w1",
        "--wg-interface",
        "nc-peers-none",
    )
    data = json.loads(out)
    # No such device: its peers are unknown, so no peer is listed; the table says why.
    assert code == 0 and data["source"] == "computed"
    assert data["wireguard"]["up"] is False and data["peers"] == []
