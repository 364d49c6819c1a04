"""Agent start-up with and without a compile: cold start (empty bpffs, the program is compiled
in the loader's child process) against warm restart (the pinned program of the same key is
reused), with the real agent (``nodecryptor run``) against the fake API server, BPF datapath.

Run as root from the repository root:

    .venv/bin/python benchmarks/startup_program.py --rounds 5 --nodes 1000

Per round: clean the pins, start the agent (cold), stop it with SIGTERM, start it again (warm),
stop it. For each start it reports

* ``ready_s``: spawn -> first ``/readyz`` 200;
* ``attached_s``: spawn -> the program the agent recorded (run directory, ``program.json``) is
  the one the tcx link on eth0 runs;
* ``source`` and ``compile_s`` from that record, and the agent's VmRSS at readiness.

``--agent PATH`` runs another ``nodecryptor`` executable (e.g. an older checkout's, to compare
with the in-process compile; then ``attached_s`` and ``source`` are not available).
It prints one JSON line per start and the medians; the load average is printed alongside,
since other work on the machine changes the compile time a lot.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.benchlib import cluster, control_plane, observe
from nodecryptor.datapath.bpf import attach


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def attached_prog(bench, worker) -> int:
    att = worker.call(lambda: attach.tcx_observe(bench.bpffs, "eth0"))
    return att.prog_id if att is not None and not att.defunct else 0


def start(bench, worker, agent: str, run_dir: str) -> dict:
    record_path = os.path.join(run_dir, "program.json")
    if os.path.exists(record_path):
        os.unlink(record_path)
    spawned = time.monotonic()
    proc = bench._spawn(
        "agent",
        bench.agent_ns,
        [
            agent,
            "run",
            "--kubeconfig",
            bench.kubeconfig,
            "--node-name",
            cluster.LOCAL_NAME,
            "--bpffs",
            bench.bpffs,
            "--run-dir",
            run_dir,
            "--datapath",
            "bpf",
            "--wg-interface",
            bench.wg,
            "--health-probe-bind-address",
            control_plane.HEALTH,
            "--metrics-server-bind-address",
            control_plane.METRICS,
            "--log-format",
            "json",
        ],
    )
    out: dict = {"ready_s": None, "attached_s": None}
    record = None
    deadline = spawned + control_plane.READY_TIMEOUT_S
    while time.monotonic() < deadline and out["ready_s"] is None:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited: {bench.log_tail(proc)}")
        if record is None:
            try:
                with open(record_path) as f:
                    record = json.load(f)
            except (OSError, ValueError):
                record = None
        if (
            out["attached_s"] is None
            and record is not None
            and attached_prog(bench, worker) == record["prog_id"]
        ):
            out["attached_s"] = round(time.monotonic() - spawned, 3)
        if worker.call(bench._readyz):
            out["ready_s"] = round(time.monotonic() - spawned, 3)
            out["rss_mib"] = round(rss_mib(proc.pid), 1)
        time.sleep(0.02)
    if out["ready_s"] is None:
        raise RuntimeError(f"agent not ready: {bench.log_tail(proc)}")
    if (
        out["attached_s"] is None
        and record is not None
        and attached_prog(bench, worker) == record["prog_id"]
    ):
        out["attached_s"] = out["ready_s"]
    if record is not None:
        out.update(source=record["source"], compile_s=record["compile_seconds"])
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    bench.procs.pop("agent", None)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument(
        "--agent",
        default=control_plane.NODECRYPTOR,
        help="nodecryptor executable (default: %(default)s)",
    )
    args = p.parse_args(argv)
    bench = control_plane.Bench("bpf", args.nodes, log=print)
    rows: dict[str, list[dict]] = {"cold": [], "warm": []}
    try:
        bench.setup()
        worker = observe.InNetns(bench.agent_ns)
        run_dir = os.path.join(bench.tmp, "run")
        os.makedirs(run_dir)
        for n in range(args.rounds):
            for kind in ("cold", "warm"):
                load = os.getloadavg()[0]
                row = {
                    "round": n,
                    "start": kind,
                    "load1": round(load, 2),
                    **start(bench, worker, args.agent, run_dir),
                }
                rows[kind].append(row)
                print(json.dumps(row), flush=True)
            control_plane.netns.run(
                args.agent,
                "cleanup",
                "--bpffs",
                bench.bpffs,
                netns=bench.agent_ns,
                check=False,
                timeout=60,
            )
    finally:
        bench.close()
    for kind, found in rows.items():
        summary = {"start": kind, "rounds": len(found)}
        for field in ("ready_s", "attached_s", "compile_s", "rss_mib"):
            values = [r[field] for r in found if r.get(field) is not None]
            if values:
                summary[f"median_{field}"] = round(statistics.median(values), 3)
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
