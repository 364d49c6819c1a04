"""The Cilium-facing part of `nodecryptor status`: the facts of nodecryptor/policy/cilium.py as this
node shows them (WireGuard device, tunnel devices, what the installed datapath holds) and the
whole chain of every hook nodecryptor uses: each underlay device's egress, and the ingress of
the devices carrying nc_ingress (underlay devices and cilium_wg0)."""

from __future__ import annotations

from nodecryptor.core.errors import DatapathError


def _known_destinations(settings, datapath: str) -> tuple[list, list]:
    """(remote node addresses, remote pod CIDRs) as the installed datapath holds them: the
    pinned destination tries (BPF) or nodecryptor's route table (ip rules). Host prefixes are
    node addresses; wider ones pod CIDRs. Empty lists when unreadable."""
    import ipaddress

    prefixes = []
    try:
        if datapath == "bpf":
            from nodecryptor.datapath.bpf.inspect import destinations

            prefixes = [ipaddress.ip_network(d["prefix"]) for d in destinations(settings)]
        else:
            from nodecryptor.datapath.iprule.inspect import read_routes

            prefixes = [ipaddress.ip_network(r.dst) for r in read_routes(settings)]
    except (OSError, ImportError, DatapathError):
        return [], []
    nodes = sorted(
        {p.network_address for p in prefixes if p.prefixlen == p.max_prefixlen},
        key=lambda a: (a.version, a),
    )
    pods = sorted(
        {p for p in prefixes if p.prefixlen < p.max_prefixlen}, key=lambda n: (n.version, n)
    )
    return nodes, pods


def status_report(settings, datapath: str, devices: list[dict], own_prog_id: int = 0) -> dict:
    """The ``"cilium"`` object and the hook chains of ``nodecryptor status``: what was
    detected about Cilium and where each fact came from, observed now (the agent need not run).
    ``devices`` are the status report's attachments (name, mode, position)."""
    from nodecryptor.policy import cilium
    from nodecryptor.datapath import chain as chain_mod
    from nodecryptor.node.devices import tunnel_devices
    from nodecryptor.node.wireguard import read_state

    wg = read_state(settings.wg_interface)
    nodes, pods = _known_destinations(settings, datapath)
    facts = cilium.detect(wg, tunnel_devices(), nodes or None, pods or None)
    own = {own_prog_id: "nc_egress"}
    own.update(_own_ingress(settings, datapath))
    chains = [
        chain_mod.hook_chain(d.get("name") or d.get("device"), "egress", own)
        for d in devices
        if d.get("name") or d.get("device")
    ]
    ingress = [
        chain_mod.hook_chain(name, "ingress", own) for name in _ingress_devices(settings, datapath)
    ]
    out = facts.to_json()
    out["attach"] = []
    for d, ch in zip(devices, chains):
        entries = ch.get("tcx") if d.get("mode") == "tcx" else ch.get("tc")
        ours = next((e for e in entries or () if e["nodecryptor"]), None)
        behind = [
            e.get("name") or f"prog {e.get('prog_id')}"
            for e in entries or ()
            if ours is not None and e["position"] > ours["position"]
        ]
        out["attach"].append(
            {
                "device": ch["device"],
                "mode": d.get("mode"),
                "position": ours["position"] if ours else d.get("position"),
                "runs_behind_nodecryptor": behind,
            }
        )
    out["sources"]["attach"] = (
        "BPF_PROG_QUERY on each device's tcx egress hook and its clsact filters"
    )
    return {"cilium": out, "chains": chains + ingress, "problem": cilium.readiness_problem(facts)}


def _own_ingress(settings, datapath: str) -> dict[int, str]:
    """{program id: name} of the pinned ingress program, when the BPF datapath has one."""
    if datapath != "bpf":
        return {}
    from nodecryptor.datapath.bpf import pins

    prog_id = pins.pinned_prog_id(pins.ingress_prog_path(settings.bpffs))
    return {prog_id: "nc_ingress"} if prog_id else {}


def _ingress_devices(settings, datapath: str) -> list[str]:
    """Devices whose ingress nodecryptor uses: pinned ingress links (tcx) and clsact ingress
    filters of its own (legacy tc)."""
    if datapath != "bpf":
        return []
    from nodecryptor.datapath.bpf import attach, pins

    names = set(pins.pinned_link_names(settings.bpffs, attach.INGRESS))
    names |= set(attach.tc_devices(attach.INGRESS))
    return sorted(names)
