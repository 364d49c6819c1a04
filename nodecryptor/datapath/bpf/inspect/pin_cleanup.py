"""``nodecryptor cleanup`` for the BPF datapath: remove every tcx link, tc filter and pin
nodecryptor created, egress and ingress; nothing else."""

from __future__ import annotations

from typing import Any

from nodecryptor.core.settings import Settings
from nodecryptor.datapath.bpf import pins


def cleanup(settings: Settings) -> dict[str, Any]:
    """Detach and unpin everything; returns what was removed, by kind."""
    from nodecryptor.datapath.bpf import attach

    links = [
        name
        for name in pins.pinned_link_names(settings.bpffs)
        if attach.tcx_detach(settings.bpffs, name)
    ]
    filters = [
        name for name, ifindex in attach.tc_devices().items() if attach.tc_detach(name, ifindex)
    ]
    in_links = [
        name
        for name in pins.pinned_link_names(settings.bpffs, "ingress")
        if attach.tcx_detach(settings.bpffs, name, "ingress")
    ]
    in_filters = [
        name
        for name, ifindex in attach.tc_devices("ingress").items()
        if attach.tc_detach(name, ifindex, "ingress")
    ]
    removed = pins.remove_all(settings.bpffs)
    return {
        "datapath": "bpf",
        "tcx_links": links,
        "tc_filters": filters,
        "pins": removed,
        "ingress_tcx_links": in_links,
        "ingress_tc_filters": in_filters,
    }
