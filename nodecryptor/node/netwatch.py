"""Wake the reconcile loop when a link changes: the WireGuard device appears, disappears, goes
down, or changes ifindex or MTU; an underlay device is re-created. Link events only signal; the
loop re-reads the state itself, so a missed or coalesced event cannot leave stale state."""

from __future__ import annotations

import logging
import select
import threading

from pyroute2 import IPRoute
from pyroute2.netlink.rtnl import RTMGRP_LINK

from nodecryptor.core.log import kv

log = logging.getLogger(__name__)


class LinkWatcher:
    def __init__(self, wake: threading.Event, names=None):
        self._wake = wake
        self._names = names  # callable returning the set of interesting names, or None = all

    def run(self, stop: threading.Event) -> None:
        with IPRoute() as ipr:
            ipr.bind(groups=RTMGRP_LINK)
            fd = ipr.fileno()
            while not stop.is_set():
                ready, _, _ = select.select([fd], [], [], 0.5)
                if not ready:
                    continue
                try:
                    msgs = ipr.get()
                except Exception as e:  # a netlink overrun: reconcile anyway
                    log.debug("link monitor read", extra=kv(error=str(e)))
                    self._wake.set()
                    continue
                interesting = self._names() if self._names else None
                for msg in msgs:
                    name = msg.get_attr("IFLA_IFNAME")
                    if interesting is None or name in interesting:
                        log.debug("link event", extra=kv(ifname=name, event=msg.get("event")))
                        self._wake.set()
