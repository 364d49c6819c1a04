"""What of the BPF datapath is installed here, read from the pins: whether it is active, where
it is attached, the pinned program's id and its configuration entry.

pyroute2 (via ``attach``) is imported inside the functions that need it: it takes a good part
of a second to import, and ``bpf dump`` does not need it.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

from nodecryptor.core.settings import Settings
from nodecryptor.datapath.bpf import abi, pins, syscall
from nodecryptor.datapath.bpf.maps import decode


def active(settings: Settings) -> bool:
    """True when nodecryptor's BPF datapath is installed here: a link or the program pinned
    under its root, or its legacy tc filter on a device. (Maps alone, left by an agent that
    died before attaching, enforce nothing; ``cleanup`` removes them all the same.)"""
    if (
        pins.pinned_link_names(settings.bpffs)
        or os.path.exists(pins.prog_path(settings.bpffs))
        or pins.pinned_link_names(settings.bpffs, "ingress")
    ):
        return True
    from nodecryptor.datapath.bpf import attach

    return bool(attach.tc_devices()) or bool(attach.tc_devices("ingress"))


def attachments(settings: Settings) -> tuple[str, list[Any]]:
    """(mode, attachments) of every device nodecryptor is attached to in this namespace."""
    from nodecryptor.datapath.bpf import attach

    prog_id = pinned_prog_id(settings)
    found = [
        a
        for a in (
            attach.tcx_observe(settings.bpffs, name)
            for name in pins.pinned_link_names(settings.bpffs)
        )
        if a
    ]
    found += [a for a in (attach.tc_observe(name, prog_id) for name in attach.tc_devices()) if a]
    modes = sorted({a.mode for a in found})
    return "+".join(modes), found


def pinned_prog_id(settings: Settings) -> int:
    try:
        prog = syscall.obj_get(pins.prog_path(settings.bpffs))
    except OSError:
        return 0
    with prog:
        return int(syscall.prog_info(prog).id)


def read_config(settings: Settings) -> dict[str, Any] | None:
    """The pinned configuration entry, decoded by maps.decode; None when absent."""
    try:
        config_map = syscall.obj_get(pins.map_path(settings.bpffs, abi.CONFIG_MAP), read_only=True)
    except OSError:
        return None
    with config_map:
        value = abi.Config()
        if not syscall.map_lookup(config_map, ctypes.c_uint32(0), value):
            return None
        return decode.decode_config(value)
