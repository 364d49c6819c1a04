"""`nodecryptor plan`: compute and print the desired state for a node; changes nothing."""

from __future__ import annotations

from nodecryptor.cluster.k8s_errors import KubernetesError
from nodecryptor.core.model import PodPools
from nodecryptor.policy.plan import localize
from nodecryptor.policy.topology import compile_topology
from nodecryptor.commands.common import (
    add_cluster,
    add_json,
    check_cluster_config,
    print_json,
    require_node_name,
    settings_from_args,
)


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="print what would be encrypted on a node (changes nothing)",
        description="List the CiliumNodes, the v1 Nodes and Cilium's pod pools "
        "once, compile the cluster's topology as every agent does, "
        "and print it for one node: its role, its own addresses, "
        "the remote prefixes that are encrypted, the exempt ports, "
        "and every claim that was rejected or conflicts, with the "
        "reason. The agent also takes the local node's own "
        "prefixes from its kernel, which plan does not read.",
    )
    add_cluster(p)
    add_json(p)
    p.set_defaults(func=handle)


def handle(args) -> int:
    settings = settings_from_args(args)
    require_node_name(settings)
    check_cluster_config(settings)
    from nodecryptor.cluster import reads  # loaded on use, with the Kubernetes client

    # The policies first: the labels of the Nodes they select on are kept with the snapshot.
    policies, policy_rejections, note = reads.exemptions_once(settings)
    snapshot, rejections = reads.snapshot_once(settings, policies)
    try:
        pools, pool_rejections = reads.pools_once(settings)
    except KubernetesError as e:
        # As the agent: without Cilium's configuration, the flag or the breadth limit applies.
        pools, pool_rejections = PodPools(problem=f"Cilium's configuration not read: {e}"), []
    topology = compile_topology(snapshot, settings, pools)
    plan = localize(topology, snapshot, settings.node_name, settings, policies=policies)
    # What the parsers skipped, then what the compiler rejected or reported as a conflict.
    rejected = (
        list(rejections) + list(policy_rejections) + list(pool_rejections) + list(plan.rejected)
    )
    if args.json:
        out = plan.to_json()
        out["rejected"] = [r.to_json() for r in rejected]
        out["pools"] = topology.pools.to_json()
        if note:
            out["exemptions_note"] = note
        print_json(out)
        return 0
    print(
        f"node {plan.node} ({plan.role})"
        + ("" if plan.local_known else "  [no CiliumNode of this name: role assumed worker]")
    )
    print("local addresses: " + (", ".join(map(str, plan.local_addresses)) or "-"))
    print(
        "pod pools: "
        + (
            ", ".join(map(str, topology.pools.cidrs)) + f" ({topology.pools.source})"
            if topology.pools.cidrs
            else f"none ({topology.pools.problem})"
        )
    )
    print(
        "exempt ports (to and from control-plane nodes): "
        + (", ".join(map(str, plan.exempt_ports)) or "none")
    )
    print(f"{len(plan.destinations)} encrypted destinations:")
    print(f"  {'PREFIX':<44} {'NODE':<24} {'KIND':<9} CONTROL-PLANE")
    for d in plan.destinations:
        print(
            f"  {str(d.prefix):<44} {d.node:<24} {d.kind:<9} {'yes' if d.control_plane else 'no'}"
            + "".join(
                f"\n      exempt {r.protocol}/{r.first}-{r.last} ({r.policy})"
                for r in d.exempt_ports
            )
        )
    for r in plan.serves:
        print(f"serves {r.protocol}/{r.first}-{r.last} in the clear ({r.policy})")
    if note:
        print(f"exemption policies: {note}")
    for rej in rejected:
        # A duplicate claim is kept (encrypted) and only reported.
        what = "conflict" if rej.reason == "duplicate-claim" else "rejected"
        print(f"{what} ({rej.reason}): {rej}")
    return 0
