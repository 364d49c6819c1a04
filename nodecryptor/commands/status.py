"""`nodecryptor status`: what is installed on this node and whether it enforces.

Works from pinned objects and netlink only (no compiler), whether or not the agent runs. Finds
the active datapath itself: BPF when nodecryptor's pins/filters exist, else the ip-rule one.
"""

from __future__ import annotations

import importlib

from ..errors import NodecryptorError
from .common import add_bpffs, add_json, print_json, settings_from_args


class NoDatapath(NodecryptorError):
    """No nodecryptor datapath is installed, or the active one has no inspection module."""


def iprule_inspect():
    """The ip-rule datapath's inspection module, or None when this build has none."""
    try:
        return importlib.import_module("nodecryptor.datapath.iprule.inspect")
    except ModuleNotFoundError as e:
        if e.name != "nodecryptor.datapath.iprule.inspect":
            raise
        return None


def active_inspector(settings):
    """The inspection module of the datapath installed on this node: (name, module)."""
    from ..datapath.bpf import inspect as bpf_inspect

    if bpf_inspect.active(settings):
        return "bpf", bpf_inspect
    iprule = iprule_inspect()
    if iprule is None:
        raise NoDatapath("the BPF datapath is not active here and this build has no ip-rule "
                         "inspection module (nodecryptor.datapath.iprule.inspect)")
    if iprule.active(settings):
        return "iprule", iprule
    raise NoDatapath("no nodecryptor datapath is active on this node "
                     f"(no pins under {settings.bpffs}/nodecryptor, no nodecryptor ip rules)")


def add_wg(p) -> None:
    p.add_argument("--wg-interface", default="cilium_wg0", metavar="IFNAME",
                   help="Cilium's WireGuard device (default: %(default)s)")


def register(sub) -> None:
    p = sub.add_parser("status", help="show the installed datapath and whether it enforces",
                       description="Show which datapath is installed, where and how it is "
                                   "attached, the WireGuard device, MSS values, readiness and "
                                   "counters. Reads pinned objects only; changes nothing.")
    add_bpffs(p)
    add_wg(p)
    add_json(p)
    p.set_defaults(func=handle)


def handle(args) -> int:
    settings = settings_from_args(args)
    name, module = active_inspector(settings)
    report = module.status(settings)
    from ..datapath.select import last_choice

    choice = last_choice()
    if choice is not None and choice.get("datapath") == name:
        # Why the agent chose this datapath (a record of another mode would be stale).
        report["agent_choice"] = choice
    add_cilium(report, settings, name)
    if args.json:
        print_json(report)
        return 0
    print_text(report)
    return 0


def add_cilium(report: dict, settings, datapath: str) -> None:
    """The Cilium-facing facts and every device's whole egress chain (cilium_probe.py)."""
    from ..cilium_probe import status_report

    extra = status_report(settings, datapath, report.get("devices") or [],
                          report.get("prog_id") or 0)
    report["cilium"] = extra["cilium"]
    report["chains"] = extra["chains"]
    if extra["problem"]:
        report["ready"] = False
        report["reason"] = "; ".join(r for r in (report.get("reason"), extra["problem"]) if r)


def print_text(report: dict) -> None:
    print(f"datapath: {report.get('datapath')}  mode: {report.get('mode') or '-'}  "
          f"program id: {report.get('prog_id') or '-'}")
    ready = report.get("ready")
    print(f"ready: {'yes' if ready else 'no'}"
          + ("" if ready else f" ({report.get('reason') or 'no reason given'})"))
    devices = report.get("devices") or []
    print(f"attached devices: {len(devices)}")
    for d in devices:
        where = (f"link {d.get('link_id')}" if d.get("mode") == "tcx"
                 else f"handle {d.get('handle')} prio {d.get('prio')}")
        print(f"  {d.get('name') or d.get('device')!s:<16} ifindex {d.get('ifindex'):<5} {d.get('mode'):<4} {where}"
              f"  position {d.get('position')}"
              + ("  DEFUNCT" if d.get("defunct") else "")
              + (f"  shadowed by {d['shadowed_by']}" if d.get("shadowed_by") else ""))
    wg = report.get("wireguard") or {}
    if wg:
        print(f"wireguard: {wg.get('ifname')} ifindex {wg.get('ifindex')} "
              f"{'up' if wg.get('up') else 'down' if wg.get('present') else 'absent'} "
              f"mtu {wg.get('mtu')} port {wg.get('listen_port')} peers {wg.get('peers')}")
    mss = report.get("mss")
    if mss:
        print(f"mss clamp: ipv4 {mss.get('v4')}  ipv6 {mss.get('v6')}")
    if report.get("agent_alive_age_seconds") is not None:
        print(f"agent last applied: {report['agent_alive_age_seconds']:.1f}s ago")
    cil = report.get("cilium") or {}
    if cil:
        src = cil.get("sources", {})
        print(f"cilium: routing {cil['routing_mode']} ({src.get('routing_mode')}); "
              f"wireguard port {cil['wg_port']} fwmark {cil['wg_fwmark']} mtu {cil['wg_mtu']}; "
              f"node IPs in allowed-IPs: {'yes' if cil['node_ips_in_allowed_ips'] else 'no'}"
              + ("" if cil.get("node_ips_in_allowed_ips_known") else " (unknown)")
              + f" ({src.get('node_ips_in_allowed_ips')})")
    from ..datapath.chain import describe

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
        if key not in {"datapath", "mode", "prog_id", "ready", "reason", "devices", "wireguard",
                       "mss", "agent_alive_age_seconds", "counters", "config", "active",
                       "cilium", "chains"}:
            print(f"{key}: {value}")
