"""What several scenarios share: the address families, polling a flow or a per-node check until
it holds, the datapath's content as text (read directly or through the operator's commands),
the published WireGuard key, and the NodeEncryptionReady condition with its write count."""

from __future__ import annotations

import json
import threading
import time

from nodecryptor.core.settings import Settings
from ...wait import WaitTimeout, wait_for
from ..flows import Flow, PortAllocator


FAMILIES = (4, 6)


def poll_flow(lab, flow: Flow, ports: PortAllocator, timeout: float) -> float | None:
    """Seconds until ``flow`` gets through (tried repeatedly), or None at the deadline."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        req = {
            "id": 0,
            "proto": flow.proto,
            "dst": lab.address_of(flow.dst, flow.family),
            "src": lab.address_of(flow.src, flow.family),
            "dport": flow.dport,
            "sport": ports.take(),
            "timeout": 0.5,
        }
        if lab.run_flows(lab.netns_of(flow.src), [req])[0]["ok"]:
            return time.monotonic() - start
    return None


def annotation(lab, node: str) -> str:
    for obj in lab.api().list_ciliumnodes():
        if obj["metadata"]["name"] == node:
            return (obj["metadata"].get("annotations") or {}).get(
                "network.cilium.io/wg-pub-key", ""
            )
    return ""


def installed_text(lab, name: str) -> str:
    """What the datapath on ``name`` holds right now, as searchable text, read directly and
    cheaply (the pinned BPF maps, or nodecryptor's own route table) so a change is timed to a
    few milliseconds rather than to the start-up time of a CLI process."""
    if lab.datapath == "bpf":
        from nodecryptor.datapath.bpf import inspect as bpf_inspect

        return json.dumps(bpf_inspect.dump(Settings(bpffs=lab.nodes[name].bpffs)), default=str)
    # Both of its tables: its own and the guard table of remote pod CIDRs (iprule_table + 1).
    tables = (str(Settings().iprule_table), str(Settings().iprule_table + 1))
    return "\n".join(
        lab.run_in(name, "ip", fam, "route", "show", "table", table)
        for fam in ("-4", "-6")
        for table in tables
    )


def cli_text(lab, name: str) -> str:
    """The same, through the operator's commands: ``bpf dump --json`` or ``status --json``
    (plus the routes of the ip-rule table, which status counts but does not list)."""
    if lab.datapath == "bpf":
        return json.dumps(lab.nodecryptor(name, "bpf", "dump"))
    return json.dumps(lab.nodecryptor(name, "status")) + installed_text(lab, name)


def seconds_until(
    nodes: list[str], check, since: float, timeout: float, interval: float
) -> tuple[dict[str, float], list[str]]:
    """Poll ``check(node)`` for every node in parallel; return the seconds from ``since`` until
    it first held, per node, and the nodes for which it never did within ``timeout``."""
    took: dict[str, float] = {}

    def poll(name: str) -> None:
        while time.monotonic() - since < timeout:
            if check(name):
                took[name] = time.monotonic() - since
                return
            time.sleep(interval)

    threads = [threading.Thread(target=poll, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return took, sorted(set(nodes) - took.keys())


def condition(api, name: str) -> dict:
    node = api.get_node(name)
    for c in (node.get("status") or {}).get("conditions") or []:
        if c.get("type") == "NodeEncryptionReady":
            return c
    return {}


def patches(api) -> int:
    return int(api.fake_control("status-patches")["patches"])


def wait_condition(api, nodes: list[str], want, timeout: float) -> float | None:
    """Seconds until every node's condition satisfies ``want``; None on timeout."""
    start = time.monotonic()
    try:
        wait_for(
            lambda: all(want(condition(api, n)) for n in nodes),
            timeout,
            "NodeEncryptionReady",
            interval=0.2,
        )
    except WaitTimeout:
        return None
    return time.monotonic() - start
