"""`nodecryptor-demo` (what `make demo` runs): build the network-namespace lab, run the
end-to-end scenarios, print what crossed the underlay in the clear, and remove the lab again
(see nodecryptor_testkit.lab). Development only: it is not part of the agent package or image."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from nodecryptor.commands.common import print_json
from nodecryptor.core.errors import SettingsError

from .lab.scenarios import NAMES as SCENARIO_NAMES

SCENARIO_CHOICES = ("all", "none", *SCENARIO_NAMES)

EPILOG = """examples:
  nodecryptor-demo                                   every scenario, both datapaths
  nodecryptor-demo --scenario matrix --datapath bpf  one scenario, one datapath
  nodecryptor-demo --nodes 5 --control-planes 2      a bigger lab with two control-plane nodes
  nodecryptor-demo --routing tunnel --scenario matrix  Cilium in tunnel mode (VXLAN)
  nodecryptor-demo --scenario none --keep            build a lab and leave it up to explore
  nodecryptor-demo --down                            remove a lab left up by --keep
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nodecryptor-demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Build a Cilium-like cluster from network namespaces (an underlay bridge, "
        "nodes with pods, WireGuard through a Cilium stand-in, a fake kube-apiserver "
        "on the control-plane node), run nodecryptor on every node and check with "
        "tcpdump what crosses the underlay in the clear. Needs root. Exits non-zero "
        "when any observation differs from the expectation.",
    )
    p.add_argument(
        "--scenario",
        choices=SCENARIO_CHOICES,
        default="all",
        help="scenario to run; none: only build the lab (default: %(default)s)",
    )
    p.add_argument(
        "--datapath",
        choices=("bpf", "iprule", "both"),
        default="both",
        help="nodecryptor datapath on the nodes (default: %(default)s)",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=3,
        metavar="N",
        help="nodes in the lab, control-plane ones included (default: %(default)s)",
    )
    p.add_argument(
        "--control-planes",
        type=int,
        default=1,
        metavar="M",
        help="how many of the nodes are control-plane (default: %(default)s)",
    )
    p.add_argument(
        "--wg-impl",
        choices=("auto", "kernel", "go"),
        default="auto",
        help="WireGuard implementation; auto: kernel if available, else "
        "wireguard-go (default: %(default)s)",
    )
    p.add_argument(
        "--routing",
        choices=("native", "tunnel"),
        default="native",
        help="Cilium routing mode the stand-ins play: native routing, or tunnel "
        "mode (pod traffic in VXLAN, peers' allowed-IPs node addresses only) "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--keep",
        action="store_true",
        help="leave the lab up afterwards (first datapath only) and print how to explore it",
    )
    p.add_argument("--down", action="store_true", help="remove a lab left up by --keep")
    p.add_argument("--json", action="store_true", help="print the results as JSON at the end")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return handle(args)
    except SettingsError as e:
        print(f"nodecryptor-demo: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _progress(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _raise_interrupt(signum, _frame):
    # Every such signal ends the demo like Ctrl-C does, so every finally block removes the lab.
    raise KeyboardInterrupt(f"signal {signum}")


def _nodecryptor_command() -> str:
    """How to call this nodecryptor from a shell inside a node (the venv is not on PATH)."""
    script = os.path.join(os.path.dirname(sys.executable), "nodecryptor")
    return script if os.path.exists(script) else f"{sys.executable} -m nodecryptor.cli"


def _demo_command() -> str:
    script = os.path.join(os.path.dirname(sys.executable), "nodecryptor-demo")
    return script if os.path.exists(script) else f"{sys.executable} -m nodecryptor_testkit.demo"


def _explore_help(lab) -> str:
    nc = _nodecryptor_command()
    lines = ["lab kept up. Enter a node (network and its private mounts):"]
    for name, h in lab.nodes.items():
        lines.append(
            f"  {name:<4} nsenter -t {h.holder_pid} -m -n bash     "
            f"(network only: ip netns exec {h.netns} bash)"
        )
    first = next(iter(lab.nodes.values()))
    peer = list(lab.nodes.values())[-1].spec
    lines += [
        f"then, inside a node ({lab.datapath} datapath; each node has its own bpffs, "
        f"shown here for {first.spec.name}):",
        f"  {nc} status --bpffs {first.bpffs}",
        f"  {nc} bpf dump --bpffs {first.bpffs}",
        f"  {nc} explain --bpffs {first.bpffs} --dst {peer.ipv4} --proto tcp --dport 8080",
        "  wg show cilium_wg0",
        f"watch the underlay: ip netns exec {lab.underlay} tcpdump -ni any",
        f"remove it: {_demo_command()} --down",
    ]
    return "\n".join(lines)


def handle(args) -> int:
    from .lab import report, state
    from .lab.flows import PortAllocator
    from .lab.lab import Lab
    from .lab.scenarios import NAMES, run_scenario
    from .lab.spec import make_spec
    from .lab.topology import LabError
    from .wait import WaitTimeout

    if args.down:
        removed = state.reap_kept()
        print(f"removed {len(removed)} kept lab(s)")
        return 0
    try:
        spec = make_spec(args.nodes, args.control_planes)
    except ValueError as e:
        raise SettingsError(
            "--nodes/--control-planes", f"{args.nodes}/{args.control_planes}", str(e)
        ) from None
    datapaths = ("bpf", "iprule") if args.datapath == "both" else (args.datapath,)
    if args.keep:
        datapaths = datapaths[:1]
    names = (
        NAMES if args.scenario == "all" else (() if args.scenario == "none" else (args.scenario,))
    )
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then installs
    # no KeyboardInterrupt handler of its own.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    started = time.monotonic()
    results, timings = [], {}
    ports = PortAllocator()
    for datapath in datapaths:
        lab = Lab(
            spec, datapath=datapath, wg_impl=args.wg_impl, progress=_progress, routing=args.routing
        )
        kept = False
        try:
            _progress(f"building the lab for the {datapath} datapath ({args.routing} routing)")
            try:
                lab.up()
            except (LabError, WaitTimeout) as e:
                print(f"nodecryptor-demo: building the lab failed: {e}", file=sys.stderr)
                return 1
            timings[f"lab build ({datapath})"] = lab.build_seconds
            _progress(f"lab up in {lab.build_seconds:.1f} s")
            for name in names:
                _progress(f"scenario {name} ({datapath})")
                result = run_scenario(lab, name, ports)
                results.append(result)
                if not args.json:
                    print(report.table(result), flush=True)
            if args.keep:
                lab.keep()
                kept = True
                print(_explore_help(lab))
        finally:
            # Also on Ctrl-C, SIGTERM and errors: a kept lab is only one that got fully up.
            if not kept:
                _progress(f"removing the {datapath} lab")
                lab.down()
    timings["demo total"] = time.monotonic() - started
    if args.json:
        print_json(report.to_json(results, timings))
    else:
        print(report.summary(results, timings))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
