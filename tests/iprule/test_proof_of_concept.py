"""Migration from the original Go proof of concept: a control-plane node carrying the proof of
concept's rules, table-100 route and noop device, next to rules and routes of others at the
same priorities and in the same table. nodecryptor is installed first; `nodecryptor status`
reports the proof of concept; `nodecryptor cleanup --proof-of-concept` removes exactly its
state; the others' rules and routes and nodecryptor's band stay, and cluster traffic is routed
into WireGuard before, during and after."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest

from nodecryptor.datapath.iprule import proof_of_concept
from nodecryptor.datapath.iprule.backend import IpRuleDatapath
from nodecryptor_testkit.netns import run

from tests.datapath_cases import CASES_BY_ID, WG_IFNAME, desired_for, settings_for
from tests.iprule.conftest import ip_rules, sh

pytestmark = pytest.mark.privileged

CASE = CASES_BY_ID["v4-cp-reply-6443-from-node-ip"]  # local node cp1, a control-plane node
NODECRYPTOR = os.path.join(os.path.dirname(sys.executable), "nodecryptor")

# The proof of concept on cp1 (workers w1 192.168.50.21 and w2 192.168.50.22, pod CIDRs
# 10.244.1.0/24 and 10.244.2.0/24), as its Go code installed it.
POC_RULES = [
    "priority 0 fwmark 0xe00 lookup main",
    "priority 200 to 10.244.1.0/24 lookup 100",
    "priority 200 to 10.244.2.0/24 lookup 100",
    "priority 201 iif lo sport 6443 lookup main",
    "priority 201 iif lo sport 2379-2380 lookup main",
    "priority 220 to 192.168.50.21 lookup 100",
    "priority 220 to 192.168.50.22 lookup 100",
]
# On a worker it also exempts the control-plane's ports; cp1 has no other control-plane node,
# so this one names a second, hypothetical one.
POC_RULES += [
    "priority 210 to 192.168.50.11 dport 6443 lookup main",
    "priority 210 to 192.168.50.11 dport 2379-2380 lookup main",
]
# Others' rules at the same priorities, each differing from a proof-of-concept rule in one
# selector or the table. None may be touched.
FOREIGN_RULES = [
    "priority 0 fwmark 0xe00/0xf00 lookup main",
    "priority 200 to 10.99.0.0/16 lookup 200",
    "priority 201 iif eth0 sport 6443 lookup main",
    "priority 210 to 192.168.50.11 ipproto tcp dport 10250 lookup main",
    "priority 220 from 192.168.50.77 lookup 100",
    "priority 220 to 10.98.0.0/16 lookup 100",
]


def install_poc(ns: str) -> None:
    for rule in POC_RULES:
        sh(ns, "ip", "rule", "add", *rule.split())
    sh(ns, "ip", "route", "add", "default", "dev", WG_IFNAME, "table", "100")


def dummy_supported(ns: str) -> bool:
    probe = run("ip", "link", "add", "ncprobe0", "type", "dummy", netns=ns, check=False)
    if probe.returncode == 0:
        sh(ns, "ip", "link", "del", "ncprobe0")
    return probe.returncode == 0


def install_foreign(ns: str) -> None:
    for rule in FOREIGN_RULES:
        sh(ns, "ip", "rule", "add", *rule.split())
    # Someone else's device called "noop" that is not a dummy: never the proof of concept's.
    sh(ns, "ip", "link", "add", "other0", "type", "veth", "peer", "name", "noop")
    for dev in ("other0", "noop"):
        sh(ns, "ip", "link", "set", dev, "up")
    # Someone else's routes in table 100: another default (worse metric) and a prefix.
    sh(ns, "ip", "route", "add", "default", "dev", "other0", "table", "100", "metric", "500")
    sh(ns, "ip", "route", "add", "10.98.0.0/16", "dev", "other0", "table", "100")


def table(ns: str, number: str) -> list[str]:
    return sorted(
        line.strip()
        for line in sh(ns, "ip", "route", "show", "table", number).splitlines()
        if line.strip()
    )


def nodecryptor(ns: str, *args: str):
    return run(NODECRYPTOR, *args, netns=ns, check=False)


def route_get(ns: str, dst: str) -> str:
    return sh(ns, "ip", "route", "get", dst)


def test_status_reports_and_cleanup_removes_exactly_the_proof_of_concept(node_ns, tmp_path):
    ns, wg = node_ns("cp1")
    install_foreign(ns)
    install_poc(ns)
    found = proof_of_concept.find(ns)
    assert len(found["rules"]) == len(POC_RULES)
    assert len(found["routes"]) == 1 and found["noop_device"] is None  # a veth, not a dummy
    assert not found["ambiguous_rules"]

    # Status before nodecryptor is installed: it says so, and names the proof of concept.
    settings = dataclasses.replace(settings_for(CASE), run_dir=str(tmp_path / "run"))
    status = nodecryptor(ns, "status", "--json", "--bpffs", str(tmp_path))
    assert status.returncode == 1, status.stderr
    report = json.loads(status.stdout)
    assert report["datapath"] is None and report["proof_of_concept"]["present"]
    assert len(report["proof_of_concept"]["rules"]) == len(POC_RULES)

    # 1. nodecryptor first: its band (10300-10399) comes after the proof of concept's rules,
    # which keep deciding for now; both send cluster traffic into WireGuard.
    datapath = IpRuleDatapath(settings, netns=ns).start()
    try:
        datapath.apply(desired_for(CASE, wg))
        before = ip_rules(ns)
        assert f"dev {WG_IFNAME} table 100" in route_get(ns, "192.168.50.21")
        text = nodecryptor(ns, "status", "--wg-interface", WG_IFNAME, "--bpffs", str(tmp_path))
        assert text.returncode == 0, text.stderr
        assert "proof of concept: its state is still on this node" in text.stdout
        assert "220: from all to 192.168.50.21/32 lookup 100" in text.stdout

        # 2. The migration step.
        cleaned = nodecryptor(ns, "cleanup", "--proof-of-concept", "--json")
        assert cleaned.returncode == 0, cleaned.stderr
        removed = json.loads(cleaned.stdout)
        assert len(removed["rules"]) == len(POC_RULES)
        assert removed["routes"] == [f"default dev {WG_IFNAME} table 100"]
        assert removed["noop_device"] is None and removed["left_in_place"] == []
        # Removal order: rules to table 100 first, the fwmark rule last.
        assert removed["rules"][0].startswith("200:") and removed["rules"][-1].startswith("0:")

        after = ip_rules(ns)
        assert after == [r for r in before if not any(_is_poc(r, p) for p in POC_RULES)]
        assert len(before) - len(after) == len(POC_RULES)
        assert table(ns, "100") == [
            "10.98.0.0/16 dev other0 scope link",
            "default dev other0 scope link metric 500",
        ]
        links = sh(ns, "ip", "-o", "link", "show")
        assert "noop@other0" in links and "other0@noop" in links
        # nodecryptor's band is untouched and now decides.
        assert datapath.observe().ready
        assert f"dev {WG_IFNAME} table {settings.iprule_table}" in route_get(ns, "192.168.50.21")

        # Status no longer reports it; a second cleanup finds nothing.
        status = json.loads(
            nodecryptor(
                ns, "status", "--json", "--wg-interface", WG_IFNAME, "--bpffs", str(tmp_path)
            ).stdout
        )
        assert status["proof_of_concept"]["present"] is False
        again = json.loads(nodecryptor(ns, "cleanup", "--proof-of-concept", "--json").stdout)
        assert (again["rules"], again["routes"], again["noop_device"]) == ([], [], None)
    finally:
        datapath.close()
        IpRuleDatapath(settings, netns=ns).cleanup()


def _is_poc(shown: str, poc: str) -> bool:
    """Whether an `ip rule show` line is the proof-of-concept rule ``poc`` (add syntax)."""
    words = poc.split()
    prio = words[1]
    selectors = " ".join(words[2:-2])
    shown_sel = shown.split(":", 1)[1].replace("from all", "").strip()
    shown_sel = shown_sel.rsplit(" lookup ", 1)[0].strip()
    return (
        shown.startswith(f"{prio}:")
        and shown.endswith(f"lookup {words[-1]}")
        and shown_sel == selectors
    )


def test_a_foreign_rule_listed_first_with_the_same_selectors_keeps_its_twin(node_ns):
    """The kernel deletes the first rule that matches a request. A foreign rule at the same
    priority that has all of a proof-of-concept rule's selectors (and one more) and comes
    first would be hit instead, so that proof-of-concept rule is left for the operator."""
    ns, _ = node_ns("w1")
    sh(
        ns,
        "ip",
        "rule",
        "add",
        "priority",
        "220",
        "to",
        "192.168.50.22",
        "ipproto",
        "udp",
        "lookup",
        "100",
    )
    sh(ns, "ip", "rule", "add", "priority", "220", "to", "192.168.50.22", "lookup", "100")
    sh(ns, "ip", "rule", "add", "priority", "220", "to", "192.168.50.10", "lookup", "100")
    sh(ns, "ip", "route", "add", "default", "dev", WG_IFNAME, "table", "100")
    result = nodecryptor(ns, "cleanup", "--proof-of-concept", "--json")
    assert result.returncode == 1
    removed = json.loads(result.stdout)
    assert removed["rules"] == ["220: from all to 192.168.50.10/32 lookup 100"]
    assert removed["left_in_place"] == ["220: from all to 192.168.50.22/32 lookup 100"]
    rules = ip_rules(ns)
    assert "220:\tfrom all to 192.168.50.22 ipproto udp lookup 100" in rules
    assert "220:\tfrom all to 192.168.50.22 lookup 100" in rules
    assert "220:\tfrom all to 192.168.50.10 lookup 100" not in rules


def test_nothing_of_the_proof_of_concept_means_nothing_removed(node_ns):
    ns, _ = node_ns("w1")
    before = ip_rules(ns)
    assert proof_of_concept.find(ns)["present"] is False
    removed = proof_of_concept.remove(ns)
    assert (removed["rules"], removed["routes"], removed["noop_device"]) == ([], [], None)
    assert ip_rules(ns) == before


def test_the_noop_dummy_device_goes_with_its_route(node_ns):
    ns, _ = node_ns("w1")
    if not dummy_supported(ns):
        # Not require(): no CI machine can change this, and without the driver the proof of
        # concept could not have created its device either; the veth named "noop" in the test
        # above still proves a non-dummy is never removed.
        pytest.skip("this kernel has no dummy driver (CONFIG_DUMMY)")
    sh(ns, "ip", "link", "add", "noop", "type", "dummy")
    sh(ns, "ip", "link", "set", "noop", "up")
    sh(ns, "ip", "route", "add", "192.0.2.200/32", "dev", "noop")
    assert proof_of_concept.find(ns)["noop_device"]["routes"] == 1
    removed = proof_of_concept.remove(ns)
    assert removed["noop_device"] == "noop"
    assert "noop" not in sh(ns, "ip", "-o", "link", "show")
    assert "192.0.2.200" not in sh(ns, "ip", "route", "show")
