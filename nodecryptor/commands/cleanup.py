"""`nodecryptor cleanup`: remove everything nodecryptor installed on this node.

Removes only nodecryptor's own objects: tcx links pinned under its root, tc filters with its
handle and name, its pins; and (through the ip-rule datapath's inspection module) its ip rules
and routing table. Both datapaths are cleaned, so leftovers of an earlier mode go too.
"""

from __future__ import annotations

from .common import add_bpffs, add_json, print_json, settings_from_args
from .status import iprule_inspect


def register(sub) -> None:
    p = sub.add_parser("cleanup", help="remove nodecryptor's links, filters, pins and rules",
                       description="Remove every kernel object nodecryptor created on this node "
                                   "(and nothing else). Stop the agent first, or it re-creates "
                                   "them. Traffic to remote nodes then leaves unencrypted.")
    add_bpffs(p)
    add_json(p)
    p.set_defaults(func=handle)


def handle(args) -> int:
    from ..datapath.bpf import inspect as bpf_inspect

    settings = settings_from_args(args)
    report = {"bpf": bpf_inspect.cleanup(settings)}
    iprule = iprule_inspect()
    if iprule is None:
        report["iprule"] = {"skipped": "no ip-rule inspection module in this build"}
    else:
        report["iprule"] = iprule.cleanup(settings)
    if args.json:
        print_json(report)
        return 0
    b = report["bpf"]
    print(f"bpf: detached {len(b['tcx_links'])} tcx link(s) {b['tcx_links']}, removed "
          f"{len(b['tc_filters'])} tc filter(s) {b['tc_filters']}, {len(b['pins'])} pin(s)")
    print(f"iprule: {report['iprule']}")
    return 0
