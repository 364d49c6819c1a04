"""Which underlay devices carry node-to-node traffic, and their MTUs.

Default: the devices the kernel routes the remote node addresses through (excluding the
WireGuard device and loopback), so multi-homed nodes get every device that matters.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time

from pyroute2 import IPRoute

from nodecryptor.policy.cilium import TUNNEL_DEVICES
from nodecryptor.core.log import kv
from nodecryptor.core.model import Device

log = logging.getLogger(__name__)


def _device(ipr: IPRoute, ifindex: int | None = None, ifname: str | None = None) -> Device | None:
    try:
        links = ipr.link("get", index=ifindex) if ifindex else ipr.link("get", ifname=ifname)
    except Exception:
        return None
    if not links:
        return None
    msg = links[0]
    return Device(
        name=msg.get_attr("IFLA_IFNAME"),
        ifindex=msg["index"],
        mtu=msg.get_attr("IFLA_MTU") or 0,
        networks=_networks(ipr, msg["index"]),
    )


def _networks(ipr: IPRoute, ifindex: int) -> tuple:
    """Subnets of the device's addresses (link-local ones left out); () when unreadable."""
    try:
        found = []
        for msg in ipr.get_addr(index=ifindex):
            address = msg.get_attr("IFA_ADDRESS")
            if address:
                net = ipaddress.ip_interface(f"{address}/{msg['prefixlen']}").network
                if not net.is_link_local:
                    found.append(net)
        return tuple(sorted(set(found), key=lambda n: (n.version, n)))
    except Exception:
        return ()


def _route_oif(ipr: IPRoute, addr, problems: list[str]) -> int | None:
    try:
        routes = ipr.route("get", dst=str(addr))
    except Exception as e:
        problems.append(f"no route to {addr}: {e}")
        return None
    for route in routes:
        oif = route.get_attr("RTA_OIF")
        if oif:
            return oif
    return None


def resolve(names, addresses, exclude: str) -> tuple[tuple[Device, ...], list[str]]:
    """Return (devices, problems). ``names`` given: exactly those (a missing one is a problem);
    else the output devices of the routes to ``addresses`` (one route lookup each)."""
    return DeviceResolver(refresh_seconds=0.0)(names, addresses, exclude)


class DeviceResolver:
    """``resolve`` with memory: an address's output device is looked up once and then reused,
    until ``refresh_seconds`` have passed or a remembered device has vanished. One route
    lookup costs ~0.2 ms (10,000 took 2.3 s here), too much for every reconcile pass of a
    large cluster. Problems are logged when they change, not on every pass."""

    def __init__(self, refresh_seconds: float, clock=None):
        self.refresh_seconds = refresh_seconds
        self._clock = clock or time.monotonic
        self._oif: dict = {}
        self._refreshed = float("-inf")
        self._last_problems: list[str] = []
        self.lookups = 0
        """Route lookups made so far (tests and debugging)."""

    def __call__(self, names, addresses, exclude: str) -> tuple[tuple[Device, ...], list[str]]:
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
                now = self._clock()
                if now - self._refreshed >= self.refresh_seconds:
                    self._oif, self._refreshed = {}, now
                current = {}
                for addr in addresses:
                    oif = self._oif.get(addr)
                    if oif is None:  # unknown, or had no route: ask (failures are not cached)
                        self.lookups += 1
                        oif = _route_oif(ipr, addr, problems)
                    if oif:
                        current[addr] = oif
                self._oif = current
                for oif in set(current.values()):
                    dev = _device(ipr, ifindex=oif)
                    if dev is None:  # re-created or removed device: look everything up again
                        self._refreshed = float("-inf")
                    elif dev.name not in (exclude, "lo"):
                        found[oif] = dev
        if problems != self._last_problems:
            self._last_problems = problems
            if problems:
                log.warning(
                    "device detection",
                    extra=kv(problems="; ".join(problems[:10]), count=len(problems)),
                )
        return tuple(sorted(found.values(), key=lambda d: d.name)), problems


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
