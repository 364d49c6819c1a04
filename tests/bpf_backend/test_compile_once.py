"""Compile once per program text: the real BPF backend in a network namespace with a private
bpffs and run directory.

- a restart with an unchanged program reaches the attached state without entering the compile
  path (loader's child counter and the status record say so), keeps the same program and maps,
  and still encrypts every cluster destination;
- an agent that died between compile and attach (a crash loop) reuses the pinned program too;
- the key does not depend on where the sources are installed, but one changed source byte is
  a new key and is compiled; at most the current and one previous key stay pinned;
- a compile error in the child comes back as the same DatapathError as in-process;
- the agent's own process never maps libbcc (so never LLVM) when the child compiled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bpf_backend_lab import REPO, in_netns, nodecryptor_cli, sh
from conftest import require
from test_capacity import SIZES, assert_all_encrypted, desired

from nodecryptor.core.errors import DatapathError
from nodecryptor.core.settings import Settings
from nodecryptor.datapath.bpf import attach, loader, pins, program, syscall
from nodecryptor.datapath.bpf.backend import BpfDatapath

pytestmark = [pytest.mark.privileged, pytest.mark.bpf]

NODES = range(4)


@pytest.fixture
def node(netns, bpffs, bcc_available, tmp_path):
    """(namespace, ifindex by name, start): ``start()`` starts a BpfDatapath in the namespace
    the way the agent does; the caller closes it (an agent exit) or not (a crash)."""
    ok, why = syscall.tcx_supported()
    require(ok, f"kernel without tcx: {why}")
    ns = netns("once")
    sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", netns=ns)
    sh("ip", "link", "add", "cilium_wg0", "type", "veth", "peer", "name", "wgpeer0", netns=ns)
    for dev in ("eth0", "peer0", "cilium_wg0", "wgpeer0"):
        sh("ip", "link", "set", dev, "up", netns=ns)
    with in_netns(ns):
        import socket

        ifindex = {name: socket.if_nametoindex(name) for name in ("eth0", "cilium_wg0")}
    settings = Settings(bpffs=bpffs, map_sizes=SIZES, run_dir=str(tmp_path / "run"))
    os.makedirs(settings.run_dir)
    started = []

    def start() -> BpfDatapath:
        with in_netns(ns):
            dp = BpfDatapath(settings).start()
        started.append(dp)
        return dp

    yield ns, ifindex, start, settings
    for dp in started:
        dp.close()


def apply(ns, dp, ifindex) -> None:
    with in_netns(ns):
        dp.apply(desired(ifindex, NODES))


def attached_prog_id(ns, bpffs) -> int:
    with in_netns(ns):
        return attach.tcx_observe(bpffs, "eth0").prog_id


def test_restart_with_unchanged_program_does_not_compile(node, bpffs):
    ns, ifindex, start, settings = node
    before = loader.compile_children_started
    first = start()
    assert loader.compile_children_started == before + 1
    assert loader.last_record(settings)["source"] == "compiled"
    assert loader.last_record(settings)["compile_seconds"] > 0
    apply(ns, first, ifindex)
    prog_id, generation = first.prog_id, pins.current_generation(bpffs)
    shown = status(ns, settings)
    assert shown["program_load"]["source"] == "compiled"
    assert shown["program_load"]["compile_seconds"] > 0
    first.close()

    second = start()
    assert loader.compile_children_started == before + 1, "the restart compiled"
    record = loader.last_record(settings)
    assert (record["source"], record["compile_seconds"], record["prog_id"]) == (
        "reused",
        0,
        prog_id,
    )
    assert second.observe().details["program"]["source"] == "reused"
    # The attached generation is kept as it is: same program, same maps, nothing new pinned.
    assert (second.prog_id, pins.generations(bpffs)) == (prog_id, [generation])
    apply(ns, second, ifindex)
    with in_netns(ns):
        observed = second.observe()
    assert observed.ready, observed.reason
    assert attached_prog_id(ns, bpffs) == prog_id
    assert_all_encrypted(ns, bpffs, NODES)
    assert pins.program_keys(bpffs) == [record["key"]]
    assert status(ns, settings)["program_load"]["source"] == "reused"
    text = nodecryptor_cli("status", "--bpffs", bpffs, "--run-dir", settings.run_dir, netns=ns)
    assert f"program: reused, not compiled (key {record['key']})" in text.stdout, text.stdout


def status(ns: str, settings: Settings) -> dict:
    done = nodecryptor_cli(
        "status", "--json", "--bpffs", settings.bpffs, "--run-dir", settings.run_dir, netns=ns
    )
    assert done.stdout, done.stderr
    return json.loads(done.stdout)


def test_crash_between_compile_and_attach_reuses_the_program(node, bpffs):
    """A crash loop: the first agent compiled and died before attaching anything; the next
    one reuses the pinned program set in a new generation and attaches it."""
    ns, ifindex, start, settings = node
    before = loader.compile_children_started
    crashed = start()
    crashed_id = crashed.prog_id
    crashed.close()  # nothing was applied: no link, no current generation
    assert pins.current_generation(bpffs) is None
    second = start()
    assert loader.compile_children_started == before + 1, "the restart compiled"
    assert loader.last_record(settings)["source"] == "reused"
    assert second.prog_id == crashed_id
    apply(ns, second, ifindex)
    assert attached_prog_id(ns, bpffs) == crashed_id
    assert_all_encrypted(ns, bpffs, NODES)


def sources_copy(tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(program.bpf_dir().resolve(), target)
    return target


def test_changed_program_text_compiles_and_old_keys_are_bounded(node, bpffs, tmp_path, monkeypatch):
    ns, ifindex, start, settings = node
    first_copy = sources_copy(tmp_path, "src-a")
    monkeypatch.setattr(program, "bpf_dir", lambda: first_copy)
    before = loader.compile_children_started
    dp = start()
    apply(ns, dp, ifindex)
    key_a = loader.last_record(settings)["key"]
    dp.close()

    # The same bytes installed elsewhere (a new image, another venv): the same key, reused.
    moved = sources_copy(tmp_path, "src-moved")
    monkeypatch.setattr(program, "bpf_dir", lambda: moved)
    dp = start()
    assert loader.compile_children_started == before + 1
    assert loader.last_record(settings)["key"] == key_a
    dp.close()

    keys = [key_a]
    for n in range(2):
        changed = sources_copy(tmp_path, f"src-changed-{n}")
        entry = changed / program.ENTRY_FILE
        entry.write_text(entry.read_text() + f"\n#define NC_UNUSED_TEST_DEFINE_{n} 1\n")
        monkeypatch.setattr(program, "bpf_dir", lambda changed=changed: changed)
        dp = start()
        assert loader.compile_children_started == before + 2 + n, "the changed text was reused"
        record = loader.last_record(settings)
        assert record["source"] == "compiled" and record["key"] not in keys
        keys.append(record["key"])
        apply(ns, dp, ifindex)
        assert attached_prog_id(ns, bpffs) == dp.prog_id
        assert_all_encrypted(ns, bpffs, NODES)
        dp.close()
        # The current key and the one it replaced; anything older is unpinned.
        assert pins.program_keys(bpffs) == sorted(keys[-2:])


def test_compile_error_in_the_child_is_the_in_process_error(
    bpffs, bcc_available, tmp_path, monkeypatch
):
    broken = sources_copy(tmp_path, "src-broken")
    entry = broken / program.ENTRY_FILE
    entry.write_text(entry.read_text() + "\nthis is not C;\n")
    monkeypatch.setattr(program, "bpf_dir", lambda: broken)
    settings = Settings(bpffs=bpffs, map_sizes=SIZES, run_dir=str(tmp_path))
    pins.ensure_dirs(bpffs)
    number, path = pins.new_generation(bpffs)
    with pytest.raises(DatapathError) as in_child:
        loader.obtain(settings, path)
    with pytest.raises(DatapathError) as in_process:
        program.load(settings, path)
    assert (type(in_child.value), str(in_child.value)) == (
        type(in_process.value),
        str(in_process.value),
    )
    assert isinstance(in_child.value, program.CompileFailed)
    assert "compiling" in str(in_child.value) and str(entry) in str(in_child.value)
    # Nothing half-made is left to be reused.
    assert os.listdir(pins.programs_dir(bpffs)) == []


RSS_PROBE = r"""
import json, sys
from nodecryptor.core.settings import MapSizes, Settings
from nodecryptor.datapath.bpf.backend import BpfDatapath
from nodecryptor.datapath.bpf import program
settings = Settings(bpffs=sys.argv[1], run_dir=sys.argv[2],
                    map_sizes=MapSizes(destinations_v4=64, destinations_v6=64))
if sys.argv[3] == "agent":
    dp = BpfDatapath(settings).start()
else:
    loaded = program.load(settings)
maps = open("/proc/self/maps").read()
rss = next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1]
print(json.dumps({"libbcc": "libbcc" in maps, "llvm": "LLVM" in maps, "rss_kib": int(rss)}))
"""


def rss_probe(bpffs: str, run_dir: str, how: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, bpffs, run_dir, how],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_agent_process_never_maps_the_compiler(bpffs, bcc_available, tmp_path):
    """Started in a fresh process like the agent: the compile happened in the child, so
    libbcc (which links LLVM) was never mapped into the agent; the in-process path maps it."""
    agent = rss_probe(bpffs, str(tmp_path), "agent")
    assert loader.last_record(Settings(run_dir=str(tmp_path)))["source"] == "compiled"
    assert (agent["libbcc"], agent["llvm"]) == (False, False)
    in_process = rss_probe(bpffs, str(tmp_path), "in-process")
    assert in_process["libbcc"], "the probe cannot see a mapped libbcc"
    assert agent["rss_kib"] < in_process["rss_kib"]
