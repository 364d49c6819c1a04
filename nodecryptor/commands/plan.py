"""`nodecryptor plan`: compute and print the desired state for a node; changes nothing."""

from __future__ import annotations

from nodecryptor.policy.plan import compute_plan
from nodecryptor.commands.common import (add_cluster, add_json, check_cluster_config, print_json, require_node_name,
                     settings_from_args)


def register(sub) -> None:
    p = sub.add_parser("plan", help="print what would be encrypted on a node (changes nothing)",
                       description="List the CiliumNodes once and print the plan for one node: "
                                   "its role, its own addresses, the remote prefixes that are "
                                   "encrypted, the exempt ports, and every CiliumNode entry "
                                   "that was rejected or conflicts, with the reason.")
    add_cluster(p)
    add_json(p)
    p.set_defaults(func=handle)


def handle(args) -> int:
    settings = settings_from_args(args)
    require_node_name(settings)
    check_cluster_config(settings)
    from nodecryptor.cluster import reads  # loaded on use, with the Kubernetes client

    snapshot, rejections = reads.snapshot_once(settings)
    policies, policy_rejections, note = reads.exemptions_once(settings)
    plan = compute_plan(snapshot, settings.node_name, settings, policies=policies)
    # What the parser skipped, then what admission rejected or reported as a conflict.
    rejected = list(rejections) + list(policy_rejections) + list(plan.rejected)
    if args.json:
        out = plan.to_json()
        out["rejected"] = [r.to_json() for r in rejected]
        if note:
            out["exemptions_note"] = note
        print_json(out)
        return 0
    print(f"node {plan.node} ({plan.role})"
          + ("" if plan.local_known else "  [no CiliumNode of this name: role assumed worker]"))
    print("local addresses: " + (", ".join(map(str, plan.local_addresses)) or "-"))
    print("exempt ports (to and from control-plane nodes): "
          + (", ".join(map(str, plan.exempt_ports)) or "none"))
    print(f"{len(plan.destinations)} encrypted destinations:")
    print(f"  {'PREFIX':<44} {'NODE':<24} {'KIND':<9} CONTROL-PLANE")
    for d in plan.destinations:
        print(f"  {str(d.prefix):<44} {d.node:<24} {d.kind:<9} {'yes' if d.control_plane else 'no'}"
              + "".join(f"\n      exempt {r.protocol}/{r.first}-{r.last} ({r.policy})"
                        for r in d.exempt_ports))
    for r in plan.serves:
        print(f"serves {r.protocol}/{r.first}-{r.last} in the clear ({r.policy})")
    if note:
        print(f"exemption policies: {note}")
    for rej in rejected:
        # A duplicate claim is kept (encrypted) and only reported.
        what = "conflict" if rej.reason == "duplicate-claim" else "rejected"
        print(f"{what} ({rej.reason}): {rej}")
    return 0
