"""`nodecryptor cleanup`: remove everything nodecryptor installed on this node, or, with
``--proof-of-concept``, only what the original Go proof of concept left behind.

Without the flag it removes only nodecryptor's own objects: tcx links pinned under its root, tc
filters with its handle and name, its pins, its ip rules and routing table. Both datapaths are
cleaned, so leftovers of an earlier mode go too.

With the flag it removes the proof of concept's ip rules, its table-100 route and its ``noop``
dummy device, matched exactly (``datapath.iprule.proof_of_concept``), and leaves nodecryptor
enforcing: this is the migration step, run while the agent runs.
"""

from __future__ import annotations

from nodecryptor.commands.common import add_bpffs, add_json, print_json, settings_from_args


def register(sub) -> None:
    p = sub.add_parser(
        "cleanup",
        help="remove nodecryptor's links, filters, pins and rules",
        description="Remove every kernel object nodecryptor created on this node "
        "(and nothing else). Stop the agent first, or it re-creates "
        "them. Traffic to remote nodes then leaves unencrypted.",
        epilog="migration: `nodecryptor cleanup --proof-of-concept` removes only "
        "the original Go proof of concept's ip rules (priorities 0, 200, "
        "201, 210, 220), its table-100 route and its noop device, and "
        "leaves nodecryptor running; see the operator guide.",
    )
    add_bpffs(p)
    p.add_argument(
        "--proof-of-concept",
        action="store_true",
        help="remove only the Go proof of concept's rules, route and noop device; "
        "nodecryptor's own objects stay",
    )
    add_json(p)
    p.set_defaults(func=handle)


def handle(args) -> int:
    settings = settings_from_args(args)
    if args.proof_of_concept:
        return _proof_of_concept(args)
    from nodecryptor.datapath.detect import inspectors

    report = {str(name): module.cleanup(settings) for name, module in inspectors().items()}
    if args.json:
        print_json(report)
        return 0
    for line in bpf_text(report["bpf"]):
        print(line)
    print(f"iprule: {report['iprule']}")
    return 0


# (report key, what the text calls it): every hook kind the BPF datapath's cleanup removes.
_BPF_HOOKS = (
    ("tcx_links", "egress tcx link"),
    ("tc_filters", "egress tc filter"),
    ("ingress_tcx_links", "ingress tcx link"),
    ("ingress_tc_filters", "ingress tc filter"),
)


def bpf_text(b: dict) -> list[str]:
    """The BPF part of the text report: every removed link and filter, by hook, so the text
    says as much as ``--json`` (ingress links on cilium_wg0 included)."""
    removed = [(label, b.get(key) or []) for key, label in _BPF_HOOKS]
    total = sum(len(names) for _, names in removed)
    lines = [f"bpf: removed {total} hook(s) and {len(b.get('pins') or [])} pin(s)"]
    lines += [f"  {label}(s): {', '.join(names)}" for label, names in removed if names]
    return lines


def _proof_of_concept(args) -> int:
    from nodecryptor.datapath.iprule import proof_of_concept  # netlink; loaded on use

    removed = proof_of_concept.remove()
    if args.json:
        print_json(removed)
    else:
        print(
            f"proof of concept: removed {len(removed['rules'])} rule(s), "
            f"{len(removed['routes'])} route(s)"
            + (f", device {removed['noop_device']}" if removed["noop_device"] else "")
        )
        for item in removed["rules"] + removed["routes"]:
            print(f"  {item}")
        for item in removed["left_in_place"]:
            print(f"  left in place (remove by hand): {item}")
    # Left-over proof-of-concept rules mean the migration is not finished.
    return 1 if removed["left_in_place"] else 0
