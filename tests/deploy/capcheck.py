"""Run the agent's kernel operations one by one and report which succeed, as JSON on stdout.

tests/deploy/test_deploy_capabilities.py starts this script inside a fresh network namespace,
with the root filesystem read-only and the capability sets cut down by ``setpriv`` to what
k8s/daemonset.yaml grants (or that set minus one capability). It is a script, not a test module,
so that it runs with exactly those capabilities and nothing the test process holds.

Steps run in order and stop at the first required failure, because each depends on the one
before (no program, no link). Each step reports ``ok`` and, on failure, the error and errno.

    capcheck.py --device v0 --peer v1 --bpffs DIR [--program representative|nodecryptor]
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from nodecryptor.datapath.bpf import syscall

PIN_SUBDIR = "nodecryptor-capcheck"
RULE_PRIORITY = 10398  # inside nodecryptor's default band; the namespace is private anyway
RULE_TABLE = 2026
TC_HANDLE = 0x4E43
TC_EGRESS_PARENT = 0xFFFFFFF3


class Steps:
    """Records each step's outcome; ``run`` returns the step's value or raises _Stop."""

    class _Stop(Exception):
        pass

    def __init__(self):
        self.results: list[dict] = []

    def run(self, name: str, fn, required: bool = True):
        started = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # any failure is the result being measured
            code = getattr(e, "errno", None) or getattr(e, "code", None)
            self.results.append(
                {
                    "name": name,
                    "ok": False,
                    "required": required,
                    "error": f"{type(e).__name__}: {e}"[:400],
                    "errno": errno.errorcode.get(code, "") if isinstance(code, int) else "",
                }
            )
            if required:
                raise self._Stop() from None
            return None
        self.results.append(
            {
                "name": name,
                "ok": True,
                "required": required,
                "seconds": round(time.perf_counter() - started, 3),
            }
        )
        return value


def cap_eff() -> str:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return line.split()[1]
    return ""


def load_representative(steps: Steps, pin_dir: str):
    from bcc import BPF

    bpf = steps.run(
        "compile-and-create-maps", lambda: BPF(src_file=str(HERE / "representative.c").encode())
    )
    fn = steps.run("load-program", lambda: bpf.load_func(b"rep_egress", BPF.SCHED_CLS))

    def pin_maps():
        os.makedirs(pin_dir, exist_ok=True)
        for name in (b"rep_dst", b"rep_exempt", b"rep_config", b"rep_counters", b"rep_frags"):
            syscall.obj_pin(bpf[name].map_fd, f"{pin_dir}/{name.decode()}")

    steps.run("pin-maps", pin_maps)
    return bpf, fn.fd


def load_nodecryptor(steps: Steps, pin_dir: str):
    from nodecryptor.datapath.bpf import program
    from nodecryptor.core.settings import Settings

    def load():
        os.makedirs(pin_dir, exist_ok=True)
        return program.load(Settings(), pin_dir)

    loaded = steps.run("load-nodecryptor-program", load)
    return loaded, loaded.prog_fd


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", required=True)
    parser.add_argument("--peer", required=True)
    parser.add_argument("--bpffs", required=True)
    parser.add_argument(
        "--program", choices=("representative", "nodecryptor"), default="representative"
    )
    args = parser.parse_args()

    steps = Steps()
    pin_dir = f"{args.bpffs}/{PIN_SUBDIR}"
    ifindex = int(Path(f"/sys/class/net/{args.device}/ifindex").read_text())
    peer_ifindex = int(Path(f"/sys/class/net/{args.peer}/ifindex").read_text())
    keep = []  # BPF objects stay referenced until the end
    try:
        loader = load_nodecryptor if args.program == "nodecryptor" else load_representative
        obj, prog_fd = loader(steps, pin_dir)
        keep.append(obj)
        link_fd = steps.run("tcx-attach", lambda: syscall.tcx_link_create(prog_fd, ifindex))
        steps.run("pin-link", lambda: syscall.obj_pin(link_fd, f"{pin_dir}/link-{args.device}"))

        def reopen_and_swap():
            # What a restarted agent does: open the pinned link, swap the program in place.
            with syscall.obj_get(f"{pin_dir}/link-{args.device}") as link:
                syscall.link_update(link, prog_fd)

        steps.run("reopen-link-and-swap-program", reopen_and_swap)
        chain = steps.run("query-tcx-chain", lambda: syscall.prog_query(ifindex))
        prog_id = syscall.link_info(link_fd).prog_id

        def open_by_id():
            syscall.prog_fd_by_id(prog_id).close()

        # Not needed by the agent; recorded because an inspection command that opens the
        # attached program by id needs it (the docs say so, backed by this step).
        steps.run("open-program-by-id", open_by_id, required=False)

        from pyroute2 import IPRoute

        def tc_attach():
            with IPRoute() as ipr:
                ipr.tc("add", "clsact", index=peer_ifindex)
                ipr.tc(
                    "add-filter",
                    "bpf",
                    index=peer_ifindex,
                    handle=TC_HANDLE,
                    fd=prog_fd,
                    name="nodecryptor",
                    parent=TC_EGRESS_PARENT,
                    prio=1,
                    direct_action=True,
                )

        steps.run("tc-clsact-attach", tc_attach)

        def rules_and_routes():
            with IPRoute() as ipr:
                ipr.rule("add", priority=RULE_PRIORITY, table=RULE_TABLE, family=2)
                ipr.route("add", dst="10.244.9.0/24", oif=ifindex, table=RULE_TABLE)

        steps.run("ip-rule-and-route", rules_and_routes)

        def cleanup():
            with IPRoute() as ipr:
                ipr.route("del", dst="10.244.9.0/24", oif=ifindex, table=RULE_TABLE)
                ipr.rule("del", priority=RULE_PRIORITY, table=RULE_TABLE, family=2)
                ipr.tc("del", "clsact", index=peer_ifindex)
            syscall.link_detach(link_fd)
            for name in os.listdir(pin_dir):
                os.unlink(f"{pin_dir}/{name}")
            os.rmdir(pin_dir)

        steps.run("detach-and-unpin", cleanup)
        result_chain = chain
    except Steps._Stop:
        result_chain = None
    print(json.dumps({"cap_eff": cap_eff(), "steps": steps.results, "tcx_chain": result_chain}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
