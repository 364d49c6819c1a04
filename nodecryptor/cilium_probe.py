"""The one observation nodecryptor/cilium.py needs beyond the WireGuard device: which of Cilium's
tunnel devices exist in this network namespace."""

from __future__ import annotations

import socket

from .cilium import TUNNEL_DEVICES


def tunnel_devices() -> tuple[str, ...]:
    """Names of Cilium's tunnel devices present here, in TUNNEL_DEVICES order."""
    present = []
    for name in TUNNEL_DEVICES:
        try:
            socket.if_nametoindex(name)
        except OSError:
            continue
        present.append(name)
    return tuple(present)
