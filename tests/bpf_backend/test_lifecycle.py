"""Agents killed at the wrong moment: a start that never reaches its first apply must not leak
its map generation, and a kill between the ingress and the egress swap must be repaired by the
next start, before it loads anything (so even a start that fails again repairs it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict

from bpf_backend_lab import in_netns
from test_bpfbackend_wire import lab  # noqa: F401

from nodecryptor.core.settings import MapSizes
from nodecryptor.datapath.bpf import lifecycle, pins

HERE = os.path.dirname(os.path.abspath(__file__))


UPGRADED = 2 * MapSizes().fragments
"""A fragment table size other than the default: a changed program text, so an agent started
with it loads a new generation (an agent with an unchanged program keeps the running one)."""


def run_agent(lab, bpffs: str, die: str = "", fragments: int = 0) -> tuple[int, str]:
    """One agent in node A's namespace (bpf_backend_lab.py hold), killed as ``die`` says, or
    with SIGKILL after its first apply; ``fragments`` changes its program (an upgrade).
    Returns (exit status, first line it printed)."""
    spec = json.dumps(
        {"bpffs": bpffs, "a": asdict(lab.a), "b": asdict(lab.b), "die": die, "fragments": fragments}
    )
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            lab.a.netns,
            sys.executable,
            os.path.join(HERE, "bpf_backend_lab.py"),
            "hold",
            spec,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not die:
            assert line.startswith("applied "), line
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    return proc.returncode, line


def hook_generations(bpffs: str) -> dict[tuple[str, str], object]:
    """{(direction, device): generation number its program uses} in node A."""
    out = {}
    for _mode, direction, name, prog_id in lifecycle.hooked_programs(bpffs):
        used = lifecycle._map_ids_of(prog_id)
        found = [
            n for n in pins.generations(bpffs) if lifecycle.generation_map_ids(bpffs, n) & used
        ]
        out[direction, name] = found[0] if len(found) == 1 else tuple(found)
    return out


def test_killed_starts_leak_nothing_and_a_split_swap_is_repaired_at_start(lab, bpffs):
    assert run_agent(lab, bpffs)[0] == -signal.SIGKILL
    with in_netns(lab.a.netns):
        first = hook_generations(bpffs)
    assert set(first) == {("egress", "eth0"), ("ingress", "eth0"), ("ingress", "cilium_wg0")}
    assert len(set(first.values())) == 1, first
    (enforcing,) = set(first.values())

    # An upgrade (another program) killed between its ingress and its egress swap.
    status, line = run_agent(lab, bpffs, die="before-egress", fragments=UPGRADED)
    assert status == -signal.SIGKILL and line.startswith("dying before the egress swap")
    with in_netns(lab.a.netns):
        split = hook_generations(bpffs)
    # The fault really happened: eth0's ingress runs the new generation, its egress the old.
    assert split["egress", "eth0"] == enforcing != split["ingress", "eth0"], split

    for _ in range(3):
        status, line = run_agent(lab, bpffs, die="after-start", fragments=UPGRADED)
        assert status == -signal.SIGKILL and line.startswith("started "), line
    with in_netns(lab.a.netns):
        after = hook_generations(bpffs)
        left = pins.generations(bpffs)
    # Every hook is back on one generation, and besides it only the generation of the last
    # (killed) start is pinned: each start removed what the one before it leaked.
    assert set(after.values()) == {enforcing}, after
    assert left == [enforcing, max(left)] and max(left) > enforcing, left

    # A normal start repairs and then attaches its own generation everywhere.
    assert run_agent(lab, bpffs, fragments=UPGRADED)[0] == -signal.SIGKILL
    with in_netns(lab.a.netns):
        final = hook_generations(bpffs)
        left = pins.generations(bpffs)
    assert len(set(final.values())) == 1 and left == [final["egress", "eth0"]], (final, left)
