"""`nodecryptor status`: what is installed on this node and whether it enforces.

Works from pinned objects and netlink only (no compiler), whether or not the agent runs. The
datapath layer finds the active datapath (``datapath.detect``); this command also reports the
original Go proof of concept's ip rules when they are still on the node (migration).
"""

from __future__ import annotations

from nodecryptor.datapath import detect
from nodecryptor.datapath.choice import last_choice
from nodecryptor.commands.common import (
    add_bpffs,
    add_json,
    add_run_dir,
    add_wg,
    print_json,
    settings_from_args,
)


def register(sub) -> None:
    p = sub.add_parser(
        "status",
        help="show the installed datapath and whether it enforces",
        description="Show which datapath is installed, where and how it is "
        "attached, the WireGuard device, MSS values, readiness and "
        "counters. Reads pinned objects only; changes nothing.",
    )
    add_bpffs(p)
    add_wg(p)
    add_run_dir(p)
    add_json(p)
    p.add_argument(
        "--leaks",
        action="store_true",
        help="list the most recent clear text from cluster peers seen by the "
        "ingress program (source, protocol, port, packets, last seen)",
    )
    add_peer_options(p)
    p.set_defaults(func=handle)


def add_peer_options(p) -> None:
    """--peers and --cluster (nodecryptor/commands/status_peers.py)."""
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--peers",
        action="store_true",
        help="list every WireGuard peer: node, state, key match, last handshake, "
        "allowed-IPs coverage, rx/tx bytes",
    )
    what.add_argument(
        "--cluster",
        action="store_true",
        help="every Node's NodeEncryptionReady condition, with a summary "
        "(exit 1 unless all are ready)",
    )
    p.add_argument(
        "--kubeconfig",
        default=None,
        metavar="PATH",
        help="for --cluster, and --peers when the agent's table is missing: "
        "kubeconfig file (default: in-cluster service account)",
    )
    p.add_argument(
        "--node-name",
        default=None,
        metavar="NAME",
        help="for --peers without the agent's table: the local node (default: $NODE_NAME)",
    )


def handle_leaks(args, settings, module) -> int:
    """``status --leaks``: the ingress leak meter; a datapath without one says so."""
    reader = getattr(module, "read_leaks", None)
    if reader is None:
        report = {
            "datapath": str(getattr(module, "DATAPATH", "")),
            "supported": False,
            "reason": "this datapath does not classify arriving packets",
            "leaks": [],
        }
    else:
        report = reader(settings)
    if args.json:
        print_json(report)
        return 0
    if not report["supported"]:
        print(f"leaks: not available ({report['reason']})")
        return 0
    print(
        f"ingress enforcement: {report['ingress_enforcement']}; "
        f"{report['entries']} clear-text source(s) remembered (at most {report['capacity']})"
    )
    for r in report["leaks"]:
        print(
            f"  {r['src']:<39} {r['protocol']:<6} dport {r['dport']:<5} "
            f"packets {r['packets']:<8} last {r['seconds_ago']}s ago"
        )
    return 0


def handle(args) -> int:
    from nodecryptor.datapath.iprule import proof_of_concept  # netlink; loaded on use

    settings = settings_from_args(args)
    if getattr(args, "peers", False) or getattr(args, "cluster", False):
        from nodecryptor.commands import status_peers

        return (status_peers.peers if args.peers else status_peers.cluster)(args, settings)
    poc = proof_of_concept.report(proof_of_concept.find())
    try:
        name, module = detect.installed(settings)
    except detect.NoDatapath as e:
        if not poc["present"]:
            raise
        # Nothing of nodecryptor yet, but the proof of concept is here: say so (exit 1).
        report = {
            "datapath": None,
            "active": False,
            "ready": False,
            "reason": str(e),
            "proof_of_concept": poc,
        }
        if args.json:
            print_json(report)
        else:
            print(f"datapath: none ({e})")
            print_proof_of_concept(poc)
        return 1
    if getattr(args, "leaks", False):
        return handle_leaks(args, settings, module)
    report = module.status(settings)
    choice = last_choice(settings)
    if choice is not None and choice.get("datapath") == name:
        # Why the agent chose this datapath (a record of another mode would be stale).
        report["agent_choice"] = choice
    if name == "bpf":
        report["program_load"] = program_load(settings, report.get("prog_id") or 0)
    report["proof_of_concept"] = poc
    add_cilium(report, settings, name)
    if args.json:
        print_json(report)
        return 0
    print_text(report)
    return 0


def program_load(settings, prog_id: int) -> dict:
    """How the agent obtained the running program (reused from its pins or compiled, and
    the compile time), from the agent's record; "unknown" when the record is missing or
    describes another program than the one pinned now."""
    from nodecryptor.datapath.bpf.loader import last_record

    record = last_record(settings)
    if record is None:
        return {"source": "unknown", "why": "the agent left no record in the run directory"}
    if not prog_id or record.get("prog_id") != prog_id:
        return {
            "source": "unknown",
            "why": f"the record describes program {record.get('prog_id')}, not the pinned one",
        }
    return record


