"""The local node's own prefixes as the kernel shows them: a source no other node can write.

Every CiliumNode, the local node's own included, can be rewritten by any node's Cilium agent,
so the policy takes the local node's addresses and pod CIDRs from its v1 Node and from here:

- the addresses of the local interfaces (loopback, link-local and the WireGuard device's
  left out), as host prefixes;
- the routes Cilium installs over ``cilium_host`` that contain one of ``cilium_host``'s own
  addresses: Cilium takes that router address from the local pod CIDR, so such a route is the
  local pod CIDR. (In tunnel mode Cilium also routes remote pod CIDRs over ``cilium_host``;
  those never contain the local router address.)

Read failures give an empty answer: the policy then relies on the Node object alone.
"""

from __future__ import annotations

import ipaddress
import logging

from pyroute2 import IPRoute

from nodecryptor.core.log import kv
from nodecryptor.core.model import IPNetwork

log = logging.getLogger(__name__)

CILIUM_HOST = "cilium_host"


def _usable(addr) -> bool:
    return not (addr.is_loopback or addr.is_link_local or addr.is_multicast
                or addr.is_unspecified)


def read_local_prefixes(wg_interface: str = "cilium_wg0") -> tuple[IPNetwork, ...]:
    """Host prefixes of the local interface addresses and the local pod CIDRs Cilium routes
    over cilium_host, sorted; () when the kernel cannot be read."""
    try:
        with IPRoute() as ipr:
            names = {msg["index"]: msg.get_attr("IFLA_IFNAME") for msg in ipr.get_links()}
            own: list[IPNetwork] = []
            router: list = []
            for msg in ipr.get_addr():
                text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                name = names.get(msg["index"])
                if not text or name == wg_interface:
                    continue
                addr = ipaddress.ip_address(text)
                if not _usable(addr):
                    continue
                own.append(ipaddress.ip_network(addr))
                if name == CILIUM_HOST:
                    router.append(addr)
            host_index = next((i for i, n in names.items() if n == CILIUM_HOST), None)
            if host_index is not None and router:
                for family in (2, 10):
                    for route in ipr.get_routes(family=family, oif=host_index):
                        dst = route.get_attr("RTA_DST")
                        if not dst or route["dst_len"] == 0:
                            continue
                        prefix = ipaddress.ip_network(f"{dst}/{route['dst_len']}", strict=False)
                        if any(a.version == prefix.version and a in prefix for a in router):
                            own.append(prefix)
    except Exception as e:  # the Node object still names the local prefixes
        log.warning("could not read the local prefixes from the kernel",
                    extra=kv(error=f"{type(e).__name__}: {e}"))
        return ()
    return tuple(sorted(set(own), key=lambda p: (p.version, p)))
