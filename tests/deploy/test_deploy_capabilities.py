"""The DaemonSet's capability set is enough for the agent's kernel operations, and minimal.

Each run starts tests/deploy/capcheck.py in a fresh network namespace (a veth pair stands in for
the underlay), in a private mount namespace whose root filesystem is remounted read-only (the
container runs with readOnlyRootFilesystem), on a private bpffs whose root has mode 0700 (as
systemd mounts /sys/fs/bpf), as uid 0 with ``setpriv`` cutting the bounding, inheritable and
ambient sets to exactly the capabilities of k8s/daemonset.yaml, and with no_new_privs
(allowPrivilegeEscalation: false). ``capsh --decode`` checks what the child really held.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require
from deploy_manifests import REPO, agent_capabilities
from nodecryptor_testkit import netns as netns_mod

pytestmark = [pytest.mark.privileged, pytest.mark.bpf]

CAPCHECK = Path(__file__).resolve().parent / "capcheck.py"

# For every capability the DaemonSet adds: the operation that fails without it, and a text the
# failure shows (in the step's error or in BCC's verifier output on stderr). A capability added
# to the manifest without an entry here fails test_each_capability_is_needed.
NEEDED_FOR = {
    "NET_ADMIN": (
        "load-program",
        "Need super-user privileges",
        "BPF_PROG_LOAD of a SCHED_CLS program (a networking program type)",
    ),
    "BPF": (
        "compile-and-create-maps",
        "could not open bpf map",
        "BPF_MAP_CREATE of the LPM trie, hash, LRU and per-CPU maps",
    ),
    "PERFMON": (
        "load-program",
        "pointer arithmetic with it prohibited for !root",
        "the verifier refuses variable-offset packet pointer arithmetic",
    ),
}


def _python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _decode(cap_eff: str) -> set[str]:
    """Names (Kubernetes spelling) of the capabilities in a CapEff mask, via capsh."""
    out = subprocess.run(
        ["capsh", f"--decode={cap_eff}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    names = out.partition("=")[2]
    return {n.removeprefix("cap_").upper() for n in names.split(",") if n}


def run_capcheck(ns: str, bpffs: str, caps: list[str], program: str = "representative"):
    bounding = ",".join(["-all"] + [f"+{c.lower()}" for c in caps])
    inner = (
        f"mount -o remount,bind,ro / && exec setpriv --no-new-privs --inh-caps=-all "
        f"--ambient-caps=-all --bounding-set={bounding} -- {_python()} -B {CAPCHECK} "
        f"--device v0 --peer v1 --bpffs {bpffs} --program {program}"
    )
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, "unshare", "-m", "--propagation", "private", "sh", "-c", inner],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"capcheck crashed: {proc.stderr[-2000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture
def lab(netns, bpffs, bcc_available):
    require(shutil.which("setpriv") is not None, "setpriv (util-linux) not installed")
    require(shutil.which("capsh") is not None, "capsh (libcap2-bin) not installed")
    ns = netns("caps")
    netns_mod.run("ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1", netns=ns)
    netns_mod.run("ip", "link", "set", "v0", "up", netns=ns)
    netns_mod.run("ip", "link", "set", "v1", "up", netns=ns)
    subprocess.run(["chmod", "0700", bpffs], check=True)
    return ns, bpffs


def _failed(result: dict) -> list[dict]:
    return [s for s in result["steps"] if s["required"] and not s["ok"]]


def test_daemonset_capabilities_suffice(lab):
    ns, bpffs = lab
    caps = agent_capabilities()
    result, stderr = run_capcheck(ns, bpffs, caps)

    assert _decode(result["cap_eff"]) == set(caps), "the child did not hold exactly the set"
    assert not _failed(result), f"operations failed with {caps}: {_failed(result)}\n{stderr}"
    names = [s["name"] for s in result["steps"] if s["ok"]]
    for step in (
        "compile-and-create-maps",
        "load-program",
        "pin-maps",
        "tcx-attach",
        "pin-link",
        "reopen-link-and-swap-program",
        "query-tcx-chain",
        "tc-clsact-attach",
        "ip-rule-and-route",
        "detach-and-unpin",
    ):
        assert step in names
    assert len(result["tcx_chain"]["link_ids"]) == 1
    # Documented in the guide: opening a program by id (BPF_PROG_GET_FD_BY_ID) needs
    # CAP_SYS_ADMIN, which the DaemonSet does not grant.
    by_id = next(s for s in result["steps"] if s["name"] == "open-program-by-id")
    assert not by_id["ok"] and by_id["errno"] == "EPERM"


@pytest.mark.parametrize("missing", agent_capabilities())
def test_each_capability_is_needed(lab, missing):
    assert missing in NEEDED_FOR, (
        f"k8s/daemonset.yaml adds {missing} but no operation is known to need it: name the "
        f"operation in NEEDED_FOR or remove the capability"
    )
    step, marker, _why = NEEDED_FOR[missing]
    ns, bpffs = lab
    caps = [c for c in agent_capabilities() if c != missing]
    result, stderr = run_capcheck(ns, bpffs, caps)

    assert _decode(result["cap_eff"]) == set(caps)
    failed = _failed(result)
    assert failed, f"everything still worked without {missing}: the set is not minimal"
    assert failed[0]["name"] == step, (missing, failed[0], stderr[-1500:])
    assert marker in failed[0]["error"] + stderr, (missing, failed[0], stderr[-1500:])


def test_real_program_loads_with_daemonset_capabilities(lab):
    # The project's own program and loader: if either fails to import or load, capcheck
    # reports the step failed and this test fails (the lab fixture already required bcc).
    ns, bpffs = lab
    result, stderr = run_capcheck(ns, bpffs, agent_capabilities(), program="nodecryptor")
    assert not _failed(result), f"{_failed(result)}\n{stderr[-3000:]}"
    assert len(result["tcx_chain"]["link_ids"]) == 1


@pytest.mark.parametrize("missing", agent_capabilities())
def test_real_program_needs_each_capability(lab, missing):
    """The same minimality for bpf/nodecryptor.c loaded by the real loader (maps are created,
    pinned and the program loaded in one step there)."""
    assert missing in NEEDED_FOR
    _step, marker, _why = NEEDED_FOR[missing]
    ns, bpffs = lab
    caps = [c for c in agent_capabilities() if c != missing]
    result, stderr = run_capcheck(ns, bpffs, caps, program="nodecryptor")
    failed = _failed(result)
    assert failed and failed[0]["name"] == "load-nodecryptor-program", (missing, result)
    assert marker in failed[0]["error"] + stderr, (missing, failed[0], stderr[-1500:])
