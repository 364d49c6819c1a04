"""`nodecryptor status --peers` and `nodecryptor status --cluster`.

``--peers`` shows the peer table the agent records in its run directory every few seconds
(``peers.json``, written by agent.peermonitor): the agent's judgement carries history (tx
bytes growing without a handshake), which one reading cannot. When the agent does not run (no
table, or one older than STALE_SECONDS), the table is computed from one reading of the
WireGuard device and one list of CiliumNodes (``--kubeconfig``, or the in-cluster account);
"unreachable" then cannot be told from "idle", and the output says it was computed.

``--cluster`` lists the Nodes and prints each one's ``NodeEncryptionReady`` condition, with a
summary line: ready (True), not ready (False), unknown (no condition, or Unknown).
"""

from __future__ import annotations

import time

from nodecryptor.policy.peerhealth import CONDITION_TYPE, PeerTracker, count_states
from nodecryptor.commands.common import check_cluster_config, print_json

STALE_SECONDS = 60.0


def _age(seconds) -> str:
    if seconds is None:
        return "never"
    seconds = float(seconds)
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def _computed(settings) -> dict:
    from nodecryptor.cluster import reads
    from nodecryptor.node import wireguard  # netlink and the API client, loaded on use

    if not settings.node_name:
        from nodecryptor.core.errors import SettingsError

        raise SettingsError(
            "--node-name",
            "(unset)",
            "the agent's peer table is missing or "
            "stale; computing it needs the local node's name (or $NODE_NAME)",
        )
    check_cluster_config(settings)
    nodes, _rejections = reads.snapshot_once(settings)
    wg = wireguard.read_state(settings.wg_interface)
    now = time.time()
    views = PeerTracker().observe(wg, nodes, settings.node_name, settings.address_types, now)
    return {
        "node": settings.node_name,
        "written_at": now,
        "source": "computed",
        "wireguard": {"ifname": wg.ifname, "up": wg.usable, "error": wg.error},
        "condition": None,
        "peers": [v.as_dict() for v in views],
    }


def peers(args, settings) -> int:
    from nodecryptor.agent.peermonitor import read_peers_file

    table = read_peers_file(settings)
    if table is not None and time.time() - float(table.get("written_at") or 0) <= STALE_SECONDS:
        table["source"] = "agent"
    else:
        table = _computed(settings)
    counts = count_states(_View(p) for p in table.get("peers") or [])
    table["summary"] = counts
    if args.json:
        print_json(table)
        return 0
    wg = table.get("wireguard") or {}
    print(
        f"node {table.get('node')}: {len(table.get('peers') or [])} peers on "
        f"{wg.get('ifname')} ({'up' if wg.get('up') else 'NOT usable: ' + str(wg.get('error'))})"
        f"; source: {table['source']}"
        + ("" if table["source"] == "agent" else " (one reading: unreachable shows as idle)")
    )
    cond = table.get("condition")
    if cond:
        print(f"{CONDITION_TYPE}={cond['status']} ({cond['reason']}): {cond['message']}")
    pools = table.get("pools")
    if pools:
        print(
            "pod pools: "
            + (
                ", ".join(pools["cidrs"]) + f" ({pools['source']})"
                if pools["cidrs"]
                else f"none: {pools['problem']}"
            )
        )
    print(
        f"{'NODE':<24} {'STATE':<13} {'KEY':<6} {'HANDSHAKE':>9} {'COVERED':>8} "
        f"{'RX BYTES':>12} {'TX BYTES':>12}"
    )
    for p in table.get("peers") or []:
        key = {True: "match", False: "DIFF", None: "-"}[p.get("key_match")]
        n_covered = len(p.get("covered") or [])
        covered = f"{n_covered}/{n_covered + len(p.get('uncovered') or [])}"
        print(
            f"{p['node']:<24} {p['state']:<13} {key:<6} "
            f"{_age(p.get('last_handshake_age_seconds')):>9} {covered:>8} "
            f"{p.get('rx_bytes', 0):>12} {p.get('tx_bytes', 0):>12}"
        )
    print("summary: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


class _View:
    def __init__(self, d: dict):
        self.state = d.get("state")


def cluster(args, settings) -> int:
    from nodecryptor.cluster import reads

    check_cluster_config(settings)
    nodes = reads.read_node_conditions(settings, CONDITION_TYPE)
    ready = sum(1 for n in nodes if (n["condition"] or {}).get("status") == "True")
    not_ready = sum(1 for n in nodes if (n["condition"] or {}).get("status") == "False")
    unknown = len(nodes) - ready - not_ready
    summary = {"nodes": len(nodes), "ready": ready, "not_ready": not_ready, "unknown": unknown}
    if args.json:
        print_json({"condition": CONDITION_TYPE, "summary": summary, "nodes": nodes})
    else:
        print(f"{'NODE':<32} {'STATUS':<8} {'REASON':<24} MESSAGE")
        for n in nodes:
            c = n["condition"] or {}
            print(
                f"{n['node']:<32} {c.get('status') or 'Unknown':<8} "
                f"{c.get('reason') or '(no condition)':<24} {c.get('message') or ''}"
            )
        print(
            f"{CONDITION_TYPE}: {ready} ready, {not_ready} not ready, {unknown} unknown "
            f"(of {len(nodes)} nodes)"
        )
    return 0 if not_ready == 0 and unknown == 0 else 1
