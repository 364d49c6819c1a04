"""nodecryptor's benchmark suite: datapath packet rate, per-packet program cost and the control
plane at scale, each comparison measured side by side in one run and reported as ratios.

    make bench          # full: 0 / 100 / 1,000 / 10,000 / 50,000 nodes
    make bench-quick    # 0 and 10,000 nodes, shorter runs (a few minutes)
    .venv/bin/python benchmarks/suite.py --smoke --results-dir /tmp/r   # seconds; shape only

Prints a table per section and the performance targets, and writes
``<results-dir>/<UTC time>-<mode>.json`` and ``<results-dir>/latest.json`` (contract in
``benchlib/results.py``). Needs root, BCC with kernel headers, gcc, wireguard-go.

Sections:
  datapath       packets/s through a sender node in network namespaces: baseline, nodecryptor
                 BPF, nodecryptor ip rules, the proof of concept's rules (benchlib/rate.py)
  per_packet     BPF_PROG_TEST_RUN ns per packet, from benchmarks/bpf_cost.py --json
  control_plane  the agent against the fake API server: ready time, RSS, event->datapath
                 latency under churn, for both datapaths (benchlib/control_plane.py)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

from benchlib import machine as machine_mod
from benchlib import results

MODES = {
    # datapath sizes, seconds per cell, rounds; control-plane sizes, churn seconds
    "full": {
        "sizes": [0, 100, 1_000, 10_000, 50_000],
        "seconds": 0.4,
        "rounds": 7,
        "cp_sizes": [1_000, 10_000],
        "churn_s": 20.0,
        "pp_quick": False,
    },
    "quick": {
        "sizes": [0, 10_000],
        "seconds": 0.2,
        "rounds": 5,
        "cp_sizes": [10_000],
        "churn_s": 5.0,
        "pp_quick": True,
    },
    # The test suite's form: the smallest sizes, to check that everything runs and the JSON
    # holds the contract; its numbers mean nothing.
    "smoke": {
        "sizes": [0, 100],
        "seconds": 0.1,
        "rounds": 1,
        "cp_sizes": [100],
        "churn_s": 1.0,
        "pp_quick": True,
    },
}
SECTIONS = ("per_packet", "datapath", "control_plane")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _sizes(text: str, flag: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(s < 0 or s > 65_536 for s in sizes):
        raise argparse.ArgumentTypeError(
            f"{flag} {text!r}: expected comma-separated node counts between 0 and 65536"
        )
    return sizes


BPF_COST = os.path.join(HERE, "bpf_cost.py")


def run_per_packet(
    sizes: list[int], quick: bool, notes: dict, script: str = BPF_COST
) -> list[dict]:
    """Run bpf_cost.py as a subprocess with --sizes/--json (and --quick). A bpf_cost.py that
    does not know those flags yet (argparse exits 2 naming them) leaves the section empty with
    that reason; any other failure is an error of the run."""
    with tempfile.TemporaryDirectory(prefix="nc-bench-pp-") as tmp:
        out = os.path.join(tmp, "per_packet.json")
        argv = [sys.executable, script, "--sizes", ",".join(map(str, sizes)), "--json", out] + (
            ["--quick"] if quick else []
        )
        started = time.monotonic()
        proc = subprocess.run(
            argv, capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}
        )
        if proc.returncode != 0:
            # argparse's own words for flags it does not know: the only failure tolerated.
            unsupported = proc.returncode == 2 and "unrecognized arguments" in proc.stderr
            last = proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else ""
            notes["per_packet"] = {
                "status": "unsupported" if unsupported else "failed",
                "reason": (
                    "benchmarks/bpf_cost.py does not accept --sizes/--json/--quick yet: "
                    if unsupported
                    else f"bpf_cost.py exited {proc.returncode}: "
                )
                + last,
                "command": "benchmarks/bpf_cost.py " + " ".join(argv[2:]),
            }
            return []
        with open(out) as f:
            rows = json.load(f)
        problems = results.contract_problems(
            {"machine": {"checked": True}, "datapath": [], "per_packet": rows, "control_plane": []}
        )
        if problems or not rows:
            # Keep the other sections: a bad section must not cost the whole run.
            notes["per_packet"] = {
                "status": "failed",
                "reason": "bpf_cost.py --json broke the contract: "
                + ("; ".join(problems[:5]) or "no rows"),
                "command": "benchmarks/bpf_cost.py " + " ".join(argv[2:]),
            }
            return []
        notes["per_packet"] = {
            "status": "ok",
            "seconds": round(time.monotonic() - started, 1),
            "command": "benchmarks/bpf_cost.py " + " ".join(argv[2:]),
            "what": "BPF_PROG_TEST_RUN, kernel-measured ns per packet; "
            "test-run does not perform the redirect",
        }
        return rows


def run_datapath(sizes: list[int], seconds: float, rounds: int, notes: dict) -> list[dict]:
    from benchlib import rate
    from benchlib.sender import Sender

    sender = Sender()
    rows: list[dict] = []
    detail: dict = {
        "seconds_per_cell": seconds,
        "rounds": rounds,
        "sizes": {},
        "method": rate.__doc__.strip(),
    }
    try:
        with tempfile.TemporaryDirectory(prefix="nc-bench-dp-") as tmp:
            detail["sender_ceiling"] = rate.sender_ceiling(sender, seconds, max(rounds, 2))
            log(f"datapath: sender ceiling {detail['sender_ceiling']['pps']:,.0f} packets/s")
            for nodes in sizes:
                res = rate.measure_size(sender, nodes, seconds, rounds, tmp, log=log)
                rows += res.rows
                detail["sizes"][str(nodes)] = {
                    "setup_s": res.setup_s,
                    "ratio_range_over_rounds": res.spread,
                    "wall_clock_pps": res.wall_pps,
                    "delivered_per_sent": res.delivery,
                    "send_errors": res.errors,
                }
    finally:
        sender.close()
    notes["datapath"] = detail
    return rows


def run_control_plane(
    sizes: list[int], churn_s: float, notes: dict, profile_dir: str | None
) -> list[dict]:
    from benchlib import control_plane

    rows = []
    detail: dict = {
        "churn_changes_per_s": 50,
        "churn_s": churn_s,
        "method": control_plane.__doc__.strip(),
        "runs": {},
    }
    for nodes in sizes:
        for datapath in ("bpf", "iprule"):  # alternate datapaths within each size
            profile = (
                os.path.join(profile_dir, f"agent-{datapath}-{nodes}.speedscope.json")
                if profile_dir
                else None
            )
            res = control_plane.measure(datapath, nodes, churn_s, log=log, profile=profile)
            rows.append(res.row())
            detail["runs"][f"{datapath}/{nodes}"] = {
                "cpu_ms_per_event": round(res.cpu_ms_per_event, 2),
                "changes": res.changes,
                "unseen_after_timeout": res.unseen,
                "profile": res.profile or None,
                "startup_log": res.startup,
            }
            log(
                f"  control plane {datapath} {nodes}: {res.row()} cpu/event "
                f"{res.cpu_ms_per_event:.1f} ms, unseen {res.unseen}/{res.changes}"
            )
    notes["control_plane"] = detail
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--mode", choices=sorted(MODES), default="full")
    parser.add_argument(
        "--quick", dest="mode", action="store_const", const="quick", help="same as --mode quick"
    )
    parser.add_argument(
        "--smoke",
        dest="mode",
        action="store_const",
        const="smoke",
        help="same as --mode smoke (tests)",
    )
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections (default: {','.join(SECTIONS)})",
    )
    parser.add_argument("--sizes", help="datapath and per-packet node counts (override)")
    parser.add_argument("--cp-sizes", help="control-plane node counts (override)")
    parser.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    parser.add_argument(
        "--profile-dir",
        help="record a py-spy profile of the agent during each churn here (needs py-spy)",
    )
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad or not only:
        parser.error(
            f"--only {args.only!r}: expected a comma-separated subset of {','.join(SECTIONS)}"
        )
    mode = dict(MODES[args.mode])
    try:
        if args.sizes:
            mode["sizes"] = _sizes(args.sizes, "--sizes")
        if args.cp_sizes:
            mode["cp_sizes"] = _sizes(args.cp_sizes, "--cp-sizes")
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    if os.geteuid() != 0:
        print("suite.py: needs root (network namespaces, BPF)", file=sys.stderr)
        return 1
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)

    machine = machine_mod.describe()
    log(f"machine: {machine_mod.line(machine)}")
    log(f"mode {args.mode}: {json.dumps(mode)}")
    notes: dict = {
        "mode": args.mode,
        "parameters": mode,
        "sections_run": only,
        "command": "benchmarks/suite.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    doc = {"machine": machine, "datapath": [], "per_packet": [], "control_plane": []}
    started = time.monotonic()
    if "per_packet" in only:
        log("per-packet cost (bpf_cost.py)...")
        doc["per_packet"] = run_per_packet(mode["sizes"], mode["pp_quick"], notes)
    else:
        notes["per_packet"] = {"status": "skipped", "reason": "not in --only"}
    if "datapath" in only:
        log("datapath packet rate...")
        doc["datapath"] = run_datapath(mode["sizes"], mode["seconds"], mode["rounds"], notes)
    if "control_plane" in only:
        log("control plane...")
        doc["control_plane"] = run_control_plane(
            mode["cp_sizes"], mode["churn_s"], notes, args.profile_dir
        )
    machine_mod.finish(machine)
    notes["elapsed_s"] = round(time.monotonic() - started, 1)
    doc["notes"] = notes
    path, latest = results.write(doc, args.results_dir, args.mode)

    print(f"machine: {machine_mod.line(machine)}")
    print(f"mode: {args.mode}; {notes['elapsed_s']:.0f} s; results: {path} (and {latest})")
    if doc["datapath"]:
        ceiling = notes["datapath"]["sender_ceiling"]["pps"]
        print(
            f"\nDatapath packet rate, IPv4 UDP, packets per second of sender CPU time and "
            f"ratio to baseline measured side by side (median of {mode['rounds']} "
            f"alternating rounds of {mode['seconds']:g} s). Sender ceiling (route to a "
            f"device that drops at tc egress): {ceiling:,.0f} packets/s. cilium_wg0 is a "
            f"veth stand-in."
        )
        print(results.datapath_table(doc["datapath"]))
    print("\nPer-packet cost (BPF_PROG_TEST_RUN), ns per packet and margin over the empty program:")
    if doc["per_packet"]:
        print(results.per_packet_table(doc["per_packet"]))
    else:
        print(f"  missing: {notes['per_packet'].get('reason', '')}")
    if doc["control_plane"]:
        cpu = {k: v["cpu_ms_per_event"] for k, v in notes["control_plane"]["runs"].items()}
        print(
            f"\nControl plane against the fake API server (churn: 50 changes/s for "
            f"{mode['churn_s']:g} s):"
        )
        print(results.control_plane_table(doc["control_plane"], cpu))
    print("\nTargets:")
    print(results.targets_table(doc))
    return 1 if notes["per_packet"].get("status") == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
