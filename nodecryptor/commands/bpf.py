"""`nodecryptor bpf dump`: decode nodecryptor's pinned BPF maps (no compiler involved)."""

from __future__ import annotations

import json
import sys

from nodecryptor.commands.common import add_bpffs, add_json, settings_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "bpf",
        help="BPF datapath internals",
        description="Low-level views of the BPF datapath's pinned objects.",
    )
    bsub = p.add_subparsers(dest="bpf_command", metavar="SUBCOMMAND", required=True)
    d = bsub.add_parser(
        "dump",
        help="decode the pinned maps",
        description="Print destinations, exempt ports, local addresses, the "
        "configuration and counters from the pinned maps. Reads "
        "with bpf(2) only: nothing is compiled.",
    )
    add_bpffs(d)
    add_json(d)
    d.set_defaults(func=handle_dump)


def handle_dump(args) -> int:
    from nodecryptor.datapath.bpf import inspect as bpf_inspect

    settings = settings_from_args(args)
    report = bpf_inspect.dump(settings)
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return 0 if "error" not in report else 1
    if "error" in report:
        print(f"{report['pin_dir']}: {report['error']}", file=sys.stderr)
        return 1
    print(f"pin dir: {report['pin_dir']}  program id: {report.get('prog_id') or '-'}")
    for name, content in (report.get("maps") or {}).items():
        print(f"{name}:")
        if isinstance(content, dict):
            for k, v in content.items():
                print(f"  {k}: {v}")
        elif isinstance(content, list):
            for item in content:
                print(f"  {item}")
        else:
            print(f"  {content}")
    return 0
