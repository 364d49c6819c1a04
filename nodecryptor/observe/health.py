"""HTTP endpoints: /healthz (liveness: the agent's loops are alive and turning) and /readyz
(first full sync applied and datapath attached, as the reconcile loop last saw it). Neither
calls the API server, so an API outage never restarts or unreadies a node that keeps enforcing
its last known state; neither touches netlink or a lock ``apply`` holds, so a flood of probes
cannot slow the reconcile loop (see nodecryptor.observe.httpserver for the connection limits)."""

from __future__ import annotations

import json
import logging
from typing import Callable

from nodecryptor.observe.httpserver import EndpointServer, Request, Response, parse_bind

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]

__all__ = ["Check", "HealthServer", "all_of", "parse_bind"]


def all_of(*checks: Check) -> Check:
    """A check that passes when every one of ``checks`` does; the reason is the first
    failure's, or every reason joined when all pass."""

    def check() -> tuple[bool, str]:
        reasons = []
        for c in checks:
            ok, reason = c()
            if not ok:
                return False, reason
            reasons.append(reason)
        return True, "; ".join(reasons)

    return check


class HealthServer:
    """/healthz and /readyz on ``bind``. Listening starts in the constructor (a bad address
    raises SettingsError naming ``flag``); answering starts with ``start()``."""

    def __init__(
        self,
        bind: str,
        alive: Check,
        ready: Check,
        on_ready: Callable[[bool], None] | None = None,
        *,
        flag: str = "--health-probe-bind-address",
        max_connections: int = 64,
        request_seconds: float = 5.0,
    ):
        def endpoint(check: Check, report: Callable[[bool], None] | None):
            def handle(_request: Request) -> Response:
                ok, reason = check()
                if report is not None:
                    report(ok)
                body = json.dumps({"ok": ok, "reason": reason}).encode()
                return Response(200 if ok else 503, "application/json", body)

            return handle

        self.server = EndpointServer(
            bind,
            {"/healthz": endpoint(alive, None), "/readyz": endpoint(ready, on_ready)},
            flag=flag,
            max_connections=max_connections,
            request_seconds=request_seconds,
            name="health",
        )

    @property
    def port(self) -> int:
        return self.server.port

    def start(self) -> "HealthServer":
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop()
