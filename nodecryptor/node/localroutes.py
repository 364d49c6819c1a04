"""The local node's own prefixes as the kernel shows them: a source no other node can write.

Every CiliumNode, the local node's own included, can be rewritten by any node's Cilium agent,
so the policy takes the local node's addresses and pod CIDRs from its v1 Node and from here:

- the addresses of the local interfaces (loopback, link-local and the WireGuard device's
  left out), as host prefixes;
- the routes of the main table that leave through an interface holding an address inside the
  route's own prefix: the local pod CIDR, which Cilium routes over ``cilium_host`` whose
  router address it takes from that CIDR (a pod network on a bridge or veth is the same
  shape). Routes to other nodes' pod CIDRs go through a gateway outside them, or, in tunnel
  mode, never contain the local router address. The underlay's own subnet has this shape too;
  ``policy.plan.localize`` drops a prefix that contains the node's own address.

Read failures give an empty answer: the policy then relies on the Node object alone.
"""

from __future__ import annotations

import ipaddress
import logging

from pyroute2 import IPRoute

from nodecryptor.core.log import kv
from nodecryptor.core.model import IPNetwork

log = logging.getLogger(__name__)


def _usable(addr) -> bool:
    return not (addr.is_loopback or addr.is_link_local or addr.is_multicast or addr.is_unspecified)


def read_local_prefixes(wg_interface: str = "cilium_wg0") -> tuple[IPNetwork, ...]:
    """Host prefixes of the local interface addresses and the prefixes routed through an
    interface that holds an address inside them, sorted; () when the kernel cannot be read."""
    try:
        with IPRoute() as ipr:
            names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in ipr.get_links()}
            own: list[IPNetwork] = []
            by_link: dict[int, list] = {}
            for msg in ipr.get_addr():
                text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if not text or names.get(msg["index"]) == wg_interface:
                    continue
                addr = ipaddress.ip_address(text)
                if not _usable(addr):
                    continue
                own.append(ipaddress.ip_network(addr))
                by_link.setdefault(msg["index"], []).append(addr)
            for family in (2, 10):
                for route in ipr.get_routes(family=family, table=254):
                    dst, oif = route.get_attr("RTA_DST"), route.get_attr("RTA_OIF")
                    if not dst or route["dst_len"] == 0 or oif not in by_link:
                        continue
                    prefix = ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False)
                    if any(a.version == prefix.version and a in prefix for a in by_link[oif]):
                        own.append(prefix)
    except Exception as e:  # the Node object still names the local prefixes
        log.warning(
            "could not read the local prefixes from the kernel",
            extra=kv(error=f"{type(e).__name__}: {e}"),
        )
        return ()
    return tuple(sorted(set(own), key=lambda p: (p.version, p)))
