"""Which underlay devices carry node-to-node traffic, and their MTUs.

Default: the devices the kernel routes the remote node addresses through (excluding the
WireGuard device and loopback), so multi-homed nodes get every device that matters.
"""

from __future__ import annotations

import logging

from pyroute2 import IPRoute

from .log import kv
from .model import Device

log = logging.getLogger(__name__)


def _device(ipr: IPRoute, ifindex: int | None = None, ifname: str | None = None) -> Device | None:
    try:
        links = ipr.link("get", index=ifindex) if ifindex else ipr.link("get", ifname=ifname)
    except Exception:
        return None
    if not links:
        return None
    msg = links[0]
    return Device(name=msg.get_attr("IFLA_IFNAME"), ifindex=msg["index"],
                  mtu=msg.get_attr("IFLA_MTU") or 0)


def resolve(names, addresses, exclude: str) -> tuple[tuple[Device, ...], list[str]]:
    """Return (devices, problems). ``names`` given: exactly those (a missing one is a problem);
    else the output devices of the routes to ``addresses``."""
    problems: list[str] = []
    found: dict[int, Device] = {}
    with IPRoute() as ipr:
        if names:
            for name in names:
                dev = _device(ipr, ifname=name)
                if dev is None:
                    problems.append(f"device {name!r} (from --devices) does not exist")
                else:
                    found[dev.ifindex] = dev
        else:
            for addr in addresses:
                try:
                    routes = ipr.route("get", dst=str(addr))
                except Exception as e:
                    problems.append(f"no route to {addr}: {e}")
                    continue
                for route in routes:
                    oif = route.get_attr("RTA_OIF")
                    if not oif or oif in found:
                        continue
                    dev = _device(ipr, ifindex=oif)
                    if dev and dev.name not in (exclude, "lo"):
                        found[oif] = dev
    if problems:
        log.warning("device detection", extra=kv(problems="; ".join(problems)))
    return tuple(sorted(found.values(), key=lambda d: d.name)), problems
