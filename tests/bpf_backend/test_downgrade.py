"""Upgrades and rollbacks between releases on one node (operator guide, "Upgrades and
rollbacks"): the previous release, taken from git history, is installed, upgraded to this one
and rolled back to, each run a real agent process killed after its apply; afterwards the
node's hooks all run the previous release's program and its bootstrap and encrypted flows
work. And this release's half of the compatibility rule: pins of a newer release it does not
know are removed at start, their hooks detached."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict

import pytest

from bpf_backend_lab import Capture, in_netns, load_ret_prog
from conftest import require
from test_bpfbackend_wire import Receiver, lab, tcp_exchange, udp_socket  # noqa: F401
from test_lifecycle import hook_generations, run_agent

from nodecryptor.datapath.bpf import attach, pins, syscall
from nodecryptor.datapath.bpf.backend import BpfDatapath

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PREVIOUS_RELEASE = "8faf782"
"""The last commit before the package re-layout: what nodes run when this release rolls out."""


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory):
    """The previous release's tree (``git archive``), run with PYTHONPATH pointing at it."""
    known = subprocess.run(
        ["git", "-C", REPO, "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"], capture_output=True
    )
    require(known.returncode == 0, f"git history without {PREVIOUS_RELEASE} (shallow clone?)")
    out = tmp_path_factory.mktemp("previous-release")
    archive = subprocess.run(
        ["git", "-C", REPO, "archive", PREVIOUS_RELEASE], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return str(out)


def run_previous(tree: str, lab, bpffs: str) -> int:
    """The previous release's agent stand-in on node A, SIGKILLed after its first apply.
    Returns the egress program id it attached."""
    spec = json.dumps({"bpffs": bpffs, "a": asdict(lab.a), "b": asdict(lab.b)})
    env = dict(os.environ, PYTHONPATH=tree, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lab.a.netns,
            sys.executable,
            os.path.join(tree, "tests", "bpf_backend", "bpf_backend_lab.py"),
            "hold",
            spec,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tree,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("applied "), line
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return int(line.split()[1])


def egress_prog_id(bpffs: str) -> int:
    att = attach.tcx_observe(bpffs, "eth0")
    return att.prog_id if att else 0


def test_upgrade_then_rollback_to_the_previous_release_keeps_the_node_working(
    lab, bpffs, previous_release, tmp_path
):
    a, b = lab.a, lab.b
    old_id = run_previous(previous_release, lab, bpffs)
    assert run_agent(lab, bpffs)[0] == -signal.SIGKILL  # upgrade
    with in_netns(a.netns):
        upgraded = hook_generations(bpffs)
        assert egress_prog_id(bpffs) != old_id
    assert len(set(upgraded.values())) == 1, upgraded

    rolled_back_id = run_previous(previous_release, lab, bpffs)  # rollback
    with in_netns(a.netns):
        after = hook_generations(bpffs)
        assert egress_prog_id(bpffs) == rolled_back_id
        left = pins.generations(bpffs)
        unknown = pins.unknown_root_entries(bpffs)
    # Every hook, ingress included, runs the previous release's generation: nothing of this
    # release keeps running with maps nobody updates.
    assert set(after) == {("egress", "eth0"), ("ingress", "eth0"), ("ingress", "cilium_wg0")}
    assert len(set(after.values())) == 1 and left == list(set(after.values())), (after, left)
    assert unknown == []

    rx_b = Receiver(b.netns, udp_ports=(7777,), tcp_ports=(6443, 2379))
    cap = Capture(a.netns, "eth0", str(tmp_path / "rollback.pcap"))
    try:
        # Bootstrap flows to the control-plane node B, in the clear by design, both ways.
        tcp_exchange(a.netns, b.ip, 6443, b"apiserver after rollback")
        tcp_exchange(a.netns, b.ip, 2379, b"etcd after rollback")
        sender = udp_socket(a.netns)
        for i in range(5):
            sender.sendto(b"encrypted-%d" % i, (b.ip, 7777))
        sender.close()
        assert len(rx_b.drain(7777, wait=3.0, want=5)) == 5
    finally:
        lines = cap.stop()
        rx_b.close()
    assert [line for line in lines if f"{b.ip}.6443" in line], lines[:20]
    assert [line for line in lines if f"{b.ip}.2379" in line], lines[:20]
    assert not [line for line in lines if f"{b.ip}.7777" in line], lines[:20]


def test_pins_of_a_newer_release_are_removed_and_their_hooks_detached(lab, bpffs):
    """A newer release's hook kind (its own links-<hook>/ directory), here a program that drops
    everything on eth0's ingress: this release must not leave it running."""
    a = lab.a
    drop_all = load_ret_prog(2, "nc_future")  # TC_ACT_SHOT
    try:
        with in_netns(a.netns):
            pins.ensure_dirs(bpffs)
            future = os.path.join(pins.root(bpffs), "links-future")
            os.mkdir(future, 0o700)
            link = syscall.tcx_link_create(
                drop_all, attach.ifindex_of("eth0"), syscall.BPF_TCX_INGRESS
            )
            syscall.obj_pin(link, os.path.join(future, "eth0"))
            link.close()
            assert pins.unknown_root_entries(bpffs) == ["links-future"]
            dp = BpfDatapath(lab.settings(bpffs))
            try:
                dp.start()
            finally:
                dp.close()
            chain = attach.query(attach.ifindex_of("eth0"), attach.INGRESS)["tcx"]
        assert pins.unknown_root_entries(bpffs) == []
        assert not os.path.exists(future)
        assert chain == [], chain  # detached, not only unpinned
    finally:
        drop_all.close()


def test_every_root_pin_this_release_writes_is_known_to_it():
    """A root pin missing from KNOWN_ROOT_ENTRIES would be removed by this release's own next
    start (remove_unknown): every path helper's name must be listed."""
    root = pins.root("/sys/fs/bpf")
    written = [
        pins.prog_path("/sys/fs/bpf"),
        pins.explain_prog_path("/sys/fs/bpf"),
        pins.ingress_prog_path("/sys/fs/bpf"),
        pins.explain_ingress_prog_path("/sys/fs/bpf"),
        pins.links_dir("/sys/fs/bpf", attach.EGRESS),
        pins.links_dir("/sys/fs/bpf", attach.INGRESS),
        pins.programs_dir("/sys/fs/bpf"),
    ]
    assert {os.path.relpath(p, root) for p in written} == set(pins.KNOWN_ROOT_ENTRIES)
    assert os.path.dirname(pins.abi_dir("/sys/fs/bpf")) == root