def print_proof_of_concept(poc: dict) -> None:
    if not poc["present"]:
        return
    print(
        "proof of concept: its state is still on this node; once nodecryptor enforces, "
        "remove it with `nodecryptor cleanup --proof-of-concept`"
    )
    for item in poc["rules"] + poc["routes"]:
        print(f"  {item}")
    if poc["noop_device"]:
        print(f"  dummy device {poc['noop_device']['name']}")
    for item in poc["left_in_place"]:
        print(
            f"  {item}  (a foreign rule at the same priority is listed first; "
            "cleanup leaves this one, remove it by hand)"
        )


def add_cilium(report: dict, settings, datapath: str) -> None:
    """The Cilium-facing facts and the whole chain of every hook nodecryptor uses, egress and
    ingress (status_cilium.py)."""
    from nodecryptor.commands.status_cilium import status_report

    extra = status_report(
        settings, datapath, report.get("devices") or [], report.get("prog_id") or 0
    )
    report["cilium"] = extra["cilium"]
    report["chains"] = extra["chains"]
    if extra["problem"]:
        report["ready"] = False
        report["reason"] = "; ".join(r for r in (report.get("reason"), extra["problem"]) if r)


def print_text(report: dict) -> None:
    print(
        f"datapath: {report.get('datapath')}  mode: {report.get('mode') or '-'}  "
        f"program id: {report.get('prog_id') or '-'}"
    )
    ready = report.get("ready")
    print(
        f"ready: {'yes' if ready else 'no'}"
        + ("" if ready else f" ({report.get('reason') or 'no reason given'})")
    )
    devices = report.get("devices") or []
    print(f"attached devices: {len(devices)}")
    for d in devices:
        where = (
            f"link {d.get('link_id')}"
            if d.get("mode") == "tcx"
            else f"handle {d.get('handle')} prio {d.get('prio')}"
        )
        print(
            f"  {d.get('name') or d.get('device')!s:<16} ifindex {d.get('ifindex'):<5} "
            f"{d.get('mode'):<4} {where}"
            f"  position {d.get('position')}"
            + ("  DEFUNCT" if d.get("defunct") else "")
            + (f"  shadowed by {d['shadowed_by']}" if d.get("shadowed_by") else "")
        )
    wg = report.get("wireguard") or {}
    if wg:
        print(
            f"wireguard: {wg.get('ifname')} ifindex {wg.get('ifindex')} "
            f"{'up' if wg.get('up') else 'down' if wg.get('present') else 'absent'} "
            f"mtu {wg.get('mtu')} port {wg.get('listen_port')} peers {wg.get('peers')}"
        )
    mss = report.get("mss")
    if mss:
        print(f"mss clamp: ipv4 {mss.get('v4')}  ipv6 {mss.get('v6')}")
    load = report.get("program_load")
    if load:
        if load.get("source") == "compiled":
            print(f"program: compiled in {load['compile_seconds']:.2f}s (key {load['key']})")
        elif load.get("source") == "reused":
            print(f"program: reused, not compiled (key {load['key']})")
        else:
            print(f"program: origin unknown ({load.get('why')})")
    if report.get("agent_alive_age_seconds") is not None:
        print(f"agent last applied: {report['agent_alive_age_seconds']:.1f}s ago")
    cil = report.get("cilium") or {}
    if cil:
        src = cil.get("sources", {})
        print(
            f"cilium: routing {cil['routing_mode']} ({src.get('routing_mode')}); "
            f"wireguard port {cil['wg_port']} fwmark {cil['wg_fwmark']} mtu {cil['wg_mtu']}; "
            f"node IPs in allowed-IPs: {'yes' if cil['node_ips_in_allowed_ips'] else 'no'}"
            + ("" if cil.get("node_ips_in_allowed_ips_known") else " (unknown)")
            + f" ({src.get('node_ips_in_allowed_ips')})"
        )
    from nodecryptor.datapath.chain import describe

    for ch in report.get("chains") or []:
        for line in describe(ch):
            print(line)
    counters = report.get("counters") or {}
    nonzero = {k: v for k, v in counters.items() if v.get("packets")}
    if counters:
        print("counters (non-zero):" + ("" if nonzero else " none"))
        for name, c in nonzero.items():
            print(f"  {name:<32} {c['packets']:>12} pkts {c['bytes']:>14} bytes")
    for key, value in report.items():
        if key not in {
            "datapath",
            "mode",
            "prog_id",
            "ready",
            "reason",
            "devices",
            "wireguard",
            "mss",
            "agent_alive_age_seconds",
            "counters",
            "config",
            "active",
            "proof_of_concept",
            "cilium",
            "chains",
            "program_load",
        }:
            print(f"{key}: {value}")
    print_proof_of_concept(report.get("proof_of_concept") or {"present": False})
