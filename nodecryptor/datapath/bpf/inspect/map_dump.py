"""``nodecryptor bpf dump``: every pinned map decoded (and the destinations alone, for the
Cilium status view), without compiling anything."""

from __future__ import annotations

import os
from typing import Any

from nodecryptor.core.settings import Settings
from nodecryptor.datapath.bpf import pins
from nodecryptor.datapath.bpf.inspect.pinned import pinned_prog_id
from nodecryptor.datapath.bpf.maps import decode
from nodecryptor.datapath.bpf.maps.pinned import open_pinned


def dump(settings: Settings) -> dict[str, Any]:
    """Decode every pinned map (maps.decode.read)."""
    pin_dir = pins.maps_dir(settings.bpffs)
    if not os.path.isdir(pin_dir):
        return {"pin_dir": pin_dir, "error": "no maps pinned (is the BPF datapath active?)"}
    with open_pinned(pin_dir) as pinned:
        data = decode.read(pinned)
    return {"pin_dir": pin_dir, "prog_id": pinned_prog_id(settings), "maps": data}


def destinations(settings: Settings) -> list[dict[str, Any]]:
    """The pinned destination entries; empty when none are pinned."""
    pin_dir = pins.maps_dir(settings.bpffs)
    if not os.path.isdir(pin_dir):
        return []
    with open_pinned(pin_dir) as pinned:
        return decode.read_destinations(pinned)
