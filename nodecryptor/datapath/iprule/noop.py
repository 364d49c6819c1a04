"""``--noop-route``: the seed's dummy device and route, kept for compatibility only.

Why the seed needed it: its author saw cluster traffic ignore the ip rules unless the main
table held at least one route besides the default, and suspected Cilium's BPF fast path
(``bpf_fib_lookup``/``bpf_redirect_neigh``, which skips the stack's routing decision when the
main table looks trivial). A dummy interface with a route to an unused address made the table
"interesting" enough. It was an observation, not an understood mechanism, so nodecryptor only
reproduces it on request and only in ip-rule mode.

Why the BPF datapath does not need it: its program sits on the egress of the underlay device
and sees every packet that is about to leave, however the routing decision was made (stack,
policy rule, or a Cilium program redirecting to the device), so there is no routing step to
be skipped.

The route goes to 192.0.2.1/32 (TEST-NET-1, RFC 5737, never used by real hosts) through a
dummy device ``nc-noop``. Kernels without the dummy driver get a ``blackhole`` route to the
same address instead, which equally makes main non-trivial. Both carry nodecryptor's route
protocol number so cleanup removes only this route.
"""

from __future__ import annotations

import errno
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from nodecryptor.core.errors import DatapathError

NOOP_DEVICE = "nc-noop"
NOOP_ADDRESS = "192.0.2.1"
# Route protocol number (rtm_protocol) marking the noop route as nodecryptor's; unassigned in
# iproute2's rt_protos.
NOOP_PROTO = 186
MAIN_TABLE = 254


def _noop_routes(ipr: IPRoute) -> list:
    return [
        msg
        for msg in ipr.route("dump", family=socket.AF_INET, table=MAIN_TABLE)
        if msg.get_attr("RTA_DST") == NOOP_ADDRESS
        and msg["dst_len"] == 32
        and msg["proto"] == NOOP_PROTO
    ]


def present(ipr: IPRoute) -> bool:
    return bool(_noop_routes(ipr))


def ensure(ipr: IPRoute) -> dict:
    """Create the dummy device (or fall back to a blackhole) and the route; idempotent."""
    if _noop_routes(ipr):
        return {"noop_route": NOOP_ADDRESS, "changed": False}
    mode = "dummy"
    try:
        if not ipr.link_lookup(ifname=NOOP_DEVICE):
            ipr.link("add", ifname=NOOP_DEVICE, kind="dummy")
        index = ipr.link_lookup(ifname=NOOP_DEVICE)[0]
        ipr.link("set", index=index, state="up")
        route = {"oif": index, "type": "unicast"}
    except NetlinkError as e:
        if e.code not in (errno.EOPNOTSUPP, errno.ENOENT):
            raise DatapathError(f"cannot create noop device {NOOP_DEVICE}: {e}") from e
        mode = "blackhole"
        route = {"type": "blackhole"}
    try:
        ipr.route("replace", dst=f"{NOOP_ADDRESS}/32", table=MAIN_TABLE, proto=NOOP_PROTO, **route)
    except NetlinkError as e:
        raise DatapathError(f"cannot add noop route {NOOP_ADDRESS}/32: {e}") from e
    return {"noop_route": NOOP_ADDRESS, "mode": mode, "changed": True}


def remove(ipr: IPRoute) -> dict:
    """Remove the noop route and device if nodecryptor created them; idempotent."""
    removed = 0
    for msg in _noop_routes(ipr):
        try:
            ipr.route(
                "del",
                dst=f"{NOOP_ADDRESS}/32",
                table=MAIN_TABLE,
                proto=NOOP_PROTO,
                type=msg["type"],
            )
            removed += 1
        except NetlinkError as e:
            if e.code not in (errno.ENOENT, errno.ESRCH):
                raise DatapathError(f"cannot delete noop route: {e}") from e
    device = False
    for index in ipr.link_lookup(ifname=NOOP_DEVICE):
        links = ipr.get_links(index)
        info = links[0].get_attr("IFLA_LINKINFO") if links else None
        # Only a dummy device of that name is ours; never delete anything else by name.
        if info is not None and info.get_attr("IFLA_INFO_KIND") == "dummy":
            ipr.link("del", index=index)
            device = True
    return {"noop_routes_removed": removed, "noop_device_removed": device}
